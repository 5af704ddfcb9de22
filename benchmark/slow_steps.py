"""A callback that holds every training batch for a while: for tests and fault injection that interrupt a
cell mid-run (a tiny cell would otherwise finish before the interruption lands)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class SlowSteps(pl.Callback):
    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)
