"""The `rocoft` CLI: a real fit in a subprocess, every shipped config parses, clear errors for bad data."""

import os
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY = str(FIXTURES / "text_classification" / "tiny_bert")
CONFIGS = sorted((ROOT / "configs" / "glue").glob("*.yaml")) + sorted((ROOT / "configs" / "demo").glob("*.yaml"))


def tiny_config(tmp_path, task="rte", **callback):
    config = {
        "model": {
            "class_path": "rocoft_pl.modules.classification.SequenceClassificationModule",
            "init_args": {"model_name_or_path": TINY, "learning_rate": 1e-2, "warmup_steps": 1},
        },
        "data": {
            "class_path": "tasks.glue.GLUEDataModule",
            "init_args": {"task": task, "data_dir": str(FIXTURES / "glue" / task), "batch_size": 4, "max_length": 32},
        },
        "trainer": {
            "max_steps": 2,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": "rocoft_pl.RoCoFT", "init_args": {"mode": "row", "rank": 1, **callback}}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_in_a_subprocess_writes_a_loadable_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    config = tiny_config(tmp_path, adapter_dir=str(adapter))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"  # one merged stream in the order it was written
    proc = subprocess.run(
        [sys.executable, "-c", "from rocoft_pl.cli import main; main()", "fit", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    # the parameter report comes before the first step, then a progress bar runs to the 2 steps
    assert "RoCoFT parameters:" in out and "RoCoFT (row, r=1, selection=first)" in out
    assert out.index("RoCoFT parameters:") < out.index("2/2")
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in out
    assert (tmp_path / "run" / "config.yaml").is_file()

    from transformers import AutoModelForSequenceClassification

    from rocoft_pl import load_adapter, rocoft_layers

    model = AutoModelForSequenceClassification.from_pretrained(TINY)
    load_adapter(model, str(adapter))
    layers = rocoft_layers(model)
    assert len(layers) == 12 and any(float(layer.delta.abs().sum()) > 0 for layer in layers.values())


def run_cli(args):
    from rocoft_pl.cli import RoCoFTCLI

    return RoCoFTCLI(args=args)


def test_validate_and_predict_in_process(tmp_path, capsys):
    # evaluation with a zero delta: the adapter is not needed, the module and links are
    config = tiny_config(tmp_path)
    run_cli(["validate", "--config", str(config)])
    assert "val/accuracy" in capsys.readouterr().out
    run_cli(["predict", "--config", str(config)])
    written = tmp_path / "run" / "predictions" / "RTE.tsv"
    assert written.read_text().splitlines()[0] == "index\tprediction" and len(written.read_text().splitlines()) == 6


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_parse(config, capsys):
    assert CONFIGS, "no configs shipped"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed_everything"] == 42
    assert printed["model"]["init_args"]["learning_rate"] > 0
    if config.parent.name == "glue" and config.name != "base.yaml":  # base.yaml: no method (benchmark grids)
        rocoft = printed["trainer"]["callbacks"][-1]
        assert rocoft["class_path"] == "rocoft_pl.RoCoFT" and rocoft["init_args"]["rank"] == 3
        assert printed["model"]["init_args"]["warmup_steps"] == 100 and printed["model"]["init_args"]["scheduler"] == "cosine"


def test_table10_values_and_overrides(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(ROOT / "configs/glue/cola.yaml"), "--trainer.callbacks.init_args.mode", "column",
                 "--trainer.callbacks.init_args.rank", "1", "--model.init_args.model_name_or_path", "FacebookAI/roberta-large",
                 "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    rocoft = printed["trainer"]["callbacks"][-1]["init_args"]
    assert (rocoft["mode"], rocoft["rank"], rocoft["selection"], rocoft["train_bias"]) == ("column", 1, "min", True)
    model = printed["model"]["init_args"]
    assert (model["model_name_or_path"], model["learning_rate"], model["weight_decay"]) == ("FacebookAI/roberta-large", 2e-4, 0.1)
    assert printed["trainer"]["max_epochs"] == 20 and printed["data"]["init_args"]["batch_size"] == 32


def test_bad_data_dir_fails_clearly(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(Exception, match="no such directory .*nowhere"):
        run_cli(["fit", "--config", str(config), "--data.init_args.data_dir", str(tmp_path / "nowhere")])


REASONING = sorted((ROOT / "configs" / "reasoning").glob("*.yaml"))
FSDP = sorted(p for p in (ROOT / "configs" / "fsdp").glob("*.yaml") if p.stem != "cpu_2proc")  # the GPU overlays


@pytest.mark.parametrize("config", REASONING, ids=lambda p: p.name)
def test_reasoning_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "rocoft_pl.modules.causal_lm.CausalLMModule"
    assert printed["trainer"]["callbacks"][-1]["class_path"] == "rocoft_pl.RoCoFT"


@pytest.mark.parametrize("overlay", FSDP, ids=lambda p: p.name)
def test_fsdp_overlays_compose_with_a_task_config(overlay, capsys):
    """Each configs/fsdp overlay on the commonsense task: the strategy, bf16-true and the model it names."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(ROOT / "configs/reasoning/commonsense.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]["class_path"]
    assert strategy.endswith("ModelParallelStrategy")
    assert printed["trainer"]["precision"] == "bf16-true"
    model = printed["model"]["init_args"]
    if overlay.stem.endswith("_nf4"):  # loaded quantized in every process, its packed weights bf16 for FSDP2
        assert model["init_on_meta"] is False and model["quantization"] == "nf4-dq"
        assert model["quantization_options"] == {"compute_dtype": "bfloat16", "quant_storage": "bfloat16"}
    else:
        assert model["init_on_meta"] is True and model["quantization"] is None
    assert printed["trainer"]["callbacks"][-1]["init_args"]["train_bias"] is True  # the task's RoCoFT settings survive


QUANTIZED = sorted((ROOT / "configs" / "quantized").glob("*.yaml"))


@pytest.mark.parametrize("task", ["commonsense", "math"])
@pytest.mark.parametrize("overlay", QUANTIZED, ids=lambda p: p.name)
def test_quantized_overlays_compose_with_the_reasoning_tasks(overlay, task, capsys):
    """configs/quantized: one GPU, W0 loaded in NF4 (rocoft_pl.quantized), at most 3 rows on the device."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(ROOT / f"configs/reasoning/{task}.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    assert (model["quantization"], model["quantization_options"]) == ("nf4-dq", {"compute_dtype": "bfloat16"})
    assert model["init_on_meta"] is False and printed["trainer"]["devices"] == 1
    assert printed["data"]["init_args"]["batch_size"] == 3 and printed["global_batch"]["size"] == {"commonsense": 9, "math": 16}[task]


# -- bad input: one clear line, the traceback in a file or behind ROCOFT_VERBOSE / --verbose --------------------
def run_rocoft(args, tmp_path, **env):
    """`rocoft ARGS` in a subprocess, stdout and stderr merged; temporary files (the traceback log) in tmp_path."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    drop = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ROCOFT_VERBOSE")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path / "tmp"), **env)
    return subprocess.run(
        [sys.executable, "-c", "from rocoft_pl.cli import main; main()", *args],
        cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )


def test_missing_data_prints_one_clear_line_and_logs_the_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    args = ["fit", "--config", str(tiny_config(tmp_path)), "--data.init_args.data_dir", str(missing)]
    proc = run_rocoft(args, tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert f"rocoft: error: data_dir: no such directory {missing}\n" in out
    assert "Traceback" not in out and len(out.splitlines()) < 10, out
    assert "ROCOFT_VERBOSE=1" in out
    (log,) = (tmp_path / "tmp").glob("rocoft-error-*.log")
    assert str(log) in out
    assert "Traceback (most recent call last)" in log.read_text() and "FileNotFoundError" in log.read_text()
    assert not (tmp_path / "run").exists()


def test_verbose_flag_shows_the_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    args = ["--verbose", "fit", "--config", str(tiny_config(tmp_path)), "--data.init_args.data_dir", str(missing)]
    proc = run_rocoft(args, tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stdout
    assert "FileNotFoundError: data_dir: no such directory" in proc.stdout
    assert "rocoft: error:" not in proc.stdout


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (["--data.init_args.data_dir", "EMPTY"], ["data_dir EMPTY", "['train', 'validation']"]),  # no data files
        # raised while jsonargparse builds the callback
        (["--trainer.callbacks.init_args.rank", "0"], ["RoCoFTConfig.rank must be an int >= 1, got 0"]),
        (["--model.init_args.learning_rate", "-1"], ["Invalid learning rate: -1.0"]),  # raised inside Trainer.fit
        # raised in RoCoFT.setup, before training
        (["--trainer.callbacks.init_args.adapter_dir", "FILE/adapter"],
         ["adapter_dir FILE/adapter cannot be created: FILE is not a directory"]),
    ],
    ids=["no-data-files", "rank-0", "negative-lr", "adapter-dir-under-a-file"],
)
def test_bad_input_in_process_is_one_line(tmp_path, capsys, monkeypatch, override, words):
    from rocoft_pl.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    paths = {"EMPTY": str(tmp_path / "empty"), "FILE": str(tmp_path / "file.txt")}

    def fill(text):
        for key, value in paths.items():
            text = text.replace(key, value)
        return text

    args = ["fit", "--config", str(tiny_config(tmp_path)), *map(fill, override)]
    monkeypatch.setattr(sys, "argv", ["rocoft"])
    monkeypatch.delenv("ROCOFT_VERBOSE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    (i,) = [i for i, line in enumerate(err.splitlines()) if line.startswith("rocoft: error: ")]
    first, second = err.splitlines()[i:i + 2]
    assert all(fill(w) in first for w in words), first
    assert second.startswith(f"(full traceback in {tmp_path}") and "ROCOFT_VERBOSE=1" in second
    assert not list((tmp_path / "run").glob("**/adapter_model.safetensors"))

    monkeypatch.setenv("ROCOFT_VERBOSE", "1")  # the original exception, traceback and all
    with pytest.raises((ValueError, OSError)):
        main(args)


def test_usage_errors_keep_jsonargparse_s_own_message(tmp_path, capsys, monkeypatch):
    from rocoft_pl.cli import main

    monkeypatch.setattr(sys, "argv", ["rocoft"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.callbacks.init_args.mode", "diagonal"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Got value: diagonal" in err and "rocoft: error:" not in err
    # a one-line usage above the error, not the generated one listing every option (about 50 lines)
    assert err.splitlines()[0].startswith("usage: rocoft fit [--config CONFIG]") and len(err.splitlines()) < 20


# -- preflight: every unreachable input in the one error, before the model loads ---------------------------------
def reasoning_config(tmp_path, model, train=("commonsense_170k",), evals=("boolq", "piqa", "winogrande")):
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    import tiny_causal_lm as tl

    config = {
        "model": {"class_path": "rocoft_pl.modules.causal_lm.CausalLMModule",
                  "init_args": {"model_name_or_path": str(model), "learning_rate": 1e-2, "warmup_steps": 1}},
        "data": {"class_path": "tasks.reasoning.ReasoningDataModule",
                 "init_args": {"train_datasets": list(train), "eval_datasets": list(evals), "batch_size": 2,
                               "data_files": {"winogrande": tl.DATASET_FILES["winogrande"]},
                               "cache_dir": str(tmp_path / "datasets")}},
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "reasoning.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_preflight_names_the_model_and_every_dataset_in_one_error_before_loading(tmp_path, capsys, monkeypatch):
    import datasets
    import transformers

    from rocoft_pl.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the preflight reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(sys, "argv", ["rocoft"])
    monkeypatch.delenv("ROCOFT_VERBOSE", raising=False)
    monkeypatch.delenv("ROCOFT_NO_PREFLIGHT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    missing = tmp_path / "no_model"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(reasoning_config(tmp_path, missing))])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rocoft: error: "))
    assert lines[start] == "rocoft: error: 4 inputs of this run cannot be reached (nothing was loaded):"
    problems = lines[start + 1:start + 5]
    assert problems[0].startswith(f"  - model {missing}: no such directory {missing}")
    assert "--model.init_args.model_name_or_path" in problems[0]
    for line, (name, hub) in zip(problems[1:], [("commonsense_170k", "zwhe99/commonsense_170k"),
                                                ("boolq", "google/boolq"), ("piqa", "ybisk/piqa")]):
        assert line.startswith(f"  - dataset {name}: hub {hub} is not in the datasets cache"), line
        assert f"--data.init_args.data_files '{{{name}: path/to/{name}.json}}'" in line
    assert "winogrande" not in "".join(problems)  # its local file is there
    assert any(line.startswith("All at once") for line in lines) and "ROCOFT_NO_PREFLIGHT=1" in err
    assert not (tmp_path / "run").exists()


def test_preflight_names_a_global_batch_that_does_not_split_over_the_devices(tmp_path, capsys, monkeypatch):
    from rocoft_pl.cli import main

    monkeypatch.delenv("ROCOFT_NO_PREFLIGHT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = reasoning_config(tmp_path, tmp_path / "no_model", train=("winogrande",), evals=("winogrande",))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.devices", "4", "--global_batch.size", "6"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "global batch size 6 does not split over 4 devices" in err and "nearest: 4 or 8" in err
    assert "model " in err  # reported together with the other problems


def test_preflight_passes_local_inputs_and_can_be_skipped(tmp_path, capsys, monkeypatch):
    from rocoft_pl.cli import RoCoFTCLI, main

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    import tiny_causal_lm as tl

    model = tmp_path / "tiny_llm"
    tl.tiny_llama().save_pretrained(model)
    tl.tiny_tokenizer().save_pretrained(model)
    monkeypatch.delenv("ROCOFT_NO_PREFLIGHT", raising=False)
    monkeypatch.setattr(sys, "argv", ["rocoft"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    local = reasoning_config(tmp_path, model, train=("winogrande",), evals=("winogrande",))
    cli = RoCoFTCLI(args=["--config", str(local), "--global_batch.size", "6"], run=False)  # preflight passes
    assert cli.model.model is not None and cli.datamodule.eval_datasets == ["winogrande"]  # model and data built
    from rocoft_pl import GlobalBatchSize

    assert [c.size for c in cli.trainer.callbacks if isinstance(c, GlobalBatchSize)] == [6]  # the CLI's group

    monkeypatch.setenv("ROCOFT_NO_PREFLIGHT", "1")  # skipped: the first failure is the model's own
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(reasoning_config(tmp_path, tmp_path / "no_model"))])
    assert "cannot be reached" not in capsys.readouterr().err
