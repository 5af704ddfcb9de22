"""Cell files for the cluster launchers, and the results store as their merge.

Nodes of a cluster share only a file system, where fcntl locks are not dependable (NFS, Lustre). So no
cell writes the shared results.jsonl: each writes its own record, atomically (temp file + os.replace), to
a file named by its config hash, and ``collect`` rebuilds results.jsonl from them (atomically too; the
driver is its only writer). Everything lives beside the results file, under ``cluster/``:

    cluster/results/<config_hash>.json   a cell's record (ok or failed), written by its job
    cluster/cells/<config_hash>/         the cell's working directory: cell.json, log.txt, checkpoints,
                                         adapter, running.json while a job runs it
    cluster/jobs.json                    the driver's record of submitted jobs (benchmark/cluster.py)
    cluster/submitit/                    submitit's job files and logs

Keyed by config hash, so a cell whose config changed never reads another config's checkpoint or record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .results import _set_aside as set_aside_damaged_lines  # the store's own repair, minus its lock
from .results import read_store, write_text_atomically

if TYPE_CHECKING:  # the grid pulls in torch; a job on a node needs only the paths
    from .grid import Grid


@dataclass(frozen=True)
class ClusterPaths:
    root: Path

    def result(self, config_hash: str) -> Path:
        return self.root / "results" / f"{config_hash}.json"

    def work(self, config_hash: str) -> Path:
        return self.root / "cells" / config_hash

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"


def cluster_paths(results: Path) -> ClusterPaths:
    return ClusterPaths(Path(results).resolve().parent / "cluster")


def write_json_atomically(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Optional[Any]:
    """The file's JSON; None when absent or unreadable (a reader never fails on a stray file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_record(paths: ClusterPaths, config_hash: str) -> Optional[dict[str, Any]]:
    record = read_json(paths.result(config_hash))
    return record if isinstance(record, dict) and isinstance(record.get("cell_id"), str) else None


def collect(grid: "Grid") -> tuple[Path, int]:
    """Rebuild ``grid.results`` from the cell files of the grid's cells (their current config hash): each
    cell's record replaces the store's record of that cell; other records (an earlier config's, lm-eval's)
    stay. Returns the store and how many cell records went in."""
    from .lm_eval import generate_records_of_cell

    paths = cluster_paths(grid.results)
    records, damaged = read_store(grid.results)
    if damaged:  # kept in <results>.damaged, as `rocoft-bench run` does; no lock: the driver is the one writer
        set_aside_damaged_lines(grid.results, records, damaged)
    merged = {r["cell_id"]: r for r in records}
    order = [r["cell_id"] for r in records]
    found = 0
    for cell in grid.cells:
        record = cell_record(paths, cell.config_hash)
        if record is None:
            continue
        found += 1
        for r in [record, *generate_records_of_cell(record, cell.config)]:
            if r["cell_id"] not in merged:
                order.append(r["cell_id"])
            merged[r["cell_id"]] = r
    grid.results.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(grid.results, "".join(json.dumps(merged[c], sort_keys=True) + "\n" for c in order))
    return grid.results, found


def finished_hashes(grid: "Grid") -> set[str]:
    """Config hashes of the grid's cells that finished ok, in the store or in a cell file."""
    paths = cluster_paths(grid.results)
    stored = {(r["cell_id"], r.get("config_hash")) for r in read_store(grid.results)[0] if r.get("status") == "ok"}
    done = set()
    for cell in grid.cells:
        record = cell_record(paths, cell.config_hash)
        if (cell.cell_id, cell.config_hash) in stored or (record is not None and record.get("status") == "ok"):
            done.add(cell.config_hash)
    return done
