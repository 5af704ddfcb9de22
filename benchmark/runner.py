"""`rocoft-bench run GRID.yaml`: every cell in its own subprocess, results upserted atomically.

Before any cell starts, the grid is checked (benchmark/validate.py: method params, each distinct config
through the cell's LightningCLI parser, learning rates), and damaged lines of the results file are set
aside into ``<results>.damaged`` (benchmark/results.py). A cell that fails, crashes or times out is
recorded with its error (the tail of its log) and the grid goes on. Re-running skips cells already
finished with the same config hash. ``jobs`` cells run at once. On GPUs each cell gets a group of its own
of as many GPUs as its trainer uses (``trainer.devices``), through CUDA_VISIBLE_DEVICES, waiting for a free
group first come, first served; a cell that needs more GPUs than visible or several nodes
(``trainer.num_nodes``) is an error before any cell starts (benchmark/gpu_groups.py, which also says how
to run a grid on a SLURM cluster).

Reliability:

* No orphans: each cell runs in a process group of its own and dies with the runner, whatever ends it
  (benchmark/orphans.py); a timeout or Ctrl-C kills the cell's whole group.
* Claims: a runner claims a cell (``cells/<id>/claim.json``, benchmark/claims.py) before starting it and
  releases the claim after its record is upserted. Right after claiming, it reads the store again and
  leaves the cell if another runner recorded it since this runner started (so two runners on one grid
  never run a cell twice, a failed one included). A cell claimed by another live runner is left to it:
  this runner runs the other cells, then waits for those (``waiting for N cell(s) claimed by another
  runner``, polling every ``POLL_S``) and returns when every cell of the grid is done by someone. A claim
  whose runner died on this host is stale: the leftover cell process, if any, is killed and the cell run
  here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from . import claims
from .cell_env import cell_env
from .gpu_groups import GpuPool, cell_needs, group_env, visible_gpus
from .grid import Cell, Grid, GridError, load_grid
from .lm_eval import generate_records_of_cell
from .orphans import child_env, kill_group
from .results import read_store, set_aside_damaged, upsert_result
from .validate import validate_grid

POLL_S = 2.0  # how often a runner looks again at cells claimed by another runner


def cell_dir(grid: Grid, cell: Cell) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", cell.cell_id)
    return grid.results.parent / "cells" / safe


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_one(grid: Grid, cell: Cell, device: Optional[str] = None, claim: Optional[claims.Claim] = None,
            live: Optional[set[subprocess.Popen]] = None) -> dict[str, Any]:
    """Run a cell's subprocess and return its record (status ok, failed or timeout). ``device``: the cell's
    CUDA_VISIBLE_DEVICES (comma-separated ids; None keeps the runner's). The cell leads a process group of
    its own; its pid goes into ``claim``, and the process into ``live`` while it runs."""
    out = cell_dir(grid, cell)
    out.mkdir(parents=True, exist_ok=True)
    spec, result, log = out / "cell.json", out / "result.json", out / "log.txt"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps(cell.to_dict(), indent=2, sort_keys=True, default=str))
    env = cell_env(device)
    started = time.time()
    status, error = "ok", None
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmark.cell", str(spec), str(result)],
            stdout=log_file, stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True,
        )
        if live is not None:
            live.add(proc)
        try:
            if claim is not None:
                claim.set_cell(proc.pid)
            try:
                if proc.wait(timeout=cell.timeout_s) != 0:
                    status, error = "failed", f"exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait()
                status, error = "timeout", f"killed after {cell.timeout_s:.0f} s"
        finally:
            if proc.returncode is None:  # interrupted: never leave the cell running
                kill_group(proc.pid)
                proc.wait()
            if live is not None:
                live.discard(proc)
    if status == "ok" and not result.exists():
        status, error = "failed", "the cell exited 0 without a result"
    if status == "ok":
        record = json.loads(result.read_text())
    else:
        record = {**{k: v for k, v in cell.to_dict().items() if k != "config"}, "metrics": {}}
        record["error"] = f"{error}\n{_tail(log)}"
    record.update(status=status, grid=grid.name, wall_s=time.time() - started, log=str(log))
    return record


def _by_cell(path: Path) -> dict[str, dict[str, Any]]:
    return {r["cell_id"]: r for r in read_store(path)[0]}


def prepare(grid_path: Union[str, Path], results: Optional[Union[str, Path]] = None,
            seeds: Optional[list[int]] = None) -> Grid:
    """The grid, checked: spec, method params, configs, learning rates (GridError lists the problems)."""
    try:
        grid = load_grid(grid_path, seeds)
        if results is not None:
            grid.results = Path(results)
        validate_grid(grid)
    except (ValueError, FileNotFoundError) as err:
        raise GridError(str(err)) from err
    return grid


def run_grid(grid_path: Union[str, Path], jobs: int = 1, results: Optional[Union[str, Path]] = None,
             seeds: Optional[list[int]] = None) -> list[dict[str, Any]]:
    """Run every unfinished cell of a grid (``seeds``: instead of the grid's); returns the records this
    runner wrote (cells recorded by another runner meanwhile are not among them)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    grid = prepare(grid_path, results, seeds)
    set_aside_damaged(grid.results)
    before = _by_cell(grid.results)

    def finished(cell: Cell) -> bool:
        r = before.get(cell.cell_id)
        return r is not None and r.get("status") == "ok" and r.get("config_hash") == cell.config_hash

    todo = [c for c in grid.cells if not finished(c)]
    skipped = len(grid.cells) - len(todo)
    gpus = visible_gpus()
    needs = cell_needs(todo, gpus)  # GridError before any cell starts
    gpu_pool = GpuPool(gpus)
    lock = threading.Lock()
    runner = claims.Runner()
    live: set[subprocess.Popen] = set()
    stopping = threading.Event()
    elsewhere: dict[str, tuple[Cell, Optional[dict[str, Any]]]] = {}
    by_others: list[str] = []
    written: list[dict[str, Any]] = []
    bar = tqdm(total=len(grid.cells), initial=skipped, desc=f"grid {grid.name}", unit="cell")
    if skipped:
        bar.write(f"skipping {skipped} finished cell(s) recorded in {grid.results}")

    def work(cell: Cell) -> None:
        if stopping.is_set():
            return
        claim, holder = claims.acquire(cell_dir(grid, cell), runner)
        if claim is None:
            with lock:
                elsewhere[cell.cell_id] = (cell, holder)
            return
        try:
            if "took_over" in claim.data:
                bar.write(f"{cell.cell_id}: took over the stale claim of {claims.describe(claim.data['took_over'])}")
            if _by_cell(grid.results).get(cell.cell_id) != before.get(cell.cell_id):
                with lock:  # another runner ran it since this one started
                    by_others.append(cell.cell_id)
                    bar.update(1)
                return
            group = gpu_pool.acquire(needs[cell.cell_id])
            try:
                if stopping.is_set():  # interrupted while waiting for the group
                    return
                record = run_one(grid, cell, group_env(group, gpus), claim, live)
            finally:
                gpu_pool.release(group)
            if stopping.is_set():
                return  # interrupted: the cell was killed, nothing to record
            with lock:
                upsert_result(grid.results, record)
                for derived in generate_records_of_cell(record, cell.config):  # causal LMs: one record per dataset
                    upsert_result(grid.results, derived)
                written.append(record)
                bar.update(1)
                if record["status"] != "ok":
                    bar.write(f"{cell.cell_id}: {record['status']} ({record['error'].splitlines()[0]}); see {record['log']}")
        finally:
            claim.release()

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        pending, announced = todo, set()
        while pending:
            list(pool.map(work, pending))
            with lock:
                waiting = list(elsewhere.values())
                elsewhere.clear()
            pending = [cell for cell, _ in waiting]
            if pending and {c.cell_id for c in pending} != announced:
                announced = {c.cell_id for c in pending}
                bar.write(
                    f"waiting for {len(pending)} cell(s) claimed by another runner: "
                    + "; ".join(f"{c.cell_id} ({claims.describe(h)})" for c, h in waiting)
                )
            if pending:
                time.sleep(POLL_S)
    except BaseException:  # Ctrl-C: cells lead their own process groups, so end them here
        stopping.set()
        for proc in list(live):
            if proc.returncode is None:
                kill_group(proc.pid)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if by_others:
        print(f"{len(by_others)} cell(s) were recorded by another runner meanwhile", file=sys.stderr)
    return written
