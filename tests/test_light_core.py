"""The light core (pyproject.toml: `pip install rocoft-pl` without extras): importing rocoft_pl and using the
callback imports no extra's package, the core works with every extra's package absent
(tests/scripts/without_packages.py), a missing extra is named in the error, and the CLIs' help is light."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rocoft_pl.extras import MissingExtraError, install_hint, require_extra

ROOT = Path(__file__).parent.parent
WITHOUT = str(ROOT / "tests" / "scripts" / "without_packages.py")
FIXTURES = ROOT / "tests" / "fixtures"
TINY_BERT = str(FIXTURES / "text_classification" / "tiny_bert")

# The import names of the extras' packages (pyproject.toml). torchmetrics is in `tasks` for its version bound, but
# Lightning itself depends on it and imports it, so it cannot be absent: it is left out of BLOCKABLE.
EXTRA_MODULES = {
    "tasks": ("datasets", "torchmetrics", "rouge_score", "accelerate"),
    "ntk": ("matplotlib",),
    "bench": ("pandas", "matplotlib", "peft", "lm_eval", "submitit"),
    "quant": ("bitsandbytes", "torchao"),
}
ALL_EXTRA_MODULES = sorted({m for mods in EXTRA_MODULES.values() for m in mods})
BLOCKABLE = [m for m in ALL_EXTRA_MODULES if m != "torchmetrics"]


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter, then report which of the extras' modules (and torch, lightning) it
    left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {ALL_EXTRA_MODULES + ['torch', 'lightning']!r} if m in sys.modules)))"
    proc = _python("-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_extras_in_pyproject_match_this_test():
    """EXTRA_MODULES is the test's copy of pyproject.toml's extras; `all` names every feature extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [re.split(r"[<>=\[]", d)[0] for d in core] == ["torch", "lightning", "transformers", "safetensors", "jsonargparse"]
    for extra, modules in EXTRA_MODULES.items():
        names = {re.split(r"[<>=\[;]", d)[0].replace("-", "_") for d in extras[extra]}
        assert set(modules) <= names, (extra, names)
    assert extras["all"] == ["rocoft-pl[tasks,ntk,bench,quant]"]


def test_import_rocoft_pl_imports_neither_torch_nor_an_extra():
    """Every public name is lazy: `import rocoft_pl`, its CLI module and the benchmark's CLI import no torch."""
    assert _modules_after("import rocoft_pl, rocoft_pl.cli, rocoft_pl.extras, benchmark.cli") == set()


def test_the_callback_imports_no_extra_of_its_own(tmp_path):
    """What the core's own dependencies import is the baseline (Lightning imports torchmetrics, which imports
    matplotlib when it is installed; transformers imports torchao when it is installed and a model loads);
    rocoft_pl's callback, layers and adapter files add no extra's package to it."""
    code = (
        "import sys, lightning.pytorch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({TINY_BERT!r})\n"
        f"before = {{m for m in {ALL_EXTRA_MODULES!r} if m in sys.modules}}\n"
        "from rocoft_pl import RoCoFT, RoCoFTConfig, apply_rocoft, save_adapter, load_adapter, merge_rocoft\n"
        "import rocoft_pl.cli, rocoft_pl.lightning_cli\n"
        "RoCoFT(mode='row', rank=1)\n"
        "apply_rocoft(model, RoCoFTConfig(rank=1))\n"
        f"save_adapter(model, {str(tmp_path / 'adapter')!r})\n"
        f"load_adapter(AutoModelForSequenceClassification.from_pretrained({TINY_BERT!r}), {str(tmp_path / 'adapter')!r})\n"
        "merge_rocoft(model)\n"
        f"added = {{m for m in {ALL_EXTRA_MODULES!r} if m in sys.modules}} - before\n"
        "assert not added, added\n"
    )
    _modules_after(code)


FIT_WITHOUT_EXTRAS = """
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from rocoft_pl import RoCoFT, RoCoFTConfig, apply_rocoft, load_adapter, merge_rocoft, rocoft_layers


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


out = Path(tempfile.mkdtemp())
data = DataLoader(TensorDataset(torch.randn(16, 8), torch.arange(16) % 2), batch_size=4)
callback = RoCoFT(mode="row", rank=1, targets=["model.0"], adapter_dir=str(out / "adapter"))
trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
trainer.fit(Tiny(), data)
fresh = Tiny()
load_adapter(fresh, str(out / "adapter"))
assert len(rocoft_layers(fresh)) == 1

from transformers import AutoModelForSequenceClassification  # a Hugging Face model, as transformers loads it here

bert = AutoModelForSequenceClassification.from_pretrained(TINY_BERT)
apply_rocoft(bert, RoCoFTConfig(rank=1))
merge_rocoft(bert)
print("fit without extras: ok")
"""


def test_the_callback_trains_and_saves_with_every_extra_absent():
    proc = _python(WITHOUT, ",".join(BLOCKABLE), "-c", f"TINY_BERT = {TINY_BERT!r}\n{FIT_WITHOUT_EXTRAS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit without extras: ok" in proc.stdout


def test_rocoft_help_works_with_every_extra_absent():
    proc = _python(WITHOUT, ",".join(BLOCKABLE), "-m", "rocoft_pl.cli", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export-lora" in proc.stdout and "fit" in proc.stdout


def test_require_extra_names_the_extra():
    assert require_extra("json", "tasks") is json
    with pytest.raises(MissingExtraError, match=re.escape(install_hint("tasks"))) as err:
        require_extra("rocoft_no_such_package.sub", "tasks")
    assert isinstance(err.value, ModuleNotFoundError)  # existing `except ImportError` still catch it
    assert err.value.name == "rocoft_no_such_package"
    assert install_hint("bench") == "pip install 'rocoft-pl[bench]'"


def test_require_extra_lets_other_import_errors_through(tmp_path, monkeypatch):
    """A package that is installed but fails to import is not reported as a missing extra."""
    (tmp_path / "rocoft_broken_pkg.py").write_text("raise ImportError('broken build')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="broken build") as err:
        require_extra("rocoft_broken_pkg", "tasks")
    assert not isinstance(err.value, MissingExtraError)


def test_a_task_without_datasets_names_the_tasks_extra():
    code = (
        "from tasks.glue import GLUEDataModule\n"
        f"dm = GLUEDataModule(task='rte', data_dir={str(FIXTURES / 'glue' / 'rte')!r}, "
        f"tokenizer_name_or_path={TINY_BERT!r})\n"
        "dm.setup('fit')\n"
    )
    proc = _python(WITHOUT, "datasets", "-c", code)
    assert proc.returncode != 0
    assert "MissingExtraError" in proc.stderr and "pip install 'rocoft-pl[tasks]'" in proc.stderr, proc.stderr[-2000:]


def test_rocoft_fit_without_datasets_is_one_line_naming_the_extra(tmp_path):
    from test_cli import tiny_config

    proc = _python(WITHOUT, "datasets", "-m", "rocoft_pl.cli", "fit", "--config", str(tiny_config(tmp_path)))
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rocoft: error:")]
    assert len(errors) == 1 and "pip install 'rocoft-pl[tasks]'" in errors[0], proc.stderr[-3000:]


def test_rocoft_bench_table_without_pandas_names_the_bench_extra(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("")
    proc = _python(WITHOUT, "pandas", "-m", "benchmark.cli", "table", str(results))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("rocoft-bench: error: pandas is not installed")
    assert "pip install 'rocoft-pl[bench]'" in proc.stderr


# -- the CLIs' help ----------------------------------------------------------------------------------------
def test_rocoft_top_level_help_lists_what_lightning_cli_does(capsys, monkeypatch):
    """`rocoft --help` is ours (no Lightning import); it must still list every top-level option and subcommand
    of the LightningCLI it stands for."""
    from rocoft_pl.cli import SUBCOMMAND_HELP, top_level_parser
    from rocoft_pl.lightning_cli import RoCoFTCLI

    monkeypatch.setattr(sys, "argv", ["rocoft"])  # not pytest's arguments (LightningCLI warns about both)
    with pytest.raises(SystemExit):
        RoCoFTCLI(args=["--help"])
    lightning_help = capsys.readouterr().out
    ours = top_level_parser().format_help()
    assert set(re.findall(r"--\w+", lightning_help)) <= set(re.findall(r"--\w+", ours))
    assert set(RoCoFTCLI.subcommands()) | {"export-lora"} == set(SUBCOMMAND_HELP)


def test_rocoft_help_and_subcommand_help(capsys, monkeypatch):
    from rocoft_pl.cli import main, wants_top_level_help

    monkeypatch.setattr(sys, "argv", ["rocoft"])

    assert wants_top_level_help(["--help"]) and wants_top_level_help(["--config", "x.yaml", "-h"])
    assert not wants_top_level_help(["fit", "--help"]) and not wants_top_level_help([])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "export-lora" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])  # LightningCLI's own, with every option
    assert exit_.value.code == 0 and "--trainer.max_steps" in capsys.readouterr().out


def test_bench_command_table_matches_the_modules():
    """benchmark.cli.COMMANDS (what `rocoft-bench --help` lists without importing) is what the modules register."""
    import argparse

    from benchmark.cli import COMMANDS, build_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, str]:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a.help for a in action._choices_actions}

    assert commands(build_parser()) == {name: text for name, (_, text) in COMMANDS.items()}
    for name, (module, _) in COMMANDS.items():
        assert name in commands(build_parser([module])), (name, module)


def test_a_bench_command_imports_only_its_module():
    loaded = "import sys\nprint([m for m in ('torch', 'benchmark.efficiency', 'benchmark.memory') if m in sys.modules])"
    for argv in (["--help"], ["table", "--help"], ["adapter-diff", "--help"]):
        proc = _python("-m", "benchmark.cli", *argv)
        assert proc.returncode == 0, proc.stderr[-2000:]
    code = "from benchmark.cli import parser_for\nparser_for(['table', 'results.jsonl'])\nparser_for(['--help'])\n"
    proc = _python("-c", code + loaded)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
