"""Several adapters on one base, by name: add_adapter, set_adapter, delete_adapter, active_adapter, disable_adapter.

Every RoCoFT layer holds one ``RoCoFTDelta`` per adapter and computes with the active one, so switching is a
name change in each layer: no weights move, and ``disable_adapter`` gives the base model's outputs without a
copy of the model (a DPO or KL-to-base reference). Adapters on one base may select different rows, or differ
in mode and rank; they adapt the same layers and train only their deltas (a trained bias or head is one weight
of the base that all of them would share, so adding an adapter next to one that trains some is refused).

The active adapter's deltas train (requires_grad), the others are frozen. A model with one adapter, named
'default', is what apply_rocoft and load_adapter make. Every refusal leaves the model as it was.

Serving several adapters: ``swap_merged_adapter`` changes the merged adapter in place (r rows / columns per
matrix and adapter, from the merge record: W0 stays bit-exact), and ``mixed_adapters`` runs one batch whose
examples each use their own adapter (or the base), unmerged, for models whose forward takes no
``adapter_names``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
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
    layers_holding,
    named_adapters,
    rocoft_layers,
    unload_rocoft,
)
from .layers import BASE_ADAPTER, MixedBatch, RoCoFTLinear, check_adapter_name
from .quantized import check_exact_merges, is_quantized


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
    layers, _ = layers_holding(model, name)  # no adapters, or none of that name: raises with the names there are
    active = next(iter(layers.values())).active_adapter
    if name != active and any(layer.merged for layer in layers.values()):
        raise ValueError(
            f"set_adapter: adapter {active!r} is merged into the weights; unmerge_rocoft(model) before switching to {name!r}"
        )
    _activate(layers, name)


def _activate(layers: Mapping[str, RoCoFTLinear], name: str) -> None:
    """``name`` active in every layer: its deltas train, the other adapters' are frozen."""
    for layer in layers.values():
        layer.active_adapter = name
        for other, adapter in layer.adapters.items():
            adapter.set_trainable(other == name)


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


def _check_swappable(layers: Mapping[str, RoCoFTLinear]) -> None:
    """A swap needs every layer merged (merge_rocoft) and none re-selected (whose record is a folded W0)."""
    merged = [n for n, layer in layers.items() if layer.merged]
    if not merged:
        raise ValueError("swap_merged_adapter: no adapter is merged (merge_rocoft first; or set_adapter, which moves no weights)")
    if len(merged) != len(layers):
        raise ValueError(f"swap_merged_adapter: only {len(merged)} of {len(layers)} RoCoFT layers are merged")
    folded = [n for n, layer in layers.items() if getattr(layer, "reselection", None) is not None]
    if folded:
        raise ValueError(
            f"swap_merged_adapter: {len(folded)} layers (e.g. {folded[0]!r}) hold re-selected RoCoFT layers: "
            "call rocoft_pl.reselect.consolidate(model) first"
        )


@torch.no_grad()
def _check_exact_swap(layers: Mapping[str, RoCoFTLinear], name: str) -> None:
    """A quantized W0 takes adapter ``name`` only where that is exact: checked on W0 itself (the merged adapter
    taken out and put back: deterministic, so the layers end as they were), before any layer swaps."""
    quantized = {n: layer for n, layer in layers.items() if is_quantized(layer.base)}
    merged = {n: layer._merged.adapter for n, layer in quantized.items()}  # type: ignore[union-attr]
    for layer in quantized.values():
        layer.unmerge()
        layer.active_adapter = name
    try:
        check_exact_merges(quantized)
    except ValueError as error:
        raise ValueError(f"swap_merged_adapter to {name!r}: {error}") from None
    finally:
        for n, layer in quantized.items():
            layer.active_adapter = merged[n]
            layer.merge()


def swap_merged_adapter(model: nn.Module, name: str) -> nn.Module:
    """On a model with an adapter merged (``merge_rocoft``), merge adapter ``name`` instead, in place: each layer
    puts back the merged adapter's saved W0 rows / columns and merges ``name``'s (saving its own), so a swap
    touches r rows or columns per matrix and adapter, never a whole weight, and ``unmerge_rocoft`` afterwards
    restores W0 bit-exactly. ``name`` becomes the active adapter. Swapping to the merged adapter changes nothing.
    Refused, the model unchanged: nothing merged, an unknown name, re-selected layers, or a quantized W0 that
    cannot take ``name``'s deltas exactly (see ``merge_rocoft``). Returns ``model``."""
    layers, _ = layers_holding(model, name)  # no adapters, or none of that name: raises with the names there are
    _check_swappable(layers)
    if all(layer._merged.adapter == name for layer in layers.values()):  # type: ignore[union-attr]
        return model
    _check_exact_swap(layers, name)
    for layer in layers.values():
        layer.swap_merged(name)
    _activate(layers, name)
    return model


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """``with mixed_adapters(model, names):`` each example of the next batches computes with its own adapter:
    ``names`` holds one adapter name per example (``"__base__"``: the base model, as ``disable_adapter``). What
    PEFT's ``model(**batch, adapter_names=...)`` does, for any model's forward. Nothing is merged or copied:
    every RoCoFT layer adds to the base's output each example's own row / column terms: when the adapters in the
    batch share a mode and rank, one batched product per layer for all of them (each example's r rows / columns
    gathered); otherwise one product per adapter on its examples. Inference only (under ``torch.no_grad()`` /
    ``torch.inference_mode()``; the fused training path is untouched). Refused: unknown names, adapters of mode
    'entries', a merged model, inside ``disable_adapter`` or another ``mixed_adapters``; a forward whose batch
    size differs from ``len(names)`` raises. Afterwards, also after an exception, each layer is as it was."""
    layers = rocoft_layers(model)
    if not layers:
        raise ValueError(f"mixed_adapters: {type(model).__name__} has no RoCoFT adapters")
    names = list(names)
    known = adapter_names(model)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if not names or unknown:
        raise ValueError(f"mixed_adapters: give one name per example, of {known} or {BASE_ADAPTER!r}; got {names}")
    dense = sorted({n for n in names if n != BASE_ADAPTER and any(l.adapters[n].mode == "entries" for l in layers.values())})
    if dense:
        raise ValueError(f"mixed_adapters: adapters {dense} have mode 'entries' (a dense delta per forward); not supported")
    if is_merged(model):
        raise ValueError("mixed_adapters: an adapter is merged into the weights; unmerge_rocoft(model) first")
    if any(layer.disabled for layer in layers.values()):
        raise ValueError("mixed_adapters inside disable_adapter: use the name '__base__' for base examples instead")
    if any(layer.mixed is not None for layer in layers.values()):
        raise ValueError("mixed_adapters inside mixed_adapters: one set of names at a time")
    batch = MixedBatch.of(names)
    for layer in layers.values():
        layer.mixed = batch
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.mixed = None


__all__ = [
    "active_adapter",
    "add_adapter",
    "adapter_names",
    "delete_adapter",
    "disable_adapter",
    "mixed_adapters",
    "set_adapter",
    "swap_merged_adapter",
]
