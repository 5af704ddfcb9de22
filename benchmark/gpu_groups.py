"""GPU groups for `rocoft-bench run`: each cell gets as many GPUs as its trainer uses, never a shared one.

A cell's need comes from the ``trainer`` section of its merged config (benchmark/grid.py):

* ``accelerator`` ``cpu`` (or any other non-GPU accelerator) needs no GPU; neither does ``auto`` (Lightning's
  default) when no GPU is visible, since Lightning then runs on the CPU.
* ``accelerator`` ``gpu``, ``cuda`` or ``auto`` with ``devices`` N >= 1 (an int or "N") needs N GPUs; ``-1``
  or ``"auto"`` needs every visible GPU. A list of ids (``[0, 1]`` or ``"0,1"``) needs as many GPUs as it
  names, and must be 0..n-1: inside a cell the ids index its group, not the machine. ``devices`` unset
  needs one GPU (Lightning's own default would be all of them): the paper presets leave it unset and mean
  one GPU per cell, so their effective batch size is the paper's (DDP over more GPUs would multiply it).
* ``num_nodes`` > 1 cannot run here (see Clusters).

Before any cell starts, ``cell_needs`` raises one GridError listing every cell that cannot run on this
machine: more GPUs than visible (its need and what is visible), ids that are not 0..n-1, several nodes.

The local launcher: ``GpuPool`` holds the runner's visible GPU ids (those of its own CUDA_VISIBLE_DEVICES
when set, so a runner given GPUs 2,3 hands out only 2 and 3). A cell takes a group of free ids of its size,
waiting while too few are free, runs with CUDA_VISIBLE_DEVICES set to the group (comma-separated; Lightning
starts the per-GPU processes inside the cell) and gives the group back when it ends, however it ends.
Groups are handed out first come, first served: a cell waiting for a large group holds back the cells
that asked after it, even when a smaller group is free, so a large cell is never starved by a stream of
small ones (at the cost of GPUs left idle meanwhile; put large cells first in a grid, or in a grid of
their own). ``--jobs`` still bounds how many cells run at once. A cell that needs no GPU takes nothing
and never waits; on a machine with GPUs its CUDA_VISIBLE_DEVICES is empty, so it cannot touch theirs.

Clusters: the runner launches cells on the machine it runs on. On SLURM, run one runner per single-node
allocation, in the batch script itself or in a step that holds the allocation's GPUs:

    sbatch --nodes 1 --gres gpu:4 --wrap "rocoft-bench run GRID.yaml --jobs 4"
    srun --ntasks 1 --gres gpu:4 rocoft-bench run GRID.yaml --jobs 4      # inside salloc

SLURM's CUDA_VISIBLE_DEVICES (the allocation's GPUs) becomes the pool. Several allocations may run the same
grid on a shared file system; cell claims keep each cell to one runner (a claim left by a runner on another
node that died stays until its file is removed, benchmark/claims.py). A cell is the runner's child, not an
srun task, so the runner hides SLURM's task count from it (benchmark/runner.py) and Lightning starts the
cell's per-GPU processes itself. A cell with ``num_nodes`` > 1 is refused: its ranks on every node must be
started by the cluster's launcher (``srun --nodes N --ntasks-per-node G``, one task per GPU, which
Lightning's SLURMEnvironment reads), and a runner on one node cannot start processes on others. Run such
cells with the slurm launcher (`rocoft-bench run GRID.yaml --launcher slurm`, benchmark/cluster.py), which
submits each cell as a SLURM job of its own with the GPUs, nodes and tasks it needs, or lower ``num_nodes``.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any, Iterable, Optional

from .grid import Cell, GridError

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def _device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def visible_gpus() -> list[str]:
    """The GPU ids this runner may hand out: its own CUDA_VISIBLE_DEVICES entries when set (a cell's
    CUDA_VISIBLE_DEVICES replaces the runner's, so it must name the same physical GPUs), else 0..n-1."""
    count = _device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in given.split(",") if g.strip()][:count]  # CUDA ignores entries past a bad one


def _accelerator(trainer: dict[str, Any]) -> str:
    value = trainer.get("accelerator") or "auto"
    if isinstance(value, dict):  # {class_path: lightning.pytorch.accelerators.CUDAAccelerator}
        value = str(value.get("class_path", "")).rsplit(".", 1)[-1].lower().removesuffix("accelerator")
    return str(value).lower()


def _count(devices: Any, visible: int) -> int:
    """GPUs ``trainer.devices`` asks for (ValueError when the runner cannot honour it)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return max(visible, 1)
        devices = [int(d) for d in text.split(",") if d.strip()] if "," in text else int(text)
    if isinstance(devices, (list, tuple)):
        if sorted(devices) != list(range(len(devices))):
            raise ValueError(
                f"trainer.devices {list(devices)} names GPU ids, but a cell's ids index the group the runner "
                f"gives it; give a count instead (trainer.devices: {len(devices)})"
            )
        return len(devices)
    if isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1):
        return devices if devices >= 1 else max(visible, 1)
    raise ValueError(f"trainer.devices must be a count >= 1, -1, 'auto' or a list of ids, got {devices!r}")


def gpu_need(config: dict[str, Any], visible: int) -> int:
    """GPUs a cell with this merged config uses, given ``visible`` GPUs; ValueError for a multi-node cell."""
    trainer = config.get("trainer") or {}
    nodes = trainer.get("num_nodes")
    if nodes is not None and int(nodes) > 1:
        raise ValueError(
            f"trainer.num_nodes is {nodes}: the local launcher runs a cell on this machine only; run multi-node "
            "cells under a cluster launcher (`rocoft-bench run --launcher slurm`, see benchmark/gpu_groups.py)"
        )
    accelerator = _accelerator(trainer)
    if accelerator not in GPU_ACCELERATORS or (accelerator == "auto" and not visible):
        return 0
    devices = trainer.get("devices")
    return 1 if devices is None else _count(devices, visible)


def _visible_text(gpus: list[str]) -> str:
    return f"{len(gpus)} visible ({','.join(gpus)})" if gpus else "none visible"


def cell_needs(cells: Iterable[Cell], gpus: list[str]) -> dict[str, int]:
    """cell_id -> GPUs it needs; one GridError listing every cell that cannot run here (cells with the same
    problem on one line), so a grid does not fail hours in when it reaches a cell too big for the machine."""
    needs: dict[str, int] = {}
    problems: dict[str, list[str]] = {}
    for cell in cells:
        try:
            needs[cell.cell_id] = gpu_need(cell.config, len(gpus))
        except ValueError as err:
            problems.setdefault(str(err), []).append(cell.cell_id)
            continue
        if needs[cell.cell_id] > len(gpus):
            devices = (cell.config.get("trainer") or {}).get("devices")
            asked = "unset" if devices is None else repr(devices)
            problem = f"needs {needs[cell.cell_id]} GPU(s) (trainer.devices {asked}), {_visible_text(gpus)}"
            problems.setdefault(problem, []).append(cell.cell_id)
    if problems:
        lines = [
            f"{ids[0]}{f' (and {len(ids) - 1} more cell(s) like it)' if len(ids) > 1 else ''}: {problem}"
            for problem, ids in problems.items()
        ]
        raise GridError(
            f"{len(lines)} problem(s) with the GPUs or nodes of cells, no cell was started:\n- " + "\n- ".join(lines)
        )
    return needs


class GpuPool:
    """Free GPU ids, handed out in groups, first come, first served (see the module docstring)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        self._free = list(ids)
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    def acquire(self, n: int) -> list[str]:
        """``n`` free ids (lowest first), waiting for them and for every caller that asked earlier."""
        if n > len(self.ids):
            raise ValueError(f"{n} GPU(s) asked for, the pool holds {len(self.ids)}")
        if n <= 0:
            return []
        turn = object()
        with self._changed:
            self._queue.append(turn)
            self._changed.wait_for(lambda: self._queue[0] is turn and len(self._free) >= n)
            self._queue.popleft()
            group, self._free = self._free[:n], self._free[n:]
            self._changed.notify_all()  # the next in line may fit in what is left
            return group

    def release(self, group: list[str]) -> None:
        with self._changed:
            self._free = [i for i in self.ids if i in self._free or i in group]
            self._changed.notify_all()

    def free(self) -> list[str]:
        with self._changed:
            return list(self._free)

    def waiting(self) -> int:
        """Callers waiting for a group."""
        with self._changed:
            return len(self._queue)


def group_env(group: list[str], gpus: list[str]) -> Optional[str]:
    """A cell's CUDA_VISIBLE_DEVICES: its group; empty for a CPU cell on a GPU machine; None (left as
    the runner's) without GPUs, so CPU-only runs behave as before."""
    return ",".join(group) if gpus else None
