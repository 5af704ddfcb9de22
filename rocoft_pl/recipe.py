"""``learning_rate: auto``: RoCoFT's default learning rate from its mode and rank, no sweep needed.

The rule, lr = 2e-2 / sqrt(r) for rows and for columns (AdamW, head at the same rate), comes from a sweep of
r in {1, 3, 8, 16} x lr on two offline tasks (README, "Learning rates"): the best rate falls as the rank
grows, about as 1/sqrt(r) (more trained rows move the output further per step at the same per-entry step
that Adam takes). It is measured for 'row' and 'column' only: 'both' and 'entries' need an explicit rate.
"""

from __future__ import annotations

import math
from typing import Union

from torch import nn

AUTO = "auto"
# lr = SCALE[mode] / sqrt(rank)
SCALE = {"row": 2e-2, "column": 2e-2}


def auto_learning_rate(mode: str, rank: int) -> float:
    """The default AdamW learning rate of RoCoFT with ``rank`` rows or columns per matrix."""
    if mode not in SCALE:
        raise ValueError(
            f"learning_rate: auto has a measured rule for RoCoFT modes {sorted(SCALE)} only, not {mode!r}: "
            "give a number"
        )
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return SCALE[mode] / math.sqrt(rank)


def resolve_learning_rate(module: nn.Module, learning_rate: Union[float, str]) -> float:
    """``learning_rate`` as a number: itself, or for ``"auto"`` the rule for the RoCoFT layers in ``module``
    (call after RoCoFT was applied, as ``configure_optimizers`` is)."""
    if learning_rate != AUTO:
        if isinstance(learning_rate, str):
            raise ValueError(f"learning_rate must be a number or {AUTO!r}, got {learning_rate!r}")
        return float(learning_rate)
    from .inject import rocoft_layers

    layers = rocoft_layers(module).values()
    shapes = {(layer.mode, layer.index_sets["indices"].numel()) for layer in layers}
    if not shapes:
        raise ValueError(
            "learning_rate: auto is RoCoFT's rule (rocoft_pl.recipe) and this model has no RoCoFT layers: "
            "give full fine-tuning or another method a number"
        )
    if len(shapes) > 1:
        raise ValueError(f"learning_rate: auto needs one mode and rank for every layer, found {sorted(shapes)}")
    ((mode, rank),) = shapes
    return auto_learning_rate(mode, rank)


__all__ = ["AUTO", "auto_learning_rate", "resolve_learning_rate"]
