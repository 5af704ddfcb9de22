"""The DataLoader the task DataModules build: one place for how batches are drawn and how workers live."""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import DataLoader


def task_loader(dataset: Any, batch_size: int, shuffle: bool, collate_fn: Callable[[list], Any], num_workers: int) -> DataLoader:
    """Shuffled for training, in order for evaluation; workers (if any) persist across epochs, which saves
    re-forking them (and re-importing the tokenizer) every validation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
