"""Re-selection: every K steps fold the trained rows into W0 and train other rows (modes 'row' and 'column').

A round, per layer: ``fold`` adds the delta into W0 on the current rows (columns), zeroes it and moves the
indices to the r rows a criterion picks, so the function is unchanged and the same delta Parameter (same
optimizer slot) trains the new rows. The criteria (``row_scores``):

    gradient  norm of the full weight gradient's row (column), G = dL/dy^T x, from one probe step: where
              a step on the whole row would move the loss most (one out x in product per layer and probe backward)
    wanda     selection.wanda_scores of the current weight W0 + R with ||x_j||_2 of the probe's tokens
    random    a seeded draw per (seed, module name, round): every DDP rank draws the same

W0's original values of every row (column) a fold changes are kept on the layer (``layer.reselection``, a
``Folded``) the first time it changes, so ``consolidate`` can turn the run back into one adapter exact
against the original W0: delta = (W0 + R)[touched] - W0_original[touched] over every row ever trained. That
adapter has R = max over layers of the rows touched (one rank for the format; layers with fewer are padded
with untouched rows whose delta is zero, which changes nothing): up to r * (rounds + 1) rows per layer, so
R * in (rows) or out * R (columns) elements per layer instead of r * in. Saving or merging a folded,
unconsolidated model is refused (it would silently drop every folded row).

Low-precision W0 (bf16 weights): each fold rounds W0 + R to W0's dtype, as ``merge`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .inject import rocoft_layers
from .layers import RoCoFTLinear, add_along
from .quantized import is_quantized
from .selection import _valid_tokens, module_generator, select_from_scores, wanda_scores

Criterion = Literal["gradient", "wanda", "random"]
CRITERIA = ("gradient", "wanda", "random")
RESELECT_MODES = ("row", "column")

NOT_CONSOLIDATED = "re-selected RoCoFT layers: call rocoft_pl.reselect.consolidate(model) first"
QUANTIZED_W0 = "re-selection folds the delta into W0, and a quantized W0 (4 / 8 bits) cannot take it exactly: train without reselect_every"


@dataclass
class Folded:
    """What a layer's folds changed in W0: ``touched``, the sorted rows (columns) any fold modified, and
    ``originals``, their values before the first fold (rows: (k, in); columns: (out, k); W0's dtype and
    device). Kept on the layer as ``layer.reselection``."""

    touched: torch.Tensor
    originals: torch.Tensor


def _dim(layer: RoCoFTLinear) -> int:
    """The axis of the logical (out x in) weight that the layer's indices index (and the check that re-selection
    can work on the layer: every function here goes through it)."""
    if layer.mode not in RESELECT_MODES:
        raise ValueError(f"re-selection works in modes {RESELECT_MODES}, not {layer.mode!r}")
    if len(layer.adapters) > 1:
        # A fold writes the active adapter into W0, which every other adapter of the layer computes with.
        raise ValueError(
            f"re-selection works on a layer with one adapter, this one has {list(layer.adapters)}: "
            "delete_adapter the others (save_adapter them first to keep them)"
        )
    return layer.parts[0].dim


def folded_state(layer: RoCoFTLinear) -> Optional[Folded]:
    """The layer's ``Folded`` record, or None if no fold touched it (or it was consolidated)."""
    return getattr(layer, "reselection", None)


def is_folded(model: nn.Module) -> bool:
    """Whether any RoCoFT layer of ``model`` holds folded rows that ``consolidate`` has not turned back into
    a delta: its W0 is then not the original, and its delta covers only the current rows."""
    return any(folded_state(layer) is not None for layer in rocoft_layers(model).values())


def _remember_originals(layer: RoCoFTLinear, rows: torch.Tensor) -> None:
    """Record W0's values of ``rows`` not recorded yet (before a fold changes them for the first time)."""
    weight, dim = layer._logical_weight(), _dim(layer)
    state = folded_state(layer)
    rows = rows.to(weight.device)
    if state is None:
        fresh, touched, originals = rows, rows[:0], weight.index_select(dim, rows[:0])
    else:
        touched, originals = state.touched, state.originals
        fresh = rows[~torch.isin(rows, touched)]
    touched = torch.cat([touched, fresh])
    originals = torch.cat([originals, weight.index_select(dim, fresh).clone()], dim=dim)
    order = torch.argsort(touched)
    layer.reselection = Folded(touched=touched[order], originals=originals.index_select(dim, order))


def _checked_new(layer: RoCoFTLinear, new_indices: torch.Tensor) -> torch.Tensor:
    new = torch.as_tensor(new_indices, dtype=torch.long).flatten().cpu()
    r = layer.indices.numel()
    limit = layer.out_features if _dim(layer) == 0 else layer.in_features
    if new.numel() != r or new.unique().numel() != r:
        raise ValueError(f"fold: need {r} unique new indices (the delta's rank), got {new.tolist()}")
    if int(new.min()) < 0 or int(new.max()) >= limit:
        raise ValueError(f"fold: new indices out of range [0, {limit})")
    return torch.sort(new).values


@torch.no_grad()
def fold(layer: RoCoFTLinear, new_indices: torch.Tensor) -> None:
    """Add the delta into W0 on the current rows (columns), zero it, and train ``new_indices`` from now on.

    The layer computes the same function before and after (up to rounding: W0 + R in W0's dtype, as
    ``merge``). W0's original values of the rows changed are kept first (``Folded``). The delta Parameter
    stays the same object (same shape: r new indices), so the optimizer keeps it; its state is the
    caller's to reset.
    """
    dim = _dim(layer)
    if layer.merged:
        raise ValueError("fold: the layer is merged; unmerge it first")
    weight = layer._logical_weight()
    if hasattr(weight, "full_tensor"):
        raise ValueError("fold: W0 is sharded (DTensor, FSDP2 / tensor parallel); re-selection is not supported there")
    if is_quantized(layer.base):
        raise ValueError(QUANTIZED_W0)
    new = _checked_new(layer, new_indices)
    current = layer.indices
    _remember_originals(layer, current)
    add_along(weight, dim, current.to(weight.device), layer.delta)
    layer.delta.zero_()
    layer.set_indices({"indices": new})


# -- what a probe step saw, and the scores -------------------------------------------------------------


@dataclass
class ProbeStats:
    """Sufficient statistics of the probe batches for one layer: ``input_sq``, per input feature the sum of
    x_j^2 over tokens (wanda; float64, as selection.collect_input_norms); ``grad_sq``, per row (column) the
    squared norm of the full weight gradient G = grad_y^T x, summed over the probe's backward passes (with
    gradient accumulation: per micro-batch, so no weight-sized buffer outlives one layer's backward)."""

    input_sq: Optional[torch.Tensor] = None
    grad_sq: Optional[torch.Tensor] = None

    def add_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        x = _valid_tokens(x.detach(), mask).double()
        sq = (x * x).sum(dim=0)
        self.input_sq = sq if self.input_sq is None else self.input_sq + sq

    def add_gradient(self, x: torch.Tensor, grad_y: torch.Tensor, dim: int) -> None:
        g = grad_y.detach().reshape(-1, grad_y.shape[-1]).float()
        full = g.t() @ x.detach().reshape(-1, x.shape[-1]).float()  # (out x in), logical also for Conv1D
        sq = full.square().sum(dim=1 - dim)
        self.grad_sq = sq if self.grad_sq is None else self.grad_sq + sq


def reselect_generator(seed: int, name: str, round_: int) -> torch.Generator:
    """The random criterion's generator: one stream per (seed, module, round), the same on every rank."""
    return module_generator(seed, name, f"reselect{round_}")


def _effective_weight(layer: RoCoFTLinear) -> torch.Tensor:
    """W0 + R as a dense logical (out x in) copy (wanda scores the weight the model has now)."""
    weight = layer._logical_weight().detach()
    return weight.to(layer.delta.dtype).index_add(_dim(layer), layer.indices, layer.delta.detach())


def scores_from_stats(
    layer: RoCoFTLinear, criterion: Criterion, stats: Optional[ProbeStats], generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One score per row (mode 'row') or column (mode 'column'); higher is picked first."""
    dim = _dim(layer)
    n = layer.out_features if dim == 0 else layer.in_features
    if criterion == "random":
        if generator is None:
            raise ValueError("the random criterion needs a generator (reselect_generator)")
        return torch.rand(n, generator=generator)
    if criterion == "gradient":
        if stats is None or stats.grad_sq is None:
            raise ValueError("the gradient criterion needs a probe backward pass through the layer")
        return stats.grad_sq.sqrt()
    if criterion == "wanda":
        if stats is None or stats.input_sq is None:
            raise ValueError("the wanda criterion needs probe inputs of the layer")
        return wanda_scores(_effective_weight(layer), stats.input_sq.sqrt(), layer.mode)
    raise ValueError(f"unknown re-selection criterion {criterion!r}; one of {CRITERIA}")


def row_scores(
    layer: RoCoFTLinear,
    x: Optional[torch.Tensor],
    grad_y: Optional[torch.Tensor],
    criterion: Criterion,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Scores of one probe batch: ``x`` the layer's input (..., in), ``grad_y`` dL/d(output) (..., out)
    (gradient only), ``generator`` (random only)."""
    stats = ProbeStats()
    if criterion == "wanda" and x is not None:
        stats.add_inputs(x)
    if criterion == "gradient" and x is not None and grad_y is not None:
        stats.add_gradient(x, grad_y, _dim(layer))
    return scores_from_stats(layer, criterion, stats, generator)


def pick(layer: RoCoFTLinear, scores: torch.Tensor) -> torch.Tensor:
    """The r (the layer's current rank) highest-scoring rows (columns), sorted."""
    return select_from_scores(scores.detach().cpu(), layer.indices.numel(), "max")


def attach_probe(
    layers: Mapping[str, RoCoFTLinear],
    criterion: Criterion,
    mask: Callable[[], Optional[torch.Tensor]] = lambda: None,
) -> tuple[dict[str, ProbeStats], list[RemovableHandle]]:
    """Forward hooks on the RoCoFT layers themselves (a hook on the base would disable the fused node) that
    fill a ``ProbeStats`` per layer from every grad-enabled forward (and its backward) until the handles are
    removed. ``mask`` returns the current batch's attention mask (wanda leaves padding out). The gradient
    criterion keeps each layer's input until its backward (in mode 'column' an activation the fused node
    would not keep) and takes dL/dy with a hook on the output, which fires with the gradient of the output
    as returned even if a later op changes it in place."""
    stats = {name: ProbeStats() for name in layers}
    handles = []

    def hook_for(name: str, layer: RoCoFTLinear):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            x = args[0]
            if criterion == "wanda":
                stats[name].add_inputs(x, mask())
            elif criterion == "gradient" and out.requires_grad:
                x = x.detach()
                out.register_hook(lambda g: stats[name].add_gradient(x, g, _dim(layer)))

        return hook

    if criterion != "random":
        handles = [layer.register_forward_hook(hook_for(n, layer)) for n, layer in layers.items()]
    return stats, handles


# -- back to one adapter -------------------------------------------------------------------------------


@dataclass
class Consolidated:
    """What ``consolidate`` made: the common ``rank`` R, rows (columns) touched per layer (before padding to
    R), and the elements of all deltas now (what the adapter stores)."""

    rank: int
    touched: dict[str, int]
    elements: int


@torch.no_grad()
def consolidate(model: nn.Module) -> Consolidated:
    """Turn every folded layer back into a plain RoCoFT layer exact against the original W0, in place.

    Per layer, over touched = the rows (columns) ever folded plus the current ones: delta = (W0 + R)[touched]
    - W0_original[touched], and W0's touched rows are restored bit-exactly. All layers get one rank R (the
    adapter format's): the largest touched count, the others padded with their lowest untouched rows at
    delta 0 (exact). The deltas become new Parameters (requires_grad, the layer's delta dtype): an
    optimizer built before no longer holds them. The RoCoFTConfig the layers record gets rank R, so
    save_adapter / load_adapter work unchanged. Without folded layers it changes nothing.
    """
    layers = rocoft_layers(model)
    if not any(folded_state(layer) is not None for layer in layers.values()):
        rank = max((layer.indices.numel() for layer in layers.values()), default=0)
        return Consolidated(rank, {n: layer.indices.numel() for n, layer in layers.items()}, _elements(layers))
    unions = {}
    for name, layer in layers.items():
        _dim(layer)
        if layer.merged:
            raise ValueError(f"consolidate: {name} is merged; unmerge it first")
        state, current = folded_state(layer), layer.indices.cpu()
        touched = current if state is None else torch.cat([state.touched.cpu(), current])
        unions[name] = torch.unique(touched)  # sorted
    rank = max(u.numel() for u in unions.values())
    for name, layer in layers.items():
        _consolidate_layer(layer, _padded(unions[name], rank, layer))
    configs: dict[int, object] = {}  # one new config per recorded one (the layers share it)
    for layer in layers.values():
        config = layer.adapter.rocoft_config
        if config is not None:
            layer.adapter.rocoft_config = configs.setdefault(id(config), dataclasses.replace(config, rank=rank))
    return Consolidated(rank, {n: u.numel() for n, u in unions.items()}, _elements(layers))


def _elements(layers: Mapping[str, RoCoFTLinear]) -> int:
    return sum(layer.num_stored for layer in layers.values())


def _padded(union: torch.Tensor, rank: int, layer: RoCoFTLinear) -> torch.Tensor:
    """``union`` plus the lowest indices not in it, ``rank`` in all, sorted."""
    n = layer.out_features if _dim(layer) == 0 else layer.in_features
    free = torch.ones(n, dtype=torch.bool)
    free[union] = False
    extra = free.nonzero().flatten()[: rank - union.numel()]
    return torch.sort(torch.cat([union, extra])).values


def _consolidate_layer(layer: RoCoFTLinear, chosen: torch.Tensor) -> None:
    weight, dim, state = layer._logical_weight(), _dim(layer), folded_state(layer)
    adapter = layer.adapter
    delta = adapter.delta
    chosen_dev = chosen.to(weight.device)
    # The original W0 on ``chosen``: W0 now, with the recorded originals where folds changed it.
    original = weight.index_select(dim, chosen_dev).clone()
    if state is not None:
        at = torch.searchsorted(chosen_dev, state.touched.to(weight.device))
        original.index_copy_(dim, at, state.originals.to(weight.device))
    effective = weight.index_select(dim, chosen_dev).double()
    at = torch.searchsorted(chosen_dev, layer.indices.to(weight.device))
    effective.index_add_(dim, at, delta.detach().double().to(weight.device))
    values = (effective - original.double()).to(delta.dtype)
    if state is not None:
        weight.index_copy_(dim, state.touched.to(weight.device), state.originals.to(weight.device))
    part = adapter.parts[0]
    adapter._cpu_indices[part.indices] = chosen.clone()
    setattr(adapter, part.indices, chosen.to(adapter.indices.device))
    new = part.zeros(chosen.numel(), layer.out_features, layer.in_features, delta.dtype, delta.device)
    new.copy_(values.to(delta.device))
    setattr(adapter, part.delta, nn.Parameter(new, requires_grad=True))
    adapter._loaded_deltas.pop(part.delta, None)
    vars(layer).pop("reselection", None)


__all__ = [
    "CRITERIA",
    "Consolidated",
    "Criterion",
    "Folded",
    "ProbeStats",
    "attach_probe",
    "consolidate",
    "fold",
    "folded_state",
    "is_folded",
    "pick",
    "reselect_generator",
    "row_scores",
    "scores_from_stats",
]
