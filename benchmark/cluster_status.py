"""`rocoft-bench status GRID.yaml`: each cell's state from the files and the scheduler, for cells run by a
cluster launcher (benchmark/cluster.py); works while the driver runs, after it exited, from any machine
that sees the shared file system (SLURM states need sacct there).

* done: an ok record with the cell's current config hash (its cell file, or results.jsonl);
* running: its latest job runs it (running.json in its directory; on SLURM, sacct says RUNNING);
* pending: not submitted yet, or its job waits in the queue (or for a local slot);
* failed: its latest attempt wrote a failed record, or its job ended without a record; with the log tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .cell_store import cell_record, cluster_paths, read_json
from .cluster import job_ended, job_states, load_jobs
from .grid import Grid
from .results import read_store

STATES = ("done", "running", "pending", "failed")


@dataclass
class CellState:
    cell_id: str
    state: str            # one of STATES
    detail: str           # the job and what the scheduler said, or the first line of the error
    job_id: Optional[str] = None
    attempt: Optional[int] = None
    log_tail: str = ""


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _summary(error: str, width: int = 160) -> str:
    """The error's first line and, when the log follows, its last line (usually the exception)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    text = lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
    return text if len(text) <= width else text[: width - 3] + "..."


def cell_states(grid: Grid, tail_lines: int = 15) -> list[CellState]:
    paths = cluster_paths(grid.results)
    jobs = load_jobs(paths)
    stored = {r["cell_id"]: r for r in read_store(grid.results)[0]}
    states = job_states([e for c in grid.cells if (e := jobs.get(c.config_hash))], force=True)  # one sacct call
    out = []
    for cell in grid.cells:
        h = cell.config_hash
        entry: dict[str, Any] = jobs.get(h) or {}
        job_id, attempt = entry.get("job_id"), entry.get("attempt")
        record = cell_record(paths, h)
        old = stored.get(cell.cell_id)
        if old is not None and old.get("config_hash") != h:
            old = None
        ok = next((r for r in (record, old) if r is not None and r.get("status") == "ok"), None)
        if ok is not None:
            metrics = [f"{k} {v:.4g}" for k, v in ok.get("metrics", {}).items() if isinstance(v, (int, float))]
            out.append(CellState(cell.cell_id, "done", ", ".join(metrics[:2]), job_id, attempt))
            continue
        current = record is not None and (not entry or record.get("attempt") == attempt)
        if entry and not current:
            state = states[str(job_id)]
            running = read_json(paths.work(h) / "running.json")
            if not job_ended(state):
                live = state == "RUNNING" and (entry.get("launcher") == "slurm" or running is not None)
                out.append(CellState(cell.cell_id, "running" if live else "pending",
                                     f"job {job_id} {state}, attempt {attempt}", job_id, attempt))
                continue
            log = paths.work(h) / "log.txt"
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(CellState(cell.cell_id, "failed", f"job {job_id} ended ({state}) without a result",
                                 job_id, attempt, _tail(text, tail_lines)))
            continue
        failed = record if record is not None else old if old is not None and old.get("status") != "ok" else None
        if failed is not None:
            error = str(failed.get("error") or "")
            out.append(CellState(cell.cell_id, "failed", _summary(error),
                                 failed.get("job_id", job_id), failed.get("attempt", attempt), _tail(error, tail_lines)))
            continue
        out.append(CellState(cell.cell_id, "pending", "not submitted"))
    return out


def format_states(grid: Grid, states: list[CellState]) -> str:
    counts = {s: sum(c.state == s for c in states) for s in STATES}
    width = max([len(c.cell_id) for c in states] + [4])
    lines = [f"grid {grid.name}: {len(states)} cell(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             f"{'state':<8} {'cell':<{width}}  detail"]
    lines += [f"{c.state:<8} {c.cell_id:<{width}}  {c.detail}" for c in states]
    for c in states:
        if c.state == "failed" and c.log_tail:
            lines += ["", f"--- {c.cell_id} (job {c.job_id}, attempt {c.attempt}): log tail ---", c.log_tail]
    return "\n".join(lines)
