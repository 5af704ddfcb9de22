"""A cell's environment: its launcher's, without the distributed launch variables of a parent run.

A cell started by a launcher on the machine it runs on (`rocoft-bench run` itself, submitit's local
executor) is that launcher's child, not an srun task: with SLURM's task count visible, Lightning would
expect srun to have started one process per GPU instead of starting them itself. A cell that *is* an srun
task (the slurm launcher, one task per GPU) keeps them: that is how Lightning's SLURMEnvironment finds its
rank.
"""

from __future__ import annotations

import os
from typing import Optional

STRIP_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
             "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE")


def cell_env(device: Optional[str]) -> dict[str, str]:
    """The launcher's environment for a cell: launch variables stripped, CUDA_VISIBLE_DEVICES its group
    (``device``: comma-separated ids; None keeps the launcher's)."""
    env = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env
