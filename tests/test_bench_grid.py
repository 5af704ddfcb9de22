"""`rocoft-bench run` end to end on a tiny grid: subprocess cells, resume, a failing cell, the table."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from benchmark.faults import TINY_BASE
from benchmark.grid import load_grid
from benchmark.results import read_results

FIXTURES = Path(__file__).parent / "fixtures" / "text_classification"
BASE = TINY_BASE


def write_grid(tmp_path, methods):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {
        "name": "tiny",
        "base_config": str(tmp_path / "base.yaml"),
        "results": str(tmp_path / "out" / "results.jsonl"),
        "seeds": [1, 2],
        "models": {"tiny-bert": {}},
        "tasks": {"tweets": {"primary_metrics": ["val/accuracy"]}},
        "methods": methods,
        "timeout_s": 300,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "benchmark.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_tiny_grid_runs_resumes_and_records_failures(tmp_path):
    methods = {
        "rocoft-row-r1": {"method": "rocoft-row", "params": {"rank": 1}, "label": "RoCoFT 1-Row"},
        "bitfit": {"method": "bitfit"},
        # rank exceeds every dimension: fails in setup
        "broken": {"method": "rocoft-column", "params": {"rank": 100000}, "seeds": [1]},
    }
    grid = write_grid(tmp_path, methods)
    proc = bench("run", str(grid), "--jobs", "2", "--table")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = {r["cell_id"]: r for r in read_results(tmp_path / "out" / "results.jsonl")}
    assert len(records) == 5
    ok = [r for r in records.values() if r["status"] == "ok"]
    failed = [r for r in records.values() if r["status"] != "ok"]
    assert len(ok) == 4 and len(failed) == 1
    assert all("exceeds" in r["error"] for r in failed)
    for r in ok:
        assert 0.0 <= r["metrics"]["val/accuracy"] <= 1.0
        assert r["adapter_params"] > 0 and r["head_params"] > 0 and r["adapter_bytes"] > 0
        assert r["peak_memory_bytes"] > 0 and r["train_batches"] == 2
        assert r["versions"]["torch"]
    rocoft = [r for r in ok if r["method"] == "rocoft-row"]
    assert rocoft[0]["adapter_params"] == rocoft[1]["adapter_params"]
    assert "RoCoFT 1-Row" in proc.stdout and "| Method | #TTPs | tweets | Avg. |" in proc.stdout

    # Resume: finished cells are skipped, failed ones retried (and fail again), nothing is duplicated.
    again = bench("run", str(grid))
    assert "skipping 4 finished cell(s)" in again.stdout + again.stderr
    after = read_results(tmp_path / "out" / "results.jsonl")
    assert len(after) == 5
    assert {r["cell_id"]: r["metrics"] for r in after if r["status"] == "ok"} == {c: r["metrics"] for c, r in records.items() if r["status"] == "ok"}

    table = bench("table", str(tmp_path / "out" / "results.jsonl"))
    assert table.returncode == 0 and (tmp_path / "out" / "leaderboard.csv").exists()

    # Reproducible: the same cell run again into another results file gives the same metrics.
    repro = write_grid(tmp_path, {"rocoft-row-r1": {"method": "rocoft-row", "params": {"rank": 1}, "label": "RoCoFT 1-Row", "seeds": [2]}})
    assert bench("run", str(repro), "--results", str(tmp_path / "b.jsonl")).returncode == 0
    (again_cell,) = read_results(tmp_path / "b.jsonl")
    assert again_cell["metrics"] == records[again_cell["cell_id"]]["metrics"]


def test_grid_spec_errors_name_the_field(tmp_path):
    import pytest

    bad = write_grid(tmp_path, {"x": {"method": "dora"}})
    with pytest.raises(ValueError, match="methods.x.method"):
        load_grid(bad)
    spec = yaml.safe_load(bad.read_text())
    spec["sedes"] = [1]
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="unknown grid keys.*sedes"):
        load_grid(bad)


def test_seeds_override_replaces_grid_and_method_seeds_and_keeps_config_hashes(tmp_path):
    grid = write_grid(tmp_path, {"row": {"method": "rocoft-row", "params": {"rank": 1}}, "bitfit": {"method": "bitfit", "seeds": [7]}})
    plain = {c.cell_id: c.config_hash for c in load_grid(grid).cells}
    more = load_grid(grid, seeds=[1, 2, 3]).cells
    assert sorted((c.method, c.seed) for c in more) == [("bitfit", s) for s in (1, 2, 3)] + [("rocoft-row", s) for s in (1, 2, 3)]
    # Cells that already existed keep their hash, so `--seeds` resumes a finished grid instead of redoing it.
    for c in more:
        if c.cell_id in plain:
            assert plain[c.cell_id] == c.config_hash
    assert {c.config["seed_everything"] for c in more} == {1, 2, 3}


def test_every_shipped_grid_parses():
    root = Path(__file__).parents[1]
    grids = sorted((root / "configs" / "bench").glob("*.yaml"))
    assert grids
    for path in grids:
        grid = load_grid(path)
        assert grid.cells, path
        json.dumps([c.to_dict() for c in grid.cells], default=str)


def test_task_method_params_apply_to_that_method_kind_and_the_method_wins(tmp_path):
    import pytest

    grid = write_grid(tmp_path, {
        "row": {"method": "rocoft-row", "params": {"rank": 3}},
        "row-first": {"method": "rocoft-row", "params": {"rank": 3, "selection": "first"}},
        "lora": {"method": "lora", "params": {"r": 8}},
    })
    spec = yaml.safe_load(grid.read_text())
    spec["tasks"]["tweets"]["method_params"] = {"rocoft-row": {"selection": "min", "train_bias": True}}
    grid.write_text(yaml.safe_dump(spec))
    params = {c.method_label: c.method_params for c in load_grid(grid).cells}
    assert params["row"] == {"rank": 3, "selection": "min", "train_bias": True}
    assert params["row-first"] == {"rank": 3, "selection": "first", "train_bias": True}
    assert params["lora"] == {"r": 8}

    spec["tasks"]["tweets"]["method_params"] = {"dora": {}}
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="tasks.tweets.method_params"):
        load_grid(grid)


def test_paper_glue_grid_cells_are_valid_cli_configs():
    """Every task's cell of the Table 1 preset instantiates through the CLI (keys and values type-check),
    pointed at the local GLUE fixtures and the tiny BERT instead of the hub."""
    from benchmark.cell import cli_class
    from benchmark.methods import method_callback

    root = Path(__file__).parents[1]
    seen = set()
    for cell in load_grid(root / "configs" / "bench" / "table1.yaml").cells:
        if cell.task in seen or not cell.method.startswith("rocoft"):
            continue
        seen.add(cell.task)
        config = cell.config
        config["model"]["init_args"]["model_name_or_path"] = str(FIXTURES / "tiny_bert")
        config["data"]["init_args"]["data_dir"] = str(Path(__file__).parent / "fixtures" / "glue" / cell.task)
        cli = cli_class()(args=config, run=False, save_config_callback=None,
                          trainer_defaults={"callbacks": [method_callback(cell.method, **cell.method_params)]})
        assert cli.datamodule.task == cell.task
        assert cli.model.hparams.learning_rate == config["model"]["init_args"]["learning_rate"]
    assert seen == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}


def test_dict_valued_overrides_are_not_shared_between_cells(tmp_path):
    grid = write_grid(tmp_path, {
        "a": {"method": "bitfit", "overrides": {"model.init_args.learning_rate": 0.1}},
        "b": {"method": "bitfit"},
    })
    spec = yaml.safe_load(grid.read_text())
    spec["tasks"]["tweets"]["overrides"] = {"model": BASE["model"]}
    grid.write_text(yaml.safe_dump(spec))
    lrs = {c.method_label: c.config["model"]["init_args"]["learning_rate"] for c in load_grid(grid).cells}
    assert lrs == {"a": 0.1, "b": 1e-3}


def test_cells_record_learning_curves_and_table_draws_them(tmp_path):
    grid = write_grid(tmp_path, {"rocoft-row-r1": {"method": "rocoft-row", "params": {"rank": 1}, "seeds": [1],
                                                   "overrides": {"trainer.val_check_interval": 1}}})
    proc = bench("run", str(grid), "--table")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = read_results(tmp_path / "out" / "results.jsonl")
    curve = record["curve"]
    assert [p["step"] for p in curve] == [1, 2]  # one point per validation during fit
    assert 0 < curve[0]["train_s"] < curve[1]["train_s"] <= record["train_time_s"] + 1e-6
    assert all(0.0 <= p["metrics"]["val/accuracy"] <= 1.0 for p in curve)
    assert curve[-1]["metrics"]["val/accuracy"] == record["metrics"]["val/accuracy"]  # the final validate agrees
    out = tmp_path / "out"
    assert (out / "curves.csv").exists() and (out / "curves_tiny-bert_tweets.png").exists()
    assert "steps_to_95%_of_full" in proc.stdout  # the curves summary is printed with the leaderboard
