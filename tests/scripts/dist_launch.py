"""Launching a 2-process Lightning script from pytest (shared by the distributed tests).

Lightning's 'ddp' / ModelParallelStrategy launchers re-run ``sys.argv`` with LOCAL_RANK etc. set, so the
distributed part runs as its own script in a subprocess whose environment has none of those variables,
with a free MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK",
            "MASTER_ADDR", "MASTER_PORT")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("PL_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    return env


def run_script(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python script args...`` with a clean distributed environment; assert it succeeded."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
