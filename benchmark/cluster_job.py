"""One grid cell as a submitit job: what runs on the node (or, with submitit's local executor, here).

``CellJob`` runs the cell's own process (`python -m benchmark.cell`, as the local runner does) in the
cell's working directory and writes the cell's record to its own file, atomically (benchmark/cell_store.py):
ok with the cell's results, or failed with the tail of its log. It is ``Checkpointable``: when the job is
preempted or nears its time limit, submitit (on the USR2 it asks SLURM for) calls ``checkpoint``, which
requeues the same job with ``resume=True``; the requeued cell goes on from the newest Lightning checkpoint in
its directory (``python -m benchmark.cell ... --resume``). Time-limit requeues are bounded by the executor's
``max_num_timeout`` (the launcher's ``max_requeues``); preemptions are not counted, as in submitit.

Multi-GPU cells on SLURM run one task per GPU (``--ntasks-per-node`` = the cell's ``trainer.devices``, as
Lightning's SLURMEnvironment requires): every task runs this callable, each starts the cell's process with
SLURM's variables intact, and Lightning takes rank, world size and rendezvous from them. Only global rank 0
writes the record. Under the local executor a cell is one task and Lightning starts its ranks itself.

This module stays light (no torch): submitit imports it in every job before the cell starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rocoft_pl.extras import require_extra

submitit = require_extra("submitit", "bench")  # a missing package names its extra
from submitit.helpers import Checkpointable, DelayedSubmission  # noqa: E402

from .cell_env import cell_env
from .cell_store import read_json, write_json_atomically
from .orphans import child_env, kill_group

LOG_TAIL = 3000


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _ignore_preemption_signal() -> None:
    # SLURM sends the USR2 warning to every process of the job; the cell must keep training (its default
    # action would kill it, and then look like a failure) until this job has requeued itself and ends it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class CellJob(Checkpointable):
    cell_id: str
    config_hash: str
    grid_name: str
    work_dir: str       # the cell's directory: cell.json is there, checkpoints and logs go there
    result_file: str    # the cell's record, written atomically by global rank 0
    attempt: int = 1    # 1 + the times the driver submitted this cell again after an error
    local: bool = False  # submitit's local executor: hide SLURM's task variables from the cell
    resume: bool = False  # set by checkpoint(): requeued after a preemption or the time limit

    def __call__(self) -> str:
        rank = submitit.JobEnvironment().global_rank
        work = Path(self.work_dir)
        log = work / ("log.txt" if rank == 0 else f"log.rank{rank}.txt")
        out = work / "result.json"  # the cell process's own output (rank 0)
        if rank == 0:
            if not self.resume:  # a fresh attempt starts from scratch, not from an earlier attempt's state
                for old in work.rglob("*.ckpt"):
                    old.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
            write_json_atomically(work / "running.json", self._running_info())
        started = time.time()
        try:
            code = self._run_cell(work, out, log)
        except SystemExit:  # submitit requeues this job (preemption, time limit): the next one records
            raise
        except BaseException as err:  # e.g. submitit's "timed-out too many times"
            if rank == 0:
                self._write_failed(f"{type(err).__name__}: {err}", log, started)
            raise
        finally:
            if rank == 0:
                (work / "running.json").unlink(missing_ok=True)
        if rank != 0:
            return "done"
        record = read_json(out) if code == 0 else None
        if isinstance(record, dict):
            record.update(status="ok", error=None)
            self._write(record, log, started)
        else:
            self._write_failed(f"exit code {code}" if code else "the cell exited 0 without a result", log, started)
        return str(read_json(Path(self.result_file)).get("status"))

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Requeue this cell, to resume from its last checkpoint (called by submitit on USR2)."""
        return DelayedSubmission(replace(self, resume=True))

    # -- helpers ------------------------------------------------------------------------------------------
    def _running_info(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        return {"job_id": env.job_id, "host": socket.gethostname(), "pid": os.getpid(), "attempt": self.attempt,
                "resume": self.resume, "started": time.time()}

    def _run_cell(self, work: Path, out: Path, log: Path) -> int:
        """The cell's process, in a process group of its own that dies with this job (benchmark/orphans.py)."""
        env = cell_env(None) if self.local else dict(os.environ)
        cmd = [sys.executable, "-m", "benchmark.cell", str(work / "cell.json"), str(out)]
        if self.resume:
            cmd.append("--resume")
        with open(log, "a") as log_file:
            log_file.write(f"\n=== {self.cell_id}: attempt {self.attempt}{' (resumed)' if self.resume else ''}, "
                           f"job {submitit.JobEnvironment().job_id} on {socket.gethostname()} ===\n")
            log_file.flush()
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(env),
                                    start_new_session=True, preexec_fn=_ignore_preemption_signal)
            try:
                return proc.wait()
            except BaseException:  # requeue, cancellation: never leave the cell running
                kill_group(proc.pid)
                proc.wait()
                raise

    def _write(self, record: dict[str, Any], log: Path, started: float) -> None:
        record.update(grid=self.grid_name, attempt=self.attempt, wall_s=time.time() - started, log=str(log),
                      job_id=submitit.JobEnvironment().job_id)
        write_json_atomically(Path(self.result_file), record)

    def _write_failed(self, error: str, log: Path, started: float) -> None:
        spec = read_json(Path(self.work_dir) / "cell.json") or {"cell_id": self.cell_id, "config_hash": self.config_hash}
        record = {k: v for k, v in spec.items() if k != "config"}
        record.update(status="failed", metrics={}, error=f"{error}\n{_tail(log)}")
        self._write(record, log, started)

