"""`rocoft-bench run`'s harness: checks before any cell starts, no orphan cells, claims, damaged store lines."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_bench_grid import write_grid

from benchmark import claims, runner
from benchmark.cli import main as bench_main
from benchmark.grid import GridError, load_grid
from benchmark.orphans import process_start
from benchmark.results import read_results, read_store, upsert_result

# -- checks before work starts -------------------------------------------------------------------------------


def test_a_bad_grid_lists_every_problem_and_starts_no_cell(tmp_path, capsys):
    grid = write_grid(tmp_path, {
        "typo": {"method": "bitfit", "overrides": {"model.init_args.learnig_rate": 1e-3}},
        "wrong-type": {"method": "bitfit", "overrides": {"data.init_args.batch_size": "four"}},
        "zero-lr": {"method": "bitfit", "overrides": {"model.init_args.learning_rate": 0}},
        "row": {"method": "rocoft-row", "params": {"rnak": 1}},
        "lora": {"method": "lora", "params": {"rr": 8}},
        "neg-lr": {"method": "lora", "params": {"r": 8}, "overrides": {"model.init_args.head_learning_rate": -1.0}},
    })
    started = time.perf_counter()
    with pytest.raises(GridError) as err:
        runner.run_grid(grid)
    message = str(err.value)
    assert time.perf_counter() - started < 60
    assert "tiny-bert|tweets|typo|seed=1 (and 1 more cell(s) like it): config:" in message
    assert "learnig_rate" in message
    assert "batch_size" in message and "four" in message
    assert "zero-lr|seed=1 (and 1 more cell(s) like it): config model.init_args.learning_rate must be a number > 0, got 0" in message
    assert "neg-lr|seed=1 (and 1 more cell(s) like it): config model.init_args.head_learning_rate must be a number > 0, got -1.0" in message
    assert "rnak" in message and "method 'row' (rocoft-row)" in message
    assert "lora takes no param(s) ['rr']" in message
    assert not (tmp_path / "out").exists()  # no cell dir, no results file: nothing started

    # The command line says it in one message, exit status 2, no traceback.
    assert bench_main(["run", str(grid)]) == 2
    err_text = capsys.readouterr().err
    assert "rocoft-bench run: error: grid tiny:" in err_text and "Traceback" not in err_text


def test_distinct_configs_are_parsed_once(tmp_path):
    """Cells that differ only in seed or method share one parse (a 60-cell grid parses only its configs)."""
    from benchmark.validate import _parse_only_parser, validate_grid

    grid = load_grid(write_grid(tmp_path, {
        "row": {"method": "rocoft-row", "params": {"rank": 1}},
        "bitfit": {"method": "bitfit"},
        "lora": {"method": "lora", "params": {"r": 2}, "overrides": {"model.init_args.learning_rate": 2e-3}},
    }), seeds=[1, 2, 3])
    parser = _parse_only_parser()
    parsed = []
    real = parser.parse_object
    parser.parse_object = lambda cfg, *a, **k: parsed.append(cfg) or real(cfg, *a, **k)
    validate_grid(grid, parser)
    assert len(grid.cells) == 9 and len(parsed) == 2


def test_duplicated_yaml_keys_seeds_and_labels_are_errors(tmp_path):
    grid = write_grid(tmp_path, {"bitfit": {"method": "bitfit"}, "full": {"method": "full"}})
    text = grid.read_text()
    grid.write_text(text.replace("timeout_s: 300", "timeout_s: 300\nseeds: [3]"))
    with pytest.raises(ValueError, match=r"grid.yaml is not valid YAML.*duplicate key 'seeds'.*line \d+"):
        load_grid(grid)

    spec = yaml.safe_load(text)
    spec["seeds"] = [1, 2, 1]
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'seeds' gives seed\(s\) \[1\] more than once"):
        load_grid(grid)
    with pytest.raises(ValueError, match=r"--seeds gives seed\(s\) \[4\]"):
        load_grid(grid, seeds=[4, 4])

    spec["seeds"] = [1]
    spec["methods"]["bitfit"]["seeds"] = [2, 2]
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"methods.bitfit.seeds gives seed\(s\) \[2\]"):
        load_grid(grid)

    del spec["methods"]["bitfit"]["seeds"]
    spec["methods"]["full"]["label"] = "bitfit"
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"methods.bitfit and methods.full have the same label 'bitfit'"):
        load_grid(grid)

    base = tmp_path / "base.yaml"
    base.write_text(base.read_text() + "seed_everything: 1\nseed_everything: 2\n")
    spec["methods"]["full"]["label"] = "Full"
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"base.yaml is not valid YAML.*duplicate key 'seed_everything'"):
        load_grid(grid)


# -- no orphans ----------------------------------------------------------------------------------------------


def _cells_of(tmp_path):
    """pids of `python -m benchmark.cell` processes working in tmp_path."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"benchmark.cell" in cmd and str(tmp_path).encode() in cmd and process_start(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_runner_kills_its_cell(tmp_path):
    grid = write_grid(tmp_path, {"bitfit": {"method": "bitfit", "seeds": [1]}})
    spec = yaml.safe_load(grid.read_text())
    spec["overrides"] = {"trainer.max_steps": 1_000_000}  # trains for minutes
    grid.write_text(yaml.safe_dump(spec))
    log = open(tmp_path / "runner.log", "w")
    bench = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "run", str(grid)], stdout=log, stderr=log)
    cells = []
    try:
        deadline = time.monotonic() + 240
        while not cells and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
            cells = _cells_of(tmp_path)
        assert cells, (tmp_path / "runner.log").read_text()
        time.sleep(1.0)
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        deadline = time.monotonic() + 10
        while _cells_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cells_of(tmp_path) == [], "the cell outlived its runner"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in _cells_of(tmp_path):
            os.kill(pid, signal.SIGKILL)
        log.close()


# -- claims --------------------------------------------------------------------------------------------------


class FakeCells:
    """run_one without a subprocess: counts runs per cell and takes a moment, like a short cell."""

    def __init__(self, seconds=0.4):
        self.seconds, self.runs, self.lock = seconds, [], threading.Lock()

    def __call__(self, grid, cell, device=None, claim=None, live=None):
        with self.lock:
            self.runs.append(cell.cell_id)
        time.sleep(self.seconds)
        record = {k: v for k, v in cell.to_dict().items() if k != "config"}
        return {**record, "status": "ok", "error": None, "metrics": {"val/accuracy": 0.5}, "grid": grid.name,
                "wall_s": self.seconds}


def _grid(tmp_path):
    return write_grid(tmp_path, {"bitfit": {"method": "bitfit"}, "full": {"method": "full"}})  # 4 cells


def test_two_runners_on_one_grid_run_each_cell_once(tmp_path, monkeypatch):
    cells = FakeCells()
    monkeypatch.setattr(runner, "run_one", cells)
    monkeypatch.setattr(runner, "POLL_S", 0.1)
    grid = _grid(tmp_path)
    written, errors = [], []

    def run():
        try:
            written.append(runner.run_grid(grid))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    ids = [c.cell_id for c in load_grid(grid).cells]
    assert sorted(cells.runs) == sorted(ids)  # each cell ran exactly once
    assert sorted(r["cell_id"] for w in written for r in w) == sorted(ids)
    assert sorted(r["cell_id"] for r in read_results(tmp_path / "out" / "results.jsonl")) == sorted(ids)
    assert not list((tmp_path / "out" / "cells").glob("*/claim.json"))  # released


def _write_claim(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    data = {"host": claims.Runner().host, "runner_id": "someone-else", "started": time.time() - 60,
            "cell_pid": None, "cell_start": None, **fields}
    (directory / claims.CLAIM).write_text(json.dumps(data))


def test_stale_claims_are_taken_over_and_their_leftover_cell_killed(tmp_path, monkeypatch):
    cells = FakeCells(0.05)
    monkeypatch.setattr(runner, "run_one", cells)
    grid_path = _grid(tmp_path)
    grid = load_grid(grid_path)
    first, second = grid.cells[0], grid.cells[1]
    dead = subprocess.Popen(["true"])
    dead.wait()  # a runner that died
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)  # its cell, still running
    try:
        _write_claim(runner.cell_dir(grid, first), runner_pid=dead.pid, runner_start=None,
                     cell_pid=leftover.pid, cell_start=process_start(leftover.pid))
        # A live pid that now names another process (pid reuse): its start time differs.
        _write_claim(runner.cell_dir(grid, second), runner_pid=os.getpid(), runner_start=process_start(os.getpid()) - 1)
        written = runner.run_grid(grid_path)
        assert leftover.wait(timeout=10) == -signal.SIGKILL
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    assert sorted(cells.runs) == sorted(c.cell_id for c in grid.cells) and len(written) == 4
    assert not list((tmp_path / "out" / "cells").glob("*/claim.json"))


def test_a_cell_claimed_by_a_live_runner_is_left_to_it_and_waited_for(tmp_path, monkeypatch, capsys):
    cells = FakeCells(0.05)
    monkeypatch.setattr(runner, "run_one", cells)
    monkeypatch.setattr(runner, "POLL_S", 0.1)
    grid_path = _grid(tmp_path)
    grid = load_grid(grid_path)
    theirs = grid.cells[0]
    directory = runner.cell_dir(grid, theirs)
    _write_claim(directory, runner_pid=os.getpid(), runner_start=process_start(os.getpid()))  # alive
    store = tmp_path / "out" / "results.jsonl"
    done = []
    thread = threading.Thread(target=lambda: done.append(runner.run_grid(grid_path)))
    thread.start()
    deadline = time.monotonic() + 60
    while len(cells.runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert thread.is_alive()  # waiting for the other runner's cell
    # The other runner records its cell (a failure, even) and releases its claim.
    upsert_result(store, {**{k: v for k, v in theirs.to_dict().items() if k != "config"}, "status": "failed",
                          "error": "elsewhere", "metrics": {}})
    (directory / claims.CLAIM).unlink()
    thread.join(30)
    assert not thread.is_alive()
    assert theirs.cell_id not in cells.runs and len(cells.runs) == 3 and len(done[0]) == 3
    out = capsys.readouterr()
    assert "waiting for 1 cell(s) claimed by another runner" in out.out + out.err
    assert "1 cell(s) were recorded by another runner" in out.err


# -- damaged lines -------------------------------------------------------------------------------------------


def test_damaged_lines_are_set_aside_by_run_and_only_reported_by_table(tmp_path, monkeypatch, capsys):
    grid_path = _grid(tmp_path)
    store = tmp_path / "out" / "results.jsonl"
    store.parent.mkdir()
    good = []
    for i, cell in enumerate(load_grid(grid_path).cells):
        good.append({**{k: v for k, v in cell.to_dict().items() if k != "config"}, "status": "ok", "error": None,
                     "metrics": {"val/accuracy": 0.5 + i / 10}, "adapter_params": 10 * (i + 1)})
    lines = [json.dumps(r) for r in good]
    # A garbage middle line (binary junk of a disk-full write) and a truncated last line (no newline).
    damaged = b"\x00\x00\xffgarbage{"
    body = "\n".join(lines[:2]).encode() + b"\n" + damaged + b"\n" + "\n".join(lines[2:]).encode() + b"\n"
    store.write_bytes(body + lines[0][:25].encode())
    original = store.read_bytes()

    # table reads only: warns with the line numbers, leaves the store and writes no .damaged.
    assert bench_main(["table", str(store)]) == 0
    err = capsys.readouterr().err
    assert "damaged line(s) 3, 6 skipped" in err and "`rocoft-bench run` will set them aside" in err
    assert store.read_bytes() == original
    assert not Path(str(store) + ".damaged").exists()
    assert len(read_results(store)) == 4

    # run proceeds: the finished cells are skipped (none is started), the damaged lines set aside.
    def no_cell(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(runner, "run_one", no_cell)
    assert bench_main(["run", str(grid_path)]) == 0
    out = capsys.readouterr()
    assert "skipping 4 finished cell(s)" in out.out + out.err
    assert "damaged line(s) 3, 6 set aside" in out.err
    records, left = read_store(store)
    assert left == [] and sorted(r["cell_id"] for r in records) == sorted(r["cell_id"] for r in good)
    aside = [json.loads(line) for line in Path(str(store) + ".damaged").read_text().splitlines()]
    assert [a["line"] for a in aside] == [3, 6] and all(a["set_aside_at"] for a in aside)
    assert aside[0]["text"] == damaged.decode("utf-8", errors="backslashreplace")
    assert aside[1]["text"] == lines[0][:25]
