"""``learning_rate: auto``: RoCoFT's default learning rate from its mode, rank and step budget, no sweep needed.

The rule (AdamW, head at the same rate, cosine or linear decay over the run):

    lr = 2e-2 / sqrt(r) * sqrt(80 / T)        T = optimizer steps of the run (at least 80)

The rank term comes from a sweep of r in {1, 3, 8, 16} x lr on two offline tasks at T = 80 (README,
"Quality"): the best rate falls about as 1/sqrt(r) (more trained rows move the output further per step at
the same per-entry step that Adam takes). The budget term comes from 4x longer runs: there the T = 80 rates
sent 16 rows (and LoRA r=8 at its T = 80 rate) to the majority class on the movie reviews, and half the rate
trained as well as full fine-tuning; a rate that falls as 1/sqrt(T) keeps the distance Adam can travel,
lr * T, growing only as sqrt(T). For the paper's GLUE budgets (thousands of steps, r = 3) it gives 1e-3 to
3e-3, the range of the paper's Table 10. Measured for 'row' and 'column' only: 'both' and 'entries' need an
explicit rate.
"""

from __future__ import annotations

import math
from typing import Optional, Union

from torch import nn

AUTO = "auto"
# lr = SCALE[mode] / sqrt(rank) * sqrt(REFERENCE_STEPS / max(steps, REFERENCE_STEPS))
SCALE = {"row": 2e-2, "column": 2e-2}
REFERENCE_STEPS = 80


def auto_learning_rate(mode: str, rank: int, steps: Optional[int] = None) -> float:
    """The default AdamW learning rate of RoCoFT with ``rank`` rows or columns per matrix, for a run of
    ``steps`` optimizer steps (None: the reference budget, 80 steps)."""
    if mode not in SCALE:
        raise ValueError(
            f"learning_rate: auto has a measured rule for RoCoFT modes {sorted(SCALE)} only, not {mode!r}: "
            "give a number"
        )
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    budget = REFERENCE_STEPS if steps is None else max(steps, REFERENCE_STEPS)
    return SCALE[mode] / math.sqrt(rank) * math.sqrt(REFERENCE_STEPS / budget)


def resolve_learning_rate(module: nn.Module, learning_rate: Union[float, str], steps: Optional[int] = None) -> float:
    """``learning_rate`` as a number: itself, or for ``"auto"`` the rule for the RoCoFT layers in ``module`` and
    a run of ``steps`` optimizer steps (call after RoCoFT was applied, as ``configure_optimizers`` is)."""
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
    return auto_learning_rate(mode, rank, steps)


__all__ = ["AUTO", "REFERENCE_STEPS", "auto_learning_rate", "resolve_learning_rate"]
