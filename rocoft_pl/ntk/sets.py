"""Named parameter sets for the NTK: all parameters, RoCoFT rows (theta_R), RoCoFT columns (theta_C), LoRA.

theta_R / theta_C are exactly what ``apply_rocoft(model, RoCoFTConfig(mode=..., rank=...))`` would train in
the targeted weights (same target matching, same index selection): the gradient of the zero-initialised
delta equals the gradient of those rows / columns of W, so slicing the weight gradient gives the same
kernel without changing the model. Heads are not included (the prompt-based f has none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import nn

from ..config import RoCoFTConfig
from ..inject import find_heads, find_targets
from ..layers import is_conv1d
from ..selection import select_indices
from .kernel import Spec


def rocoft_set(
    model: nn.Module,
    mode: str = "row",
    rank: int = 1,
    targets: Optional[Union[list[str], str]] = None,
    selection: str = "first",
    seed: int = 0,
) -> dict[str, Spec]:
    """theta_R (mode='row') or theta_C (mode='column') of ``model`` as a parameter set of weight slices."""
    if mode not in ("row", "column"):
        raise ValueError(f"mode must be 'row' or 'column', got {mode!r}")
    if selection not in ("first", "random"):
        raise ValueError("NTK parameter sets support selection 'first' or 'random' (Wanda needs calibration)")
    config = RoCoFTConfig(mode=mode, rank=rank, targets=targets, selection=selection, seed=seed)
    heads = find_heads(model, config)
    out: dict[str, Spec] = {}
    for name, module in find_targets(model, config, heads).items():
        idx = select_indices(module, name, mode, rank, config.p, selection, seed)
        # A row is an output feature: dim 0 of nn.Linear.weight (out x in), dim 1 of Conv1D.weight (in x out).
        kind = "rows" if (mode == "row") != is_conv1d(module) else "cols"
        out[f"{name}.weight"] = (kind, idx)
    return out


def lora_set(model: nn.Module) -> dict[str, Spec]:
    """Every LoRA parameter of a PEFT-wrapped model (names containing 'lora_').

    With PEFT's default init B = 0, so dF/dA = 0 and the LoRA kernel comes from B alone at initialisation.
    """
    out = {n: None for n, _ in model.named_parameters() if "lora_" in n}
    if not out:
        raise ValueError("model has no LoRA parameters (wrap it with peft.get_peft_model first)")
    return out


def rename_by_identity(
    sets: Mapping[str, Mapping[str, Spec]], old_params: Mapping[str, nn.Parameter], new: nn.Module
) -> dict[str, dict[str, Spec]]:
    """Translate sets named by ``old_params`` (``dict(model.named_parameters())`` taken before wrapping) to
    the names in ``new`` that hold the same tensors. ``peft.get_peft_model`` renames but keeps base weights.
    """
    by_id = {id(p): n for n, p in new.named_parameters()}
    result = {}
    for set_name, pset in sets.items():
        result[set_name] = {}
        for n, spec in pset.items():
            key = id(old_params[n])
            if key not in by_id:
                raise KeyError(f"{n} is not a parameter of the new model")
            result[set_name][by_id[key]] = spec
    return result


def set_size(model: nn.Module, pset: Mapping[str, Spec]) -> int:
    """Number of scalar parameters in a set."""
    from .kernel import spec_size

    params = dict(model.named_parameters())
    return sum(spec_size(params[n].shape, s if s is None else (s[0], torch.as_tensor(s[1]))) for n, s in pset.items())
