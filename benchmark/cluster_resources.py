"""What a cell asks of a cluster (GPUs, nodes, tasks, time), the sbatch parameters for it, and the
dry-run plan of a grid (`rocoft-bench run --dry-run`).

A cell's GPUs per node come from its trainer, as for the local launcher (benchmark/gpu_groups.py:
``trainer.devices``; unset means one; ``-1`` / ``"auto"`` means the launcher's ``gpus_per_cell``), its
nodes from ``trainer.num_nodes``. On SLURM it runs one task per GPU (``--ntasks-per-node`` = GPUs per node,
``--gpus-per-node`` = the same), because Lightning's SLURMEnvironment takes each rank from an srun task
and refuses a task count per node other than ``trainer.devices``; a CPU cell is one task. Its time limit is
the launcher's ``time_min``, else the cell's ``timeout_s``. Cells with the same needs share one job array.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .gpu_groups import gpu_need
from .grid import Cell
from .launcher_options import LauncherOptions


@dataclass(frozen=True)
class CellResources:
    gpus: int            # per node
    nodes: int
    tasks_per_node: int
    time_min: int

    @property
    def gpu_hours(self) -> float:
        """GPU hours the time limit books (an upper bound of what the cell uses)."""
        return self.gpus * self.nodes * self.time_min / 60


def cell_resources(cell: Cell, options: LauncherOptions) -> CellResources:
    """ValueError naming the cell when it cannot run under this launcher."""
    trainer = dict(cell.config.get("trainer") or {})
    nodes = int(trainer.pop("num_nodes", None) or 1)
    if nodes > 1 and options.kind != "slurm":
        raise ValueError(f"{cell.cell_id}: trainer.num_nodes {nodes} needs the slurm launcher")
    config = {**cell.config, "trainer": trainer}  # num_nodes apart: that is nodes, not GPUs
    try:
        gpus = gpu_need(config, options.gpus_per_cell)
    except ValueError as err:
        raise ValueError(f"{cell.cell_id}: {err}") from None
    tasks = gpus if options.kind == "slurm" and gpus else 1
    time_min = options.time_min or max(1, math.ceil(cell.timeout_s / 60))
    return CellResources(gpus=gpus, nodes=nodes, tasks_per_node=tasks, time_min=int(time_min))


def extra_sbatch(lines: Iterable[str]) -> dict[str, Any]:
    """``constraint=a100`` / ``--constraint=a100`` / ``#SBATCH --exclusive`` -> {"constraint": "a100",
    "exclusive": True}."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip().removeprefix("--")
        if not text or text.startswith("-"):
            raise ValueError(f"an extra sbatch line is a long option such as constraint=a100, got {line!r}")
        key, sep, value = text.partition("=")
        if not sep and " " in key:
            key, value = key.split(None, 1)
            sep = " "
        out[key.strip()] = value.strip() if sep else True
    return out


def slurm_parameters(options: LauncherOptions, res: CellResources, job_name: str) -> dict[str, Any]:
    """Parameters of submitit's SlurmExecutor (sbatch names) for cells needing ``res``."""
    params: dict[str, Any] = {
        "job_name": job_name, "time": res.time_min, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "array_parallelism": options.max_parallel, "signal_delay_s": options.signal_delay_s,
        "stderr_to_stdout": True,
    }
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    for name in ("partition", "account", "qos", "cpus_per_task"):
        if getattr(options, name) is not None:
            params[name] = getattr(options, name)
    additional = extra_sbatch(options.extra_sbatch)
    if options.mem is not None:  # submitit's own `mem` takes GB as a number; SLURM's text goes through as is
        additional.setdefault("mem", options.mem)
    if additional:
        params["additional_parameters"] = additional
    if options.setup:
        params["setup"] = list(options.setup)
    return params


def submitit_command(folder: Path) -> str:
    """The command SlurmExecutor puts in its batch script (its ``_submitit_command_str``)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_text(folder: Path, params: dict[str, Any], array_size: int) -> str:
    """The batch script SlurmExecutor submits for an array of ``array_size`` cells (no cluster needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(folder), folder=folder, map_count=array_size, **params)


# -- the dry run ---------------------------------------------------------------------------------------------
def resource_groups(cells: list[Cell], options: LauncherOptions) -> dict[CellResources, list[Cell]]:
    groups: dict[CellResources, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell_resources(cell, options), []).append(cell)
    return groups


def plan_text(grid_name: str, cells: list[Cell], finished: int, options: LauncherOptions) -> str:
    """The cells to run with their resources, then the totals: jobs, arrays, GPU hours."""
    rows = [(c, cell_resources(c, options)) for c in cells]
    width = max([len(c.cell_id) for c, _ in rows] + [4])
    lines = [f"grid {grid_name}: {len(cells) + finished} cell(s), {finished} finished (skipped), "
             f"{len(cells)} to run with the {options.kind} launcher", "",
             f"{'cell':<{width}}  GPUs  nodes  tasks  time (min)  GPU-h"]
    for cell, res in rows:
        lines.append(f"{cell.cell_id:<{width}}  {res.gpus:>4}  {res.nodes:>5}  {res.tasks_per_node:>5}  "
                     f"{res.time_min:>10}  {res.gpu_hours:>5.2f}")
    groups = Counter(res for _, res in rows)
    gpu_hours = sum(res.gpu_hours for _, res in rows)
    lines.append("")
    kinds = "; ".join(
        f"{n} x ({res.gpus} GPU(s) x {res.nodes} node(s), {res.tasks_per_node} task(s)/node, {res.time_min} min)"
        for res, n in sorted(groups.items(), key=lambda kv: -kv[1])
    )
    arrays = f" in {len(groups)} job array(s)" if options.kind == "slurm" else ""
    lines.append(f"jobs: {len(cells)}{arrays}: {kinds or 'none'}")
    per = " per job array" if options.kind == "slurm" else ""
    lines.append(f"GPU hours booked by the time limits (an upper bound): {gpu_hours:.1f}; "
                 f"at most {options.max_parallel} cell(s) at once{per} (max_parallel)")
    return "\n".join(lines)
