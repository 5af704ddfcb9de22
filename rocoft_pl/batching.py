"""The batch of one optimizer step over every device: ``GlobalBatchSize``.

Lightning sets the batch per device (the datamodule's ``batch_size``) and the accumulation steps
(``trainer.accumulate_grad_batches``); the rows per optimizer step are their product times the world size, so
the same config on 8 GPUs silently trains with 8x the batch (and 8x fewer steps) it had on one. The paper gives
that product (Table 10: batch x accumulation). ``GlobalBatchSize(size)`` keeps it whatever the world size: the
datamodule's ``batch_size`` is read as the most rows one device may hold at once, and the per-device batch and
the accumulation follow (the fewest accumulation steps that fit), or the run stops before anything loads when
``size`` does not split over the devices.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl

from .callback_base import CALLBACK_BASES, log


def split_global_batch(size: int, world_size: int, max_per_device: int) -> tuple[int, int]:
    """``(per-device batch, accumulation steps)`` with ``per_device * world_size * accumulation == size`` and
    ``per_device <= max_per_device``, with the fewest accumulation steps (the largest per-device batch)."""
    for name, value in (("global batch size", size), ("world size", world_size), ("per-device batch size", max_per_device)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if size % world_size:
        lower, upper = size // world_size * world_size, math.ceil(size / world_size) * world_size
        nearest = " or ".join(str(n) for n in (lower, upper) if n > 0)
        raise ValueError(
            f"global batch size {size} does not split over {world_size} devices: it must be a multiple of "
            f"{world_size} (nearest: {nearest}); change the global batch size or the number of devices"
        )
    per_rank = size // world_size
    accumulation = next(a for a in range(math.ceil(per_rank / max_per_device), per_rank + 1) if per_rank % a == 0)
    return per_rank // accumulation, accumulation


class GlobalBatchSize(*CALLBACK_BASES):  # type: ignore[misc]
    """Train with ``size`` rows per optimizer step over all devices and accumulation steps.

    In ``setup`` (before any dataloader, optimizer or schedule exists) it sets the datamodule's ``batch_size``
    to the per-device batch and ``trainer.accumulate_grad_batches`` to the accumulation that give ``size`` at
    this run's world size, and logs the split. Leave ``accumulate_grad_batches`` at 1: it is derived here.

    The ``rocoft`` CLI has it as a top-level group: ``global_batch: {size: 16}`` in a config, or
    ``--global_batch.size 16``.

    Args:
        size: rows per optimizer step, over every device and accumulation step (the paper's batch x accumulation);
            None: off (the datamodule's ``batch_size`` and ``trainer.accumulate_grad_batches`` as given).
    """

    def __init__(self, size: Optional[int] = None) -> None:
        super().__init__()
        if size is not None:
            split_global_batch(size, 1, size)  # the value alone must be valid
        self.size = size
        self.split: Optional[tuple[int, int]] = None  # (per device, accumulation), once set up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.size is None:
            return
        datamodule: Any = trainer.datamodule
        max_per_device = getattr(datamodule, "batch_size", None)
        if datamodule is None or isinstance(max_per_device, bool) or not isinstance(max_per_device, int):
            raise ValueError(
                "GlobalBatchSize needs a LightningDataModule with an int `batch_size` (the most rows per device)"
            )
        derived = self.split[1] if self.split is not None else 1  # a second fit() on this trainer: ours
        if trainer.accumulate_grad_batches != derived:
            raise ValueError(
                f"GlobalBatchSize({self.size}) derives the accumulation steps; leave trainer.accumulate_grad_batches "
                f"at 1 (it is {trainer.accumulate_grad_batches})"
            )
        per_device, accumulation = split_global_batch(self.size, trainer.world_size, max_per_device)
        datamodule.batch_size = per_device
        trainer.accumulate_grad_batches = accumulation
        self.split = (per_device, accumulation)
        if trainer.is_global_zero:
            log.info(
                "global batch %d = %d device(s) x %d rows x %d accumulation step(s)",
                self.size, trainer.world_size, per_device, accumulation,
            )


__all__ = ["GlobalBatchSize", "split_global_batch"]
