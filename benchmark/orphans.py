"""No orphan cells: a cell and whatever it starts die with the runner that started it.

The runner starts each cell in a session (and process group) of its own, led by the cell, and tells it
its pid (``ROCOFT_BENCH_RUNNER_PID``). The cell, first thing, calls ``die_with_runner``:

* on Linux it asks for SIGTERM when its parent goes (``prctl(PR_SET_PDEATHSIG)``; the signal comes when
  the runner *thread* that started it ends, and the runner's pool threads outlive their cells), and its
  SIGTERM handler kills the cell's whole process group (DataLoader workers, DDP ranks);
* a watchdog thread checks every half second that its parent is still the runner, and kills the group
  otherwise (any OS; also when the signal is ignored or the main thread is busy in native code).

So SIGKILL of `rocoft-bench run` ends its cells within about a second. The pid helpers here also tell
whether a recorded pid is still the same process (its start time), for claims (benchmark/claims.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

RUNNER_PID_ENV = "ROCOFT_BENCH_RUNNER_PID"
_PR_SET_PDEATHSIG = 1


def process_start(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22): a pid with another
    start time is another process. None when it is gone, a zombie, or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":  # exited, not yet reaped
        return None
    return int(fields[19])


def alive(pid: Optional[int], start: Optional[int] = None) -> bool:
    """Whether ``pid`` runs and, when ``start`` is given and /proc tells, is the process that started then."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if os.path.isdir("/proc"):
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    return True


def owned(pid: int) -> bool:
    """Whether this user may signal ``pid``."""
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group a cell leads (itself and what it started); the pid alone if it leads none."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def child_env(env: dict[str, str]) -> dict[str, str]:
    """A cell's environment: ``env`` plus this runner's pid."""
    return {**env, RUNNER_PID_ENV: str(os.getpid())}


def _end_own_group(*_: Any) -> None:
    if os.getpgrp() == os.getpid():  # we lead our group: it is the cell's, not a shell's
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_runner(poll_s: float = 0.5) -> None:
    """In a cell: end this cell's process group when the runner that started it dies. No-op when the
    process was not started by a runner (no ROCOFT_BENCH_RUNNER_PID)."""
    expected = os.environ.pop(RUNNER_PID_ENV, None)  # not inherited: a DDP rank's parent is the cell
    if not expected:
        return
    runner = int(expected)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _end_own_group)
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            except (OSError, AttributeError):  # pragma: no cover - the watchdog still works
                pass
    if os.getppid() != runner:  # the runner died before the signal was asked for
        _end_own_group()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != runner:
                _end_own_group()

    threading.Thread(target=watch, name="die-with-runner", daemon=True).start()
