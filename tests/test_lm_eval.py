"""benchmark.lm_eval: lm-evaluation-harness on a local offline task with a tiny model, in memory and from a
saved merged checkpoint; records in the results store labelled by protocol; the leaderboard shows them."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import tiny_causal_lm as tl  # noqa: E402
from benchmark import lm_eval as le  # noqa: E402
from benchmark.cli import build_parser  # noqa: E402
from benchmark.leaderboard import render, results_frame  # noqa: E402
from benchmark.results import read_results  # noqa: E402
from rocoft_pl import RoCoFTConfig, apply_rocoft, rocoft_layers, save_adapter  # noqa: E402

TASK_DIR = tl.FIXTURES / "lm_eval"


def test_local_task_paths_become_absolute(tmp_path):
    out = le.prepare_include_dir([TASK_DIR], tmp_path / "tasks")
    (copied,) = list(out.glob("*.yaml"))
    spec = yaml.safe_load(copied.read_text())
    path = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path == (TASK_DIR / "tiny_boolq.jsonl").resolve()
    with pytest.raises(FileNotFoundError):
        le.prepare_include_dir([tmp_path / "missing"], tmp_path / "x")


def trained_llama():
    """A tiny Llama with a non-zero RoCoFT adapter (so merged vs unmerged is a real check)."""
    model = tl.tiny_llama()
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            layer.delta.normal_(std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def in_memory():
    lm = le.hflm_in_memory(trained_llama(), tl.tiny_tokenizer(), batch_size=4)
    return le.evaluate(lm, ["tiny_boolq"], include=[TASK_DIR], bootstrap_iters=0)


def test_in_memory_model_scores_a_local_task(in_memory):
    metrics = in_memory["results"]["tiny_boolq"]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert in_memory["n-samples"]["tiny_boolq"]["effective"] == 4


def test_records_carry_the_protocol_and_show_in_the_leaderboard(in_memory, tmp_path):
    records = le.result_records(in_memory, model="tiny-llama", method="rocoft-row", method_label="RoCoFT 2-Row",
                                adapter_params=224, extra={"limit": None})
    (record,) = records
    assert record["protocol"] == "loglikelihood" and record["method_label"] == "RoCoFT 2-Row [loglikelihood]"
    assert record["task"] == "tiny_boolq" and record["metrics"]["accuracy"] == in_memory["results"]["tiny_boolq"]["acc,none"]
    store = tmp_path / "results.jsonl"
    le.record_results(store, records)
    # a generate-and-parse number for the same model, task and method, as the causal-LM module reports it
    generated = le.generate_records({"val/tiny_boolq/accuracy": 0.25, "val/tiny_boolq/count": 4.0, "val/accuracy": 0.25},
                                    model="tiny-llama", method="rocoft-row", method_label="RoCoFT 2-Row")
    assert [(g["task"], g["protocol"], g["n_samples"]) for g in generated] == [("tiny_boolq", "generate", 4)]
    le.record_results(store, generated)
    le.record_results(store, records)  # idempotent: the same cell is replaced, not duplicated
    assert len(read_results(store)) == 2
    table = render(results_frame(read_results(store)))
    assert "RoCoFT 2-Row [loglikelihood]" in table and "RoCoFT 2-Row [generate]" in table and "25.00" in table
    with pytest.raises(ValueError):
        le.result_records(in_memory, model="m", protocol="vibes")


def test_grid_cells_of_causal_lms_add_per_dataset_generate_records():
    record = {"status": "ok", "cell_id": "m|commonsense|RoCoFT 3-Row|seed=0", "model": "m", "method": "rocoft-row",
              "method_label": "RoCoFT 3-Row", "seed": 0, "adapter_params": 10,
              "metrics": {"val/boolq/accuracy": 0.5, "val/boolq/count": 2.0, "val/piqa/accuracy": 1.0, "val/accuracy": 0.75}}
    causal = {"model": {"class_path": "rocoft_pl.modules.causal_lm.CausalLMModule"}}
    derived = le.generate_records_of_cell(record, causal)
    assert sorted((d["task"], d["metrics"]["accuracy"], d["protocol"]) for d in derived) == [("boolq", 0.5, "generate"), ("piqa", 1.0, "generate")]
    assert all(d["method_label"] == "RoCoFT 3-Row [generate]" and d["source_cell"] == record["cell_id"] for d in derived)
    classifier = {"model": {"class_path": "rocoft_pl.modules.classification.SequenceClassificationModule"}}
    assert le.generate_records_of_cell(record, classifier) == []
    assert le.generate_records_of_cell({**record, "status": "failed"}, causal) == []


def test_task_names_and_primary_metrics():
    assert le.primary_metric("hellaswag", {"acc,none": 0.3, "acc_norm,none": 0.4}) == ("acc_norm,none", 0.4)
    assert le.primary_metric("boolq", {"acc,none": 0.6}) == ("acc,none", 0.6)
    assert le.primary_metric("gsm8k", {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2})[1] == 0.2
    fake = {"results": {"social_iqa": {"acc,none": 0.5}, "arc_challenge": {"acc,none": 0.2, "acc_norm,none": 0.3}}}
    assert {r["task"]: r["metrics"]["accuracy"] for r in le.result_records(fake, "m")} == {"siqa": 0.5, "arc-c": 0.3}
    assert set(le.DEFAULT_TASKS) == {"boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy",
                                     "arc_challenge", "openbookqa", "gsm8k"}


def test_cli_scores_base_plus_adapter_and_saves_the_merged_checkpoint(in_memory, tmp_path):
    from benchmark.cli import main

    base = tl.tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tl.tiny_tokenizer().save_pretrained(tmp_path / "base")
    save_adapter(trained_llama(), tmp_path / "adapter")
    store = tmp_path / "results.jsonl"
    argv = ["lm-eval", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--tasks", "tiny_boolq",
            "--include", str(TASK_DIR), "--batch-size", "4", "--results", str(store), "--model-label", "tiny-llama",
            "--method", "rocoft-row", "--save-merged", str(tmp_path / "merged"), "--output", str(tmp_path / "lm.json"),
            "--device", "cpu", "--dtype", "float32"]  # the in-memory reference ran on the CPU in float32
    assert main(argv) == 0
    (record,) = read_results(store)
    # base + adapter, merged, scores exactly what the in-memory RoCoFT model scored
    assert record["metrics"]["accuracy"] == in_memory["results"]["tiny_boolq"]["acc,none"]
    assert record["adapter_params"] == 512 and record["protocol"] == "loglikelihood"
    assert json.loads((tmp_path / "lm.json").read_text())["results"]["tiny_boolq"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([tl.tiny_tokenizer()("Question: is fire hot?\nAnswer: yes")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained_llama()(ids).logits, rtol=1e-5, atol=1e-5)
    # the merged checkpoint scores the same by path (the multi-GPU route, here on CPU)
    by_path = le.evaluate(le.hflm_from_path(tmp_path / "merged", batch_size=4, dtype="float32"), ["tiny_boolq"], include=[TASK_DIR])
    assert by_path["results"]["tiny_boolq"]["acc,none"] == record["metrics"]["accuracy"]


def test_device_and_dtype_default_to_the_gpu_in_bf16_when_there_is_one(monkeypatch):
    gpu, bf16 = [False], [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu[0])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16[0])
    assert le.resolve_device_dtype() == le.resolve_device_dtype("auto", "auto") == ("cpu", "float32")
    assert le.resolve_device_dtype(None, None) == ("cpu", "float32")
    gpu[0] = True
    assert le.resolve_device_dtype() == ("cuda", "float16")  # a GPU without native bf16 (V100, T4)
    bf16[0] = True
    assert le.resolve_device_dtype() == ("cuda", "bfloat16")
    assert le.resolve_device_dtype("cuda:1") == ("cuda:1", "bfloat16")
    # explicit values win
    assert le.resolve_device_dtype("cpu") == ("cpu", "float32")
    assert le.resolve_device_dtype("auto", "float32") == ("cuda", "float32")
    assert le.resolve_device_dtype("cpu", "bfloat16") == ("cpu", "bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        le.resolve_device_dtype("cpu", "bf16")
    args = build_parser().parse_args(["lm-eval", "--model", "m"])
    assert (args.device, args.dtype) == ("auto", "auto")


# lm-eval's results for tasks whose only metrics have a named filter (a regex-extracted exact match)
FILTERED = {
    "results": {
        "my_math": {"alias": "my_math", "exact_match,get-answer": 0.4, "exact_match_stderr,get-answer": 0.01},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.3, "exact_match_stderr,strict-match": 0.02,
                  "exact_match,flexible-extract": 0.35, "exact_match_stderr,flexible-extract": "N/A"},
        "boolq": {"alias": "boolq", "acc,none": 0.6, "acc_stderr,none": 0.05},
    },
    "n-shot": {"my_math": 0, "gsm8k": 5, "boolq": 0},
    "n-samples": {"my_math": {"original": 5, "effective": 5}, "gsm8k": {"original": 9, "effective": 9},
                  "boolq": {"original": 4, "effective": 4}},
}


def test_tasks_with_only_a_named_filter_are_kept_with_every_metric(capsys, tmp_path):
    records = {r["task"]: r for r in le.result_records(FILTERED, model="m")}
    assert set(records) == {"my_math", "gsm8k", "boolq"}  # nothing dropped
    mine = records["my_math"]
    assert mine["lm_eval_metric"] == "exact_match,get-answer" and mine["metrics"]["accuracy"] == 0.4
    assert mine["metrics"] == {"accuracy": 0.4, "exact_match/get-answer": 0.4}  # no stderr, no alias
    err = capsys.readouterr().err
    assert "exact_match,get-answer" in err and err.count("warning") == 1  # one warning, naming the chosen key
    gsm = records["gsm8k"]  # the usual primary stays; every filter is kept
    assert gsm["lm_eval_metric"] == "exact_match,flexible-extract" and gsm["metrics"]["accuracy"] == 0.35
    assert gsm["metrics"]["exact_match/strict-match"] == 0.3 and gsm["metrics"]["exact_match/flexible-extract"] == 0.35
    assert records["boolq"]["metrics"] == {"accuracy": 0.6, "acc/none": 0.6}
    # a task with no numeric metric at all is left out, with a warning
    assert le.result_records({"results": {"odd": {"alias": "odd"}}}, model="m") == []
    assert "'odd'" in capsys.readouterr().err
    # the results store holds it, and the leaderboard shows it
    store = tmp_path / "results.jsonl"
    le.record_results(store, records.values())
    stored = {r["task"]: r for r in read_results(store)}
    assert stored["my_math"]["metrics"]["exact_match/get-answer"] == 0.4
    assert "40.00" in render(results_frame(list(stored.values())))


def test_cli_prints_every_metric_with_its_filter_and_uses_the_resolved_device(monkeypatch, capsys, tmp_path):
    from benchmark.cli import main

    seen = {}

    def load_model(model, gguf_file=None, adapter=None, merge=True, dtype=None):
        seen["dtype"] = dtype
        return torch.nn.Linear(1, 1), object(), None

    def hflm_in_memory(model, tokenizer, batch_size=8, device="cpu", max_length=None):
        seen["device"] = device
        return "lm"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(le, "load_model", load_model)
    monkeypatch.setattr(le, "hflm_in_memory", hflm_in_memory)
    monkeypatch.setattr(le, "evaluate", lambda lm, tasks, **kwargs: FILTERED)
    store = tmp_path / "results.jsonl"
    assert main(["lm-eval", "--model", "tiny", "--tasks", "my_math,gsm8k,boolq", "--results", str(store)]) == 0
    assert seen == {"dtype": "float32", "device": "cpu"}
    out = capsys.readouterr().out
    assert "device cpu, dtype float32" in out
    lines = out.splitlines()
    for task, key, value in [("my_math", "exact_match,get-answer", "0.4000"), ("gsm8k", "exact_match,strict-match", "0.3000"),
                             ("gsm8k", "exact_match,flexible-extract", "0.3500"), ("boolq", "acc,none", "0.6000")]:
        assert any(l.startswith(task) and key in l and value in l for l in lines), (task, key, out)
    assert any("exact_match,get-answer *" in l and "0.0100" in l for l in lines)  # primary, starred, with its stderr
    assert "3 record(s) written" in out
    assert {r["task"] for r in read_results(store)} == {"my_math", "gsm8k", "boolq"}
    assert main(["lm-eval", "--model", "tiny", "--device", "cuda:1", "--dtype", "float16", "--tasks", "boolq"]) == 0
    assert seen == {"dtype": "float16", "device": "cuda:1"}
