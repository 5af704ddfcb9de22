"""The RoCoFT callback configured in LightningCLI YAML under trainer.callbacks (tests/scripts/cli_fit.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning.pytorch.cli import LightningCLI

from rocoft_pl import RoCoFT

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import cli_fit  # noqa: E402,F401  (the YAML names cli_fit.TinyClassifier)

DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK",
            "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(SCRIPTS.parents[1])])
    return env


def write_config(tmp_path: Path, run_dir: Path, **rocoft) -> Path:
    init_args = {"mode": "column", "rank": 2, "selection": "max", "calibration_batches": 2,
                 "adapter_dir": str(run_dir / "adapter"), **rocoft}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir),
            "callbacks": [{"class_path": "rocoft_pl.RoCoFT", "init_args": init_args}],
        },
        "model": {"class_path": "cli_fit.TinyClassifier", "init_args": {"lr": 0.01}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_with_rocoft_from_yaml_writes_adapter_and_report(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir)
    cmd = [sys.executable, str(SCRIPTS / "cli_fit.py"), "fit", "--config", str(config)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "RoCoFT (column, r=2, selection=max)" in output
    assert "RoCoFT parameters:" in output and "trainable parameters:" in output
    assert "max_steps=2` reached" in output
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert adapter["config"]["mode"] == "column" and adapter["config"]["selection"] == "max"
    assert adapter["base_model"]["architecture"] == "BertForSequenceClassification"
    assert adapter["saved_modules"] == ["classifier"]  # the head was auto-detected and trained
    assert len(adapter["targets"]) == 12
    # the config LightningCLI saved keeps the callback, so the run can be repeated from it
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    callbacks = saved["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == ["RoCoFT"]
    assert callbacks[0]["init_args"]["rank"] == 2


def test_saved_style_yaml_instantiates_the_callback_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli_fit.py"])  # LightningCLI warns when pytest's argv is there too
    cli = LightningCLI(
        args=["--config", str(write_config(tmp_path, tmp_path / "run", targets=["query", "value"]))],
        run=False, save_config_kwargs={"overwrite": True},
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RoCoFT)]
    assert callback.config.mode == "column" and callback.config.targets == ["query", "value"]
    assert callback.calibration_batches == 2


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("mode", "diagonal", ['Parser key "mode"', "'row', 'column', 'entries'", "Got value: diagonal"]),
     ("selection", "wanda", ['Parser key "selection"', "'first', 'random', 'max', 'min', 'mixed'"]),
     ("rank", 0, ["RoCoFTConfig.rank", "int >= 1"]),
     ("calibration_batches", 0, ["calibration_batches must be >= 1"])],
)
def test_bad_value_in_yaml_fails_naming_the_field(tmp_path, capsys, monkeypatch, field, value, words):
    """mode / selection are Literals: rejected while parsing (usage error). rank / calibration_batches are
    checked when the callback is built: jsonargparse raises, with RoCoFT's message among its errors."""
    monkeypatch.setattr(sys, "argv", ["cli_fit.py"])
    config = write_config(tmp_path, tmp_path / "run", **{field: value})
    with pytest.raises((SystemExit, ValueError)) as exc:
        LightningCLI(args=["--config", str(config)], run=False, save_config_kwargs={"overwrite": True})
    message = str(exc.value) + capsys.readouterr().err
    for word in words:
        assert word in message, message[-2000:]
    assert not (tmp_path / "run").exists()


def test_bad_value_from_the_command_line_exits_with_the_message(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", mode="diagonal")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "cli_fit.py"), "fit", "--config", str(config)],
        env=_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # argparse's usage-error status
    assert 'Parser key "mode"' in proc.stderr and "Got value: diagonal" in proc.stderr, proc.stderr[-3000:]
    assert "Literal['row', 'column', 'entries', 'both']" in proc.stderr
    assert "Traceback" not in proc.stderr  # a usage error, not a crash
    assert not (tmp_path / "run").exists()
