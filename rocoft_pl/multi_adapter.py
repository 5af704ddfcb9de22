"""Several adapters on one base, by name: add_adapter, set_adapter, delete_adapter, active_adapter, disable_adapter.

Every RoCoFT layer holds one ``RoCoFTDelta`` per adapter and computes with the active one, so switching is a
name change in each layer: no weights move, and ``disable_adapter`` gives the base model's outputs without a
copy of the model (a DPO or KL-to-base reference). Adapters on one base may select different rows, or differ
in mode and rank; they adapt the same layers and train only their deltas (a trained bias or head is one weight
of the base that all of them would share, so adding an adapter next to one that trains some is refused).

The active adapter's deltas train (requires_grad), the others are frozen. A model with one adapter, named
'default', is what apply_rocoft and load_adapter make. Every refusal leaves the model as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

from torch import nn

from .adapter import load_adapter
from .config import RoCoFTConfig
from .inject import (
    RoCoFTReport,
    adapter_names,
    apply_rocoft,
    attach_adapter,
    disabled,
    is_merged,
    named_adapters,
    rocoft_layers,
    unload_rocoft,
)
from .layers import check_adapter_name


def add_adapter(
    model: nn.Module,
    name: str,
    path_or_config: Union[str, os.PathLike, RoCoFTConfig],
    calibration: Optional[Iterable[Any]] = None,
    *,
    forward: Optional[Callable[..., Any]] = None,
    allow_nonfinite: bool = False,
) -> RoCoFTReport:
    """Add adapter ``name`` to ``model``, from a saved adapter directory (``load_adapter``) or a RoCoFTConfig
    (``apply_rocoft``: selected on the base model; ``calibration`` / ``forward`` for Wanda). It stays inactive
    (``set_adapter`` to use it) unless it is the model's first. Refused, with the model unchanged: a name in
    use, an adapter of another base (the adapter's base fingerprint differs), other layers than the model's
    adapters adapt, trained biases or heads, a merged model. Returns the report of the new adapter."""
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it first, or pick another name")
    if isinstance(path_or_config, RoCoFTConfig):
        if not rocoft_layers(model):
            return apply_rocoft(model, path_or_config, calibration, forward=forward, adapter_name=name)
        return attach_adapter(model, name, path_or_config, calibration, forward=forward)
    if isinstance(path_or_config, (str, os.PathLike)):
        return load_adapter(model, path_or_config, adapter_name=name, allow_nonfinite=allow_nonfinite)
    raise TypeError(f"add_adapter takes an adapter directory or a RoCoFTConfig, got {type(path_or_config).__name__}")


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter ``model``'s RoCoFT layers compute with."""
    layers = rocoft_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RoCoFT adapters (apply_rocoft, load_adapter or add_adapter first)")
    return next(iter(layers.values())).active_adapter


def set_adapter(model: nn.Module, name: str) -> None:
    """Compute with adapter ``name`` from now on; its deltas train, the other adapters' are frozen. Refused on a
    merged model (its weights hold the active adapter: ``unmerge_rocoft`` first)."""
    named_adapters(model, name)  # no adapters, or none of that name: raises with the names there are
    if name != active_adapter(model) and is_merged(model):
        raise ValueError(
            f"set_adapter: adapter {active_adapter(model)!r} is merged into the weights; unmerge_rocoft(model) "
            f"before switching to {name!r}"
        )
    for layer in rocoft_layers(model).values():
        layer.active_adapter = name
        for other, adapter in layer.adapters.items():
            adapter.requires_grad_(other == name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer. The active adapter goes only when it is the last one: the layers
    then become the plain base layers (W0; ``unload_rocoft``). With other adapters present, ``set_adapter`` to one
    of them first: which adapter the model then computes with is the caller's choice, not a silent one. A merged
    adapter is refused (``unmerge_rocoft`` first, or ``unload_rocoft`` to keep the merged weights)."""
    named_adapters(model, name)
    names, active = adapter_names(model), active_adapter(model)
    if name == active and is_merged(model):
        raise ValueError(
            f"delete_adapter: adapter {name!r} is merged into the weights; unmerge_rocoft(model) first, or "
            "unload_rocoft(model) to keep the merged weights as plain layers"
        )
    if name == active and len(names) > 1:
        others = [n for n in names if n != name]
        raise ValueError(
            f"delete_adapter: {name!r} is the active adapter; set_adapter(model, ...) to one of {others} first"
        )
    if len(names) == 1:
        unload_rocoft(model)
        return
    for layer in rocoft_layers(model).values():
        del layer.adapters[name]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model):`` every RoCoFT layer computes its base's output, bit-exactly the base model's
    (no copy of the model is made; the deltas get no gradient). Afterwards, also after an exception, each layer is
    as it was. Weights that train in place (a trained bias, a head) are the model's own: they stay as trained.
    Refused on a merged model, whose W0 holds the adapter (``unmerge_rocoft`` first)."""
    layers = rocoft_layers(model)
    if not layers:
        raise ValueError(f"disable_adapter: {type(model).__name__} has no RoCoFT adapters")
    if is_merged(model):
        raise ValueError(
            "disable_adapter: an adapter is merged into the weights, so the base outputs are gone until "
            "unmerge_rocoft(model)"
        )
    with disabled(layers.values()):
        yield model


__all__ = ["active_adapter", "add_adapter", "adapter_names", "delete_adapter", "disable_adapter", "set_adapter"]
