"""`rocoft-bench run GRID.yaml`: every cell in its own subprocess, results upserted atomically.

A cell that fails, crashes or times out is recorded with its error (the tail of its log) and the grid
goes on. Re-running skips cells already finished with the same config hash. ``jobs`` cells run at once;
on GPUs each job slot gets its own device through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from .grid import Cell, Grid, load_grid
from .lm_eval import generate_records_of_cell
from .results import finished_cells, upsert_result

# Distributed launch variables of a parent run must not leak into a cell.
_STRIP_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def cell_dir(grid: Grid, cell: Cell) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", cell.cell_id)
    return grid.results.parent / "cells" / safe


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_one(grid: Grid, cell: Cell, device: Optional[str] = None) -> dict[str, Any]:
    """Run a cell's subprocess and return its record (status ok, failed or timeout)."""
    out = cell_dir(grid, cell)
    out.mkdir(parents=True, exist_ok=True)
    spec, result, log = out / "cell.json", out / "result.json", out / "log.txt"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps(cell.to_dict(), indent=2, sort_keys=True, default=str))
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    started = time.time()
    status, error = "ok", None
    with open(log, "w") as log_file:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmark.cell", str(spec), str(result)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=cell.timeout_s,
            )
            if proc.returncode != 0:
                status = "failed"
                error = f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status, error = "timeout", f"killed after {cell.timeout_s:.0f} s"
    if status == "ok" and not result.exists():
        status, error = "failed", "the cell exited 0 without a result"
    if status == "ok":
        record = json.loads(result.read_text())
    else:
        record = {**{k: v for k, v in cell.to_dict().items() if k != "config"}, "metrics": {}}
        record["error"] = f"{error}\n{_tail(log)}"
    record.update(status=status, grid=grid.name, wall_s=time.time() - started, log=str(log))
    return record


def _devices() -> list[Optional[str]]:
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] or [None]
    except ImportError:  # pragma: no cover - torch is a dependency
        return [None]


def run_grid(grid_path: Union[str, Path], jobs: int = 1, results: Optional[Union[str, Path]] = None,
             seeds: Optional[list[int]] = None) -> list[dict[str, Any]]:
    """Run every unfinished cell of a grid (``seeds``: instead of the grid's); returns the records written."""
    grid = load_grid(grid_path, seeds)
    if results is not None:
        grid.results = Path(results)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    done = finished_cells(grid.results)
    todo = [c for c in grid.cells if done.get(c.cell_id) != c.config_hash]
    skipped = len(grid.cells) - len(todo)
    devices = _devices()
    slots = [devices[i % len(devices)] for i in range(jobs)]
    free = list(range(jobs))
    lock = threading.Lock()
    written: list[dict[str, Any]] = []
    bar = tqdm(total=len(grid.cells), initial=skipped, desc=f"grid {grid.name}", unit="cell")
    if skipped:
        bar.write(f"skipping {skipped} finished cell(s) recorded in {grid.results}")

    def work(cell: Cell) -> None:
        with lock:
            slot = free.pop()
        try:
            record = run_one(grid, cell, slots[slot])
        finally:
            with lock:
                free.append(slot)
        with lock:
            upsert_result(grid.results, record)
            for derived in generate_records_of_cell(record, cell.config):  # causal LMs: one record per dataset
                upsert_result(grid.results, derived)
            written.append(record)
            bar.update(1)
            if record["status"] != "ok":
                bar.write(f"{cell.cell_id}: {record['status']} ({record['error'].splitlines()[0]}); see {record['log']}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, todo))
    bar.close()
    return written
