"""The results store: one JSON record per grid cell in a JSONL file.

Every write rewrites the file to a temporary sibling and renames it over the original (atomic on POSIX),
under an exclusive lock, so a crash or a kill mid-write leaves the previous complete file, never half a
record. A cell's record is replaced when the cell runs again (a retried failure, say).

A damaged line (not a JSON record with a ``cell_id``: something else crashed mid-write, the disk filled
up) never stops a reader: ``read_results`` returns the good records and prints a warning naming the
damaged lines. Only writers repair: ``upsert_result`` and ``set_aside_damaged`` (`rocoft-bench run` calls
it before it starts) append each damaged line, with its number and the time, to ``<results>.damaged``
(JSONL) and rewrite the store without it, under the lock. Readers (`rocoft-bench table`, the leaderboard)
never write the store or the .damaged file.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Damaged:
    """A line of the store that is not a JSON record with a cell_id: its number (from 1) and its text."""

    line: int
    text: str


def damaged_path(path: PathLike) -> Path:
    return Path(str(path) + ".damaged")


def read_store(path: PathLike) -> tuple[list[dict[str, Any]], list[Damaged]]:
    """(good records, damaged lines); an absent file is an empty store. Reads only."""
    path = Path(path)
    if not path.exists():
        return [], []
    records, damaged = [], []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("cell_id"), str):
            records.append(record)
        else:
            damaged.append(Damaged(n, raw.decode("utf-8", errors="backslashreplace")))
    return records, damaged


def _lines(damaged: list[Damaged]) -> str:
    return ", ".join(str(d.line) for d in damaged)


def read_results(path: PathLike) -> list[dict[str, Any]]:
    """The good records. Damaged lines are skipped with a warning on stderr naming them; the store is
    left as it is (`rocoft-bench run` sets them aside)."""
    records, damaged = read_store(path)
    if damaged:
        print(
            f"warning: {path}: damaged line(s) {_lines(damaged)} skipped (not JSON records); "
            f"`rocoft-bench run` will set them aside into {damaged_path(path)}",
            file=sys.stderr,
        )
    return records


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``: readers see the old or the new text."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users of a shared directory
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomically(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def upsert_result(path: PathLike, record: dict[str, Any]) -> None:
    """Add ``record`` (it must have ``cell_id``), replacing an earlier record of the same cell."""
    path = Path(path)
    if "cell_id" not in record:
        raise ValueError("a result record needs a cell_id")
    with _locked(path):
        records, damaged = read_store(path)
        if damaged:
            records = _set_aside(path, records, damaged)
        records = [r for r in records if r.get("cell_id") != record["cell_id"]]
        records.append(record)
        _write_atomically(path, records)


def _set_aside(path: Path, records: list[dict[str, Any]], damaged: list[Damaged]) -> list[dict[str, Any]]:
    """Under the lock: append the damaged lines to <path>.damaged (first), then rewrite the store without them."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(damaged_path(path), "a") as f:
        for d in damaged:
            f.write(json.dumps({"line": d.line, "set_aside_at": stamp, "store": str(path), "text": d.text}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _write_atomically(path, records)
    print(f"{path}: damaged line(s) {_lines(damaged)} set aside into {damaged_path(path)}", file=sys.stderr)
    return records


def set_aside_damaged(path: PathLike) -> list[Damaged]:
    """Move the store's damaged lines into <path>.damaged (a writer's repair); returns them."""
    path = Path(path)
    if not path.exists():
        return []
    with _locked(path):
        records, damaged = read_store(path)
        if damaged:
            _set_aside(path, records, damaged)
    return damaged


def finished_cells(path: PathLike) -> dict[str, str]:
    """cell_id -> config_hash of the cells that finished successfully (resume skips these)."""
    return {r["cell_id"]: r.get("config_hash", "") for r in read_results(path) if r.get("status") == "ok"}
