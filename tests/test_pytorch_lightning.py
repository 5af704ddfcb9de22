"""RoCoFT in a project that imports ``pytorch_lightning`` (the standalone package) instead of ``lightning.pytorch``:
Python (Trainer, every selection, a lazy backbone) and YAML (``pytorch_lightning.cli.LightningCLI``).
The project is tests/scripts/ptl_fit.py."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pl = pytest.importorskip("pytorch_lightning")

from rocoft_pl import RoCoFT, load_adapter, rocoft_layers  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import ptl_fit  # noqa: E402  (the YAML names ptl_fit.TinyClassifierWithData)

DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK",
            "MASTER_ADDR", "MASTER_PORT")


def test_one_callback_class_for_both_namespaces():
    import lightning.pytorch as lp

    assert pl.Callback is not lp.Callback  # two distinct class trees
    assert issubclass(RoCoFT, pl.Callback) and issubclass(RoCoFT, lp.Callback)


def counted(callback, hooks=("setup", "on_fit_end")):
    """Wrap the callback's hooks on the instance (the Trainer looks them up there) to count the calls."""
    calls = collections.Counter()
    for hook in hooks:
        original = getattr(callback, hook)

        def wrapper(*args, _hook=hook, _original=original, **kwargs):
            calls[_hook] += 1
            return _original(*args, **kwargs)

        setattr(callback, hook, wrapper)
    return calls


def ptl_trainer(tmp_path, callback, **kw):
    return pl.Trainer(
        callbacks=[callback], max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu", **kw,
    )


# Each selection, with the training data where a pytorch_lightning project may keep it (Wanda calibrates on it).
CASES = {
    "first": ("loader", ptl_fit.TinyClassifier),
    "random": ("loader", ptl_fit.TinyClassifier),
    "max": ("datamodule", ptl_fit.TinyClassifier),
    "min": ("module", ptl_fit.TinyClassifierWithData),
    "mixed": ("loader", ptl_fit.TinyClassifier),
}


@pytest.mark.parametrize("selection", list(CASES))
def test_trainer_fit_with_every_selection(tmp_path, selection):
    source, cls = CASES[selection]
    module = cls()
    frozen = module.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    cb = RoCoFT(rank=2, selection=selection, calibration_batches=2, adapter_dir=str(tmp_path / "adapter"))
    calls = counted(cb)
    t = ptl_trainer(tmp_path, cb)
    if source == "loader":
        t.fit(module, ptl_fit.tiny_loader())
    elif source == "datamodule":
        t.fit(module, datamodule=ptl_fit.TinyData())
    else:
        t.fit(module)
    assert calls == {"setup": 1, "on_fit_end": 1}  # each hook once, not once per base class
    assert module.steps_run == 3
    layers = rocoft_layers(module)
    assert len(layers) == 12
    layer = module.model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(layer.base.weight, frozen) and layer.delta.abs().sum() > 0
    chosen = {n: sorted(l.indices.tolist()) for n, l in layers.items()}
    if selection == "first":
        assert all(v == [0, 1] for v in chosen.values())
    else:
        assert any(v != [0, 1] for v in chosen.values())  # random / Wanda did not fall back to the first rows
    fresh = ptl_fit.tiny_bert()
    load_adapter(fresh, tmp_path / "adapter")
    batch = next(iter(ptl_fit.tiny_loader()))
    module.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(**batch).logits, module.model(**batch).logits)


def test_lazy_backbone_in_configure_model_with_wanda(tmp_path):
    module = ptl_fit.LazyClassifier()
    cb = RoCoFT(rank=2, mode="column", selection="max", calibration_batches=2)
    ptl_trainer(tmp_path, cb).fit(module, ptl_fit.tiny_loader())
    assert len(rocoft_layers(module)) == 12 and module.steps_run == 3
    # validate again: setup is idempotent in this namespace too
    ptl_trainer(tmp_path, cb).validate(module, ptl_fit.tiny_loader())
    assert len(rocoft_layers(module)) == 12


def write_config(tmp_path: Path, run_dir: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run_dir),
            "callbacks": [{"class_path": "rocoft_pl.RoCoFT", "init_args": {
                "mode": "row", "rank": 2, "selection": "mixed", "calibration_batches": 2,
                "adapter_dir": str(run_dir / "adapter")}}],
        },
        "model": {"class_path": "ptl_fit.TinyClassifierWithData", "init_args": {"lr": 0.01}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pytorch_lightning_cli_accepts_the_callback_class_path(tmp_path, monkeypatch):
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["ptl_fit.py"])
    cli = LightningCLI(args=["--config", str(write_config(tmp_path, tmp_path / "run"))], run=False,
                       save_config_kwargs={"overwrite": True})
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, RoCoFT)]
    assert callback.config.selection == "mixed" and callback.config.rank == 2


def test_pytorch_lightning_cli_fit_from_yaml_in_a_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(SCRIPTS.parents[1])])
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "ptl_fit.py"), "fit", "--config", str(write_config(tmp_path, run_dir))],
        env=env, capture_output=True, text=True, timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "RoCoFT (row, r=2, selection=mixed) on 12 layers" in output and "trainable parameters:" in output
    assert "max_steps=2` reached" in output
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["config"]["selection"] == "mixed" and len(adapter["targets"]) == 12
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["class_path"].endswith("RoCoFT")
