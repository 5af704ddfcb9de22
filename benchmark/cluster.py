"""`rocoft-bench run GRID.yaml --launcher slurm | submitit-local`: the grid's unfinished cells as submitit jobs.

The driver (this module) checks the grid as `rocoft-bench run` does, skips cells finished with the same
config hash, writes each pending cell's spec into its working directory and submits the cells as job
arrays, one per set of resources (benchmark/cluster_resources.py), with ``CellJob`` (benchmark/cluster_job.py)
as the callable. It records the job ids in ``cluster/jobs.json`` and then waits: as cells finish it merges
their record files into results.jsonl (benchmark/cell_store.py). A cell that failed with an error is
submitted again, up to ``max_retries`` times; preemptions and time limits are requeued by submitit itself.

The driver may exit at any time (Ctrl-C, ``--no-wait``, a lost login session): the jobs go on, and
`rocoft-bench status GRID.yaml` tells each cell's state from the files and the scheduler; running the same
command again waits for the jobs still in flight instead of submitting their cells twice, goes on with the
retries of cells that failed meanwhile, and submits the cells that are neither finished nor in flight (a cell
that used up its retries starts a new round of attempts, as a failed cell of the local runner is run again).
One driver per grid at a time.

``submitit-local`` runs the same code path on this machine through submitit's LocalExecutor (a process per
cell, at most ``max_parallel`` at once, each with a group of free GPUs of its own): that is how the tests
exercise it.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rocoft_pl.extras import require_extra

from .cell_store import ClusterPaths, cell_record, cluster_paths, collect, finished_hashes, read_json, write_json_atomically
from .cluster_resources import CellResources, cell_resources, slurm_parameters
from .grid import Cell, Grid, GridError
from .launcher_options import LauncherOptions
from .orphans import alive, process_start

POLL_S = 5.0
# sacct states after which a SLURM job runs no more (a requeued job goes back to PENDING)
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


# -- jobs.json ------------------------------------------------------------------------------------------------
def load_jobs(paths: ClusterPaths) -> dict[str, dict[str, Any]]:
    """config_hash -> the latest job of that cell: job_id, attempt, launcher, host, submitted."""
    data = read_json(paths.jobs)
    return dict(data.get("cells", {})) if isinstance(data, dict) else {}


def save_jobs(paths: ClusterPaths, jobs: dict[str, dict[str, Any]]) -> None:
    write_json_atomically(paths.jobs, {"cells": jobs})


def job_states(entries: list[dict[str, Any]], force: bool = False) -> dict[str, str]:
    """job_id -> the scheduler's word on it: SLURM's state from one sacct call for all of them (``force``:
    now; else on submitit's schedule, which backs off to every 10 minutes), or for local jobs RUNNING /
    FINISHED from whether the job's controller process still runs (UNKNOWN on another host)."""
    states = {}
    slurm = [str(e["job_id"]) for e in entries if e.get("launcher") == "slurm"]
    if slurm:
        from submitit.slurm.slurm import SlurmJob

        watcher = SlurmJob.watcher
        for job_id in slurm:
            watcher.register_job(job_id)
        watcher.update_if_long_enough("force" if force else "standard")
        states.update({j: str(watcher.get_state(j, mode="cache")).split()[0] for j in slurm})
    for e in entries:
        if e.get("launcher") != "slurm":
            here = e.get("host") == socket.gethostname()
            states[str(e["job_id"])] = ("RUNNING" if alive(int(e["job_id"]), e.get("pid_start")) else "FINISHED") if here else "UNKNOWN"
    return states


def job_ended(state: str) -> bool:
    return state == "FINISHED" or state.startswith(SLURM_ENDED)


# -- submitting -----------------------------------------------------------------------------------------------
def _job(grid: Grid, cell: Cell, paths: ClusterPaths, options: LauncherOptions, attempt: int) -> Any:
    from .cluster_job import CellJob

    work = paths.work(cell.config_hash)
    write_json_atomically(work / "cell.json", cell.to_dict())
    # an earlier attempt's failed record must not pass for this attempt's (the store keeps it until then)
    paths.result(cell.config_hash).unlink(missing_ok=True)
    return CellJob(cell_id=cell.cell_id, config_hash=cell.config_hash, grid_name=grid.name, work_dir=str(work),
                   result_file=str(paths.result(cell.config_hash)), attempt=attempt,
                   local=options.kind == "submitit-local")


def _executor(options: LauncherOptions, paths: ClusterPaths, res: CellResources, grid: Grid,
              gpus: Optional[list[int]] = None) -> Any:
    submitit = require_extra("submitit", "bench")

    folder = paths.submitit / "%j"
    if options.kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
        executor.update_parameters(**slurm_parameters(options, res, f"rocoft-{grid.name}"))
    else:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options.max_requeues)
        executor.update_parameters(timeout_min=res.time_min, gpus_per_node=res.gpus, tasks_per_node=1,
                                   visible_gpus=tuple(gpus or ()), signal_delay_s=options.signal_delay_s)
    return executor


def _entry(job: Any, cell: Cell, attempt: int, options: LauncherOptions) -> dict[str, Any]:
    entry = {"cell_id": cell.cell_id, "job_id": str(job.job_id), "attempt": attempt, "launcher": options.kind,
             "host": socket.gethostname(), "submitted": time.time()}
    if options.kind != "slurm":
        entry["pid_start"] = process_start(int(job.job_id))
    return entry


@dataclass
class Driver:
    grid: Grid
    options: LauncherOptions
    log: Any = None  # where progress goes; None: sys.stdout (as it is when the driver runs)

    def __post_init__(self) -> None:
        self.log = self.log or sys.stdout
        self.paths = cluster_paths(self.grid.results)
        self.jobs = load_jobs(self.paths)
        self.cells = {c.config_hash: c for c in self.grid.cells}
        self.in_flight: dict[str, dict[str, Any]] = {}  # hash -> entry, this driver's view
        self.queue: list[tuple[Cell, int]] = []  # (cell, attempt) waiting for a local slot
        self.gpu_groups: dict[str, list[int]] = {}
        self.resources: dict[str, CellResources] = {}
        self.written: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    # the cells' resources, checked before anything is submitted
    def check(self, cells: list[Cell]) -> dict[str, CellResources]:
        resources, problems = {}, []
        for cell in cells:
            try:
                resources[cell.config_hash] = cell_resources(cell, self.options)
            except ValueError as err:
                problems.append(str(err))
        if self.options.kind == "submitit-local":  # a cell waiting for more GPUs than there are would wait forever
            from .gpu_groups import visible_gpus

            visible = len(visible_gpus())
            problems += [f"{c.cell_id}: needs {resources[c.config_hash].gpus} GPU(s), {visible} visible"
                         for c in cells if c.config_hash in resources and resources[c.config_hash].gpus > visible]
        if problems:
            raise GridError(f"{len(problems)} cell(s) cannot run under the {self.options.kind} launcher, "
                            "no cell was submitted:\n- " + "\n- ".join(problems))
        return resources

    def submit(self, batch: list[tuple[Cell, int]]) -> None:
        if self.options.kind == "slurm":
            self._submit_arrays(batch)
        else:
            self.queue.extend(batch)
            self._submit_local()
        save_jobs(self.paths, self.jobs)

    def _record(self, cell: Cell, job: Any, attempt: int) -> None:
        entry = _entry(job, cell, attempt, self.options)
        self.jobs[cell.config_hash] = self.in_flight[cell.config_hash] = entry

    def _submit_arrays(self, batch: list[tuple[Cell, int]]) -> None:
        groups: dict[CellResources, list[tuple[Cell, int]]] = {}
        for cell, attempt in batch:
            groups.setdefault(self.resources[cell.config_hash], []).append((cell, attempt))
        for res, members in groups.items():
            executor = _executor(self.options, self.paths, res, self.grid)
            jobs = executor.submit_array([_job(self.grid, c, self.paths, self.options, a) for c, a in members])
            for (cell, attempt), job in zip(members, jobs):
                self._record(cell, job, attempt)
            self.say(f"submitted {len(members)} cell(s) as job array {jobs[0].job_id.split('_')[0]} "
                     f"({res.gpus} GPU(s) x {res.nodes} node(s), {res.time_min} min each)")

    def _submit_local(self) -> None:
        """Start queued cells while fewer than max_parallel run, each with free GPUs of its own."""
        from .gpu_groups import visible_gpus

        visible = [int(g) for g in visible_gpus() if g.isdigit()]
        taken = {g for group in self.gpu_groups.values() for g in group}
        waiting = []
        for cell, attempt in self.queue:
            res = self.resources[cell.config_hash]
            free = [g for g in visible if g not in taken]
            if len(self.in_flight) >= self.options.max_parallel or len(free) < res.gpus:
                waiting.append((cell, attempt))
                continue
            group = free[:res.gpus]
            taken.update(group)
            executor = _executor(self.options, self.paths, res, self.grid, group)
            job = executor.submit(_job(self.grid, cell, self.paths, self.options, attempt))
            self.gpu_groups[cell.config_hash] = group
            self._record(cell, job, attempt)
            self.say(f"{cell.cell_id}: started as local job {job.job_id} (attempt {attempt})")
        self.queue = waiting

    # waiting
    def poll(self) -> bool:
        """Look at every cell in flight once; True when one finished (ok, or failed for good)."""
        changed, retry = False, []
        states = job_states(list(self.in_flight.values()))
        for h, entry in list(self.in_flight.items()):
            cell = self.cells[h]
            record = cell_record(self.paths, h)
            if record is None or (record.get("status") != "ok" and record.get("attempt") != entry["attempt"]):
                state = states[str(entry["job_id"])]
                if not job_ended(state):
                    continue
                record = cell_record(self.paths, h)  # it may have written its record just before ending
                if record is None or (record.get("status") != "ok" and record.get("attempt") != entry["attempt"]):
                    record = self._write_lost(cell, entry, state)
            del self.in_flight[h]
            self.gpu_groups.pop(h, None)
            if record["status"] != "ok" and entry["attempt"] <= self.options.max_retries:
                self.say(f"{cell.cell_id}: failed ({record['error'].splitlines()[0]}), submitting it again "
                         f"(attempt {entry['attempt'] + 1} of {self.options.max_retries + 1})")
                retry.append((cell, entry["attempt"] + 1))
                continue
            changed = True
            self.written.append(record)
            detail = "" if record["status"] == "ok" else f" ({record['error'].splitlines()[0]}); see {record.get('log')}"
            self.say(f"{cell.cell_id}: {record['status']}{detail}")
        if retry:
            self.submit(retry)
        elif self.queue:
            self._submit_local()
            save_jobs(self.paths, self.jobs)
        return changed

    def _write_lost(self, cell: Cell, entry: dict[str, Any], state: str) -> dict[str, Any]:
        """A job that ended without writing a record (killed, out of memory, node failure): a failed record."""
        log = self.paths.work(cell.config_hash) / "log.txt"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        record = {**{k: v for k, v in cell.to_dict().items() if k != "config"}, "status": "failed", "metrics": {},
                  "error": f"job {entry['job_id']} ended ({state}) without a result\n{tail}", "grid": self.grid.name,
                  "attempt": entry["attempt"], "job_id": entry["job_id"], "log": str(log)}
        write_json_atomically(self.paths.result(cell.config_hash), record)
        return record


def run_cluster(grid: Grid, options: LauncherOptions, wait: bool = True, poll_s: float = POLL_S,
                log: Any = None) -> list[dict[str, Any]]:
    """Submit the grid's unfinished cells (``grid`` checked by runner.prepare) and, with ``wait``, wait for
    them, collecting as they finish; returns the final records of the cells that finished meanwhile."""
    driver = Driver(grid, options, log)
    done = finished_hashes(grid)
    todo = [c for c in grid.cells if c.config_hash not in done]
    driver.resources = driver.check(todo)
    if done:
        driver.say(f"skipping {len(done)} finished cell(s)")
    fresh = []
    states = job_states([e for c in todo if (e := driver.jobs.get(c.config_hash))], force=True)
    for cell in todo:
        entry = driver.jobs.get(cell.config_hash)
        record = cell_record(driver.paths, cell.config_hash)
        recorded = entry is not None and record is not None and record.get("attempt") == entry["attempt"]
        if entry and not recorded and not job_ended(states[str(entry["job_id"])]):
            driver.in_flight[cell.config_hash] = entry  # submitted by an earlier driver, still in flight
        elif entry and entry["attempt"] <= options.max_retries:  # an earlier driver's attempt failed, retries left
            driver.say(f"{cell.cell_id}: failed meanwhile, submitting it again "
                       f"(attempt {entry['attempt'] + 1} of {options.max_retries + 1})")
            fresh.append((cell, entry["attempt"] + 1))
        else:
            fresh.append((cell, 1))  # a new round: failed cells are run again, as the local runner does
    if driver.in_flight:
        driver.say(f"{len(driver.in_flight)} cell(s) still in flight from an earlier submission: waiting for them")
    if fresh:
        driver.submit(fresh)
    if not wait:
        if driver.queue:
            driver.say(f"{len(driver.queue)} cell(s) wait for a free slot: they are submitted when the driver runs again")
        driver.say("not waiting; `rocoft-bench status` shows the cells, `rocoft-bench collect` merges their results")
        return []
    try:
        while driver.in_flight or driver.queue:
            if driver.poll():
                collect(grid)
            if driver.in_flight or driver.queue:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        driver.say("driver interrupted: the submitted jobs go on; run the same command again to wait for them")
        raise
    finally:
        collect(grid)
    return driver.written
