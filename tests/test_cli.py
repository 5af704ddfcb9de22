"""The `rocoft` CLI: a real fit in a subprocess, every shipped config parses, clear errors for bad data."""

import os
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
FSDP = sorted((ROOT / "configs" / "fsdp").glob("*.yaml"))


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
    assert strategy.endswith("ModelParallelStrategy" if "fsdp2" in overlay.name else "FSDPStrategy")
    assert printed["trainer"]["precision"] == "bf16-true"
    assert printed["model"]["init_args"]["init_on_meta"] == ("fsdp2" in overlay.name)
    assert printed["trainer"]["callbacks"][-1]["init_args"]["train_bias"] is True  # the task's RoCoFT settings survive
