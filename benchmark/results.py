"""The results store: one JSON record per grid cell in a JSONL file.

Every write rewrites the file to a temporary sibling and renames it over the original (atomic on POSIX),
under an exclusive lock, so a crash or a kill mid-write leaves the previous complete file, never half a
record. A cell's record is replaced when the cell runs again (a retried failure, say).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_results(path: PathLike) -> list[dict[str, Any]]:
    """All records (an absent file is an empty store). A damaged line is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not a JSON record ({err})") from None
    return records


def _write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def upsert_result(path: PathLike, record: dict[str, Any]) -> None:
    """Add ``record`` (it must have ``cell_id``), replacing an earlier record of the same cell."""
    path = Path(path)
    if "cell_id" not in record:
        raise ValueError("a result record needs a cell_id")
    with _locked(path):
        records = [r for r in read_results(path) if r.get("cell_id") != record["cell_id"]]
        records.append(record)
        _write_atomically(path, records)


def finished_cells(path: PathLike) -> dict[str, str]:
    """cell_id -> config_hash of the cells that finished successfully (resume skips these)."""
    return {r["cell_id"]: r.get("config_hash", "") for r in read_results(path) if r.get("status") == "ok"}
