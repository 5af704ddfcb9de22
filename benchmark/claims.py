"""Cell claims: a runner runs a cell only while ``cells/<id>/claim.json`` is its own.

The claim is created with O_CREAT | O_EXCL (atomic, NFS included), holding the host, the runner's pid and
its start time, a runner id, the start time, and the cell's pid once started. A claim is

* live while its runner runs: another runner leaves the cell alone;
* stale when it is of this host and its runner is gone (dead pid, or the pid now names a process that
  started at another time): it is taken over, after the old cell process, if still running and ours, is
  killed, so a rerun never races a leftover cell in the same directory. A claim of another host is live
  until its runner releases it (remove a dead host's claim files by hand). A claim that stays unreadable
  (a crash between create and write) for ``UNREADABLE_GRACE_S`` is stale too.

Same-host takeovers are serialised by a flock on ``claim.lock`` beside it (only runners of the claim's
host may take it over, so a host-local lock suffices).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .orphans import alive, kill_group, owned, process_start
from .results import write_text_atomically

CLAIM = "claim.json"
UNREADABLE_GRACE_S = 30.0
KILL_WAIT_S = 10.0


@dataclass
class Runner:
    """Who claims: one `rocoft-bench run` (two runs in one process are two runners)."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    start: Optional[int] = field(default_factory=lambda: process_start(os.getpid()))


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True))


class Claim:
    """This runner's claim of one cell."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def set_cell(self, pid: int) -> None:
        """Record the cell's process (so a takeover can make sure it is gone)."""
        self.data.update(cell_pid=pid, cell_start=process_start(pid))
        _write(self.path, self.data)

    def release(self) -> None:
        current = _read(self.path)
        if current is not None and current.get("runner_id") == self.data["runner_id"]:
            self.path.unlink(missing_ok=True)


def describe(data: Optional[dict[str, Any]]) -> str:
    if data is None:
        return "an unreadable claim"
    return f"runner pid {data.get('runner_pid')} on {data.get('host')} since {time.strftime('%H:%M:%S', time.localtime(data.get('started', 0)))}"


def is_stale(data: Optional[dict[str, Any]], age_s: float, runner: Runner) -> bool:
    if data is None:
        return age_s > UNREADABLE_GRACE_S
    if data.get("host") != runner.host:
        return False
    return not alive(data.get("runner_pid"), data.get("runner_start"))


def _end_old_cell(data: Optional[dict[str, Any]]) -> bool:
    """Make sure the stale claim's cell process is gone; False when it runs and is not ours to kill."""
    pid, start = (data or {}).get("cell_pid"), (data or {}).get("cell_start")
    if not alive(pid, start):
        return True
    if not owned(pid):
        return False
    kill_group(pid)
    deadline = time.monotonic() + KILL_WAIT_S
    while alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid, start)


def _create(path: Path, runner: Runner) -> Optional[Claim]:
    data = {
        "host": runner.host, "runner_id": runner.id, "runner_pid": runner.pid, "runner_start": runner.start,
        "started": time.time(), "cell_pid": None, "cell_start": None,
    }
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return Claim(path, data)


def acquire(directory: Path, runner: Runner) -> tuple[Optional[Claim], Optional[dict[str, Any]]]:
    """(claim, None) when ``runner`` now holds the cell of ``directory``; (None, holder's claim) when a
    live runner holds it (holder None: an unreadable claim, still in its grace period)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CLAIM
    for _ in range(3):  # the holder may release between our attempts
        claim = _create(path, runner)
        if claim is not None:
            return claim, None
        with open(directory / "claim.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                data = _read(path)
                if not is_stale(data, age, runner) or not _end_old_cell(data):
                    return None, data
                path.unlink(missing_ok=True)
                claim = _create(path, runner)
                if claim is not None:
                    claim.data["took_over"] = data
                    return claim, None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return None, _read(path)
