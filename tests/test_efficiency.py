"""`rocoft-bench efficiency` on a tiny BERT: files, rows, and the deterministic relations (no timings)."""

import gc
import json

import pytest
import torch

from benchmark.cli import main
from benchmark.efficiency import DEFAULT_METHODS, build_base, make_batch, paired_ratio, saved_activation_bytes
from rocoft_pl import RoCoFTConfig, apply_rocoft, rocoft_layers
from rocoft_pl.inject import find_targets
from rocoft_pl.layers import features


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    argv = ["efficiency", "--model", "bert-tiny-config", "--batch-size", "2", "--seq-len", "16",
            "--repeats", "2", "--warmup", "0", "--device", "cpu", "--output-dir", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "efficiency.json").read_text())
    return out, data, {row["method"]: row for row in data["methods"]}


def test_files_and_one_row_per_method(result):
    out, data, rows = result
    assert (out / "efficiency.csv").read_text().count("\n") == len(DEFAULT_METHODS) + 1
    assert list(rows) == list(DEFAULT_METHODS)
    for row in rows.values():
        assert row["step_ms"] > 0 and row["saved_activation_bytes"] > 0
    assert len(data["step_times_s"]["floor"]) == 2
    assert rows["floor"]["step_vs_floor"] == 1.0


def test_step_ratios_are_paired_per_repeat():
    # A machine twice as slow in the second repeat: paired ratios see 1.1 both times; medians would mix.
    times = {"a": [1.1, 2.2], "floor": [1.0, 2.0]}
    assert paired_ratio(times, "a", "floor") == pytest.approx(1.1)
    times = {"a": [1.1, 2.2, 5.0], "floor": [1.0, 2.0, 1.0]}  # one disturbed pair does not move the median
    assert paired_ratio(times, "a", "floor") == pytest.approx(1.1)


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("rank", [1, 3])
def test_rocoft_counts_are_apply_rocofts(result, mode, rank):
    report = apply_rocoft(build_base("bert-tiny-config"), RoCoFTConfig(mode=mode, rank=rank))
    row = result[2][f"rocoft-{mode}-r{rank}"]
    assert row["rocoft_params"] == report.rocoft_params
    assert row["trainable_params"] == report.trainable_params
    # fp32 AdamW: parameter + gradient + exp_avg + exp_avg_sq, plus one 4-byte step counter per tensor.
    assert 16 * report.trainable_params <= row["train_state_bytes"] <= 16 * report.trainable_params + 1024


def test_saved_activation_relations(result):
    rows = result[2]
    act = {name: row["saved_activation_bytes"] for name, row in rows.items()}
    assert rows["floor"]["trainable_params"] == 0 and rows["floor"]["train_state_bytes"] == 0
    for r in (1, 3):
        # Columns keep only x[..., idx]; rows keep x, as LoRA does (LoRA also keeps x @ A.T).
        assert act[f"rocoft-column-r{r}"] <= act[f"rocoft-row-r{r}"]
        assert act[f"rocoft-column-r{r}"] <= 1.01 * act["floor"]
        assert act[f"rocoft-row-r{r}"] <= act["lora-r8"]
    # Algorithm 1 keeps a concatenated full-size weight per layer for backward.
    assert act["alg1-row-r3"] > act["rocoft-row-r3"]
    assert act["full"] >= act["floor"]


def test_bf16_mixed_runs_under_autocast_and_rocoft_keeps_no_weight_copies(tmp_path):
    out = tmp_path / "mixed"
    argv = ["efficiency", "--model", "bert-tiny-config", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--dtype", "bf16-mixed", "--methods", "floor,rocoft-column-r1,lora-r1",
            "--output-dir", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "efficiency.json").read_text())
    rows = {row["method"]: row for row in data["methods"]}
    assert data["setup"]["dtype"] == "bf16-mixed"
    # fp32 weights and AdamW state (bf16 would halve these), bf16 autocast in forward
    report = apply_rocoft(build_base("bert-tiny-config"), RoCoFTConfig(mode="column", rank=1))
    assert rows["rocoft-column-r1"]["train_state_bytes"] >= 16 * report.trainable_params
    # autocast keeps a bf16 copy of each weight for backward: the floor and LoRA do, the fused columns do not
    act = {name: row["saved_activation_bytes"] for name, row in rows.items()}
    targets = sum(o * i for o, i in map(features, find_targets(build_base("bert-tiny-config"), RoCoFTConfig()).values()))
    assert act["floor"] - act["rocoft-column-r1"] >= 2 * targets * 0.9
    assert act["rocoft-column-r1"] < act["lora-r1"]


@pytest.mark.parametrize(
    "extra,match",
    [(["--seq-len", "65"], "max_position_embeddings"), (["--methods", "full,lora-r8"], "include 'floor'"),
     (["--methods", "floor,dora"], "unknown method 'dora'")],
)
def test_bad_arguments_fail_early_and_write_nothing(tmp_path, extra, match):
    out = tmp_path / "out"
    argv = ["efficiency", "--model", "bert-tiny-config", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
            "--device", "cpu", "--output-dir", str(out), *extra]
    with pytest.raises(SystemExit, match=match):
        main(argv)
    assert not out.exists()


def test_measuring_activations_frees_the_graph():
    # Regression: packing the tensor itself made outputs reference their own grad_fn, and every probe
    # leaked a whole forward's activations (an OOM with nine RoBERTa-base copies).
    model = build_base("bert-tiny-config").train()
    batch = make_batch(model, 2, 16, torch.device("cpu"))

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    first = saved_activation_bytes(model, batch)
    before = live()
    assert [saved_activation_bytes(model, batch) for _ in range(3)] == [first] * 3
    assert live() == before


def test_adapter_bound_and_targets_reported(result):
    data, rows = result[1], result[2]
    adapter = [c for c in data["targets"] if "adapter" in c["target"]]
    assert len(adapter) == 4 and all(c["ok"] for c in adapter)
    assert rows["full"]["adapter_bytes"] is None and rows["floor"]["adapter_bytes"] is None
    assert rows["lora-r8"]["adapter_bytes"] > rows["lora-r1"]["adapter_bytes"]
    for name in ("rocoft-row-r3", "lora-r8", "alg1-row-r3"):
        assert rows[name]["merged_infer_vs_base"] > 0 and rows[name]["unmerged_infer_vs_base"] > 0
    for name in ("full", "floor"):  # nothing to merge
        assert rows[name]["merged_infer_vs_base"] is None and rows[name]["unmerged_infer_vs_base"] is None
    assert len(data["infer_times_s"]["unmerged"]["base"]) == len(data["infer_times_s"]["merged"]["base"]) == 4
    checked = " ".join(c["target"] for c in data["targets"])
    for target in ("step / floor", "step / lora-r8", "step / alg1-row-r3", "step / full", "merged inference"):
        assert target in checked


def test_rocoft_both_method_names_parse_like_rows_and_count_the_overlap_once():
    from benchmark.efficiency import build_method

    base = build_base("bert-tiny-config")
    method = build_method("rocoft-both-r2", base)
    report = apply_rocoft(build_base("bert-tiny-config"), RoCoFTConfig(mode="both", rank=2))
    assert method.name == "rocoft-both-r2" and method.rocoft_params == report.rocoft_params
    layers = rocoft_layers(method.model)
    assert layers and all(l.mode == "both" and l.indices.numel() == l.column_indices.numel() == 2 for l in layers.values())
    # trainable_params (training state) holds the stored tensors: the r x r overlap twice per matrix
    assert sum(p.numel() for p in method.trainable) == report.trainable_params + 4 * len(layers)
    assert "rocoft-both-r1" not in DEFAULT_METHODS  # off by default
    with pytest.raises(ValueError, match="unknown method 'rocoft-both'"):
        build_method("rocoft-both", base)


def test_cli_accepts_rocoft_both(tmp_path):
    out = tmp_path / "both"
    argv = ["efficiency", "--model", "bert-tiny-config", "--batch-size", "2", "--seq-len", "8", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--methods", "floor,rocoft-both-r1", "--output-dir", str(out)]
    assert main(argv) == 0
    rows = {row["method"]: row for row in json.loads((out / "efficiency.json").read_text())["methods"]}
    report = apply_rocoft(build_base("bert-tiny-config"), RoCoFTConfig(mode="both", rank=1))
    assert rows["rocoft-both-r1"]["rocoft_params"] == report.rocoft_params
    assert rows["rocoft-both-r1"]["adapter_bytes"] > 0 and rows["rocoft-both-r1"]["merged_infer_vs_base"] > 0
