"""RoCoFTLinear: a frozen base layer plus zero-initialised row, column, row-and-column or entries deltas, one set
per named adapter.

Why a delta and not the paper's Algorithm 1: concatenating trainable and frozen rows into a weight every
forward keeps a full-size weight for backward and computes a full-size weight gradient only to slice it.
Here W0 is never touched during training and autograd only ever sees r x d tensors:

    rows     y = base(x);  y[..., idx] += x @ D.T           D: (r, in)    dL/dD = dL/dW[idx]
    columns  y = base(x) + x[..., idx] @ D.T                 D: (out, r)   dL/dD = dL/dW[:, idx]
    both     rows (D, idx) plus columns (Dc, cidx)           Dc: (out, r)  dL/dDc = dL/dW[:, cidx], 0 on rows idx
    entries  y = x @ (W0 + scatter(idx, D)).T + b            D: (nnz,)     full-size cost (ablation only)

"Row" always means an output feature, also for transformers' Conv1D (GPT-2), whose weight is stored
(in x out): a row there is a column of ``Conv1D.weight``. Weight decay on D pulls the weight toward W0,
not toward 0.

Each mode is one ``Layout``: its ``Part`` objects (rows, columns, entries) carry the delta's shape, the axis the
indices select, the forward term, merge and restore; the layer composes them and never asks which mode it is.
A layer holds one ``RoCoFTDelta`` per adapter (``adapters``, by name; state_dict keys
``<layer>.adapters.<name>.delta``) and computes with the active one; several adapters on one base may select
different rows, or even differ in mode and rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mode
from .quantized import base_forward as quantized_base_forward
from .quantized import check_supported, is_quantized, merge_quantized, unmerge_quantized

# The adapter a single-adapter model has (apply_rocoft, load_adapter and the callback use it by default).
DEFAULT_ADAPTER = "default"


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or Conv1D."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def _thin_product(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m.T`` for a thin ``m`` (r x k): (..., k) -> (..., r).

    In fp32 on CPU computed as the transpose of ``m @ x.T``: MKL's sgemm runs that wide (r x tokens) product
    2-3x faster than the tall (tokens x r) one for RoBERTa-base shapes, from about 16 tokens up (below, as
    when decoding, the tall one is 3x faster); in bf16 (oneDNN) the tall one is the faster, and on CUDA they
    are alike.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < 16 * x.shape[-1]:
        return F.linear(x, m)
    return (m @ x.reshape(-1, x.shape[-1]).t()).t().view(*x.shape[:-1], m.shape[0])


class _RowDeltaLinear(torch.autograd.Function):
    """``base(x)`` with ``x @ D.T`` added to the output features ``indices``, as one autograd node.

    Autograd on the two-op version computes the input gradient twice (``g @ W0`` and ``g[..., idx] @ D``)
    into two activation-sized tensors and adds them into a third; here the row term is accumulated in place
    into the base's input gradient (one rank-r ``addmm_``), so backward allocates one activation-sized
    tensor, as the frozen layer's own backward does. (``torch.addmm(C, g, W0)`` with the row term as ``C``
    looks free but is not: it copies ``C`` into a fresh result before the GEMM.) W0 gets no gradient (it
    must be frozen).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, delta, indices, transposed):  # type: ignore[no-untyped-def, override]
        w = weight.to(x.dtype)  # a no-op unless autocast: see RoCoFTLinear._fused_dtype
        y = F.linear(x, w.t() if transposed else w, bias)
        return y.index_add_(-1, indices, _thin_product(x, delta))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def, override]
        x, weight, _bias, delta, indices, transposed = inputs
        ctx.save_for_backward(x, weight, delta, indices)
        ctx.transposed = transposed

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[no-untyped-def, override]
        x, weight, delta, indices = ctx.saved_tensors
        g = grad_y.flatten(0, -2)
        g_rows = g.index_select(-1, indices)
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)
            w = w.t() if ctx.transposed else w
            grad_x = (g @ w).addmm_(g_rows, delta).view(*grad_y.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = g_rows.t() @ x.flatten(0, -2)
        return grad_x, None, grad_bias, grad_delta, None, None


class _ColumnDeltaLinear(torch.autograd.Function):
    """``base(x) + x[..., indices] @ D.T`` as one autograd node; ``delta`` is D (out x r).

    The two-op version allocates a second output-sized tensor for the sum, and in backward builds the
    input gradient of ``index_select`` as a zero-filled input-sized tensor that is then added to the base's.
    Here the column term is accumulated into the base's output in place (``addmm_``) and its input
    gradient into the columns ``indices`` of the base's input gradient (``index_add_`` of a tokens x r
    block). Only ``x[..., indices]`` is saved for backward, as in the two-op version.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, delta, indices, transposed):  # type: ignore[no-untyped-def, override]
        w = weight.to(x.dtype)
        y = F.linear(x, w.t() if transposed else w, bias)
        x_cols = x.index_select(-1, indices)
        y.view(-1, y.shape[-1]).addmm_(x_cols.reshape(-1, x_cols.shape[-1]), delta.t())
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def, override]
        x, weight, _bias, delta, indices, transposed = inputs
        ctx.save_for_backward(x.index_select(-1, indices), weight, delta, indices)
        ctx.transposed = transposed
        ctx.in_shape = x.shape

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[no-untyped-def, override]
        x_cols, weight, delta, indices = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)
            grad_x = g @ (w.t() if ctx.transposed else w)
            grad_x.index_add_(-1, indices, _thin_product(g, delta.t()))
            grad_x = grad_x.view(ctx.in_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            # (r x tokens) @ (tokens x out), transposed: the wide product (see RoCoFTLinear._zero_delta)
            grad_delta = (x_cols.reshape(-1, x_cols.shape[-1]).t() @ g).t()
        return grad_x, None, grad_bias, grad_delta, None, None


class _RowColumnDeltaLinear(torch.autograd.Function):
    """Mode 'both': the fused row node's output plus the column term ``x[..., column_indices] @ Dc.T``, added
    in place as the column node does, as one autograd node.

    One node, so backward builds one activation-sized input gradient and adds both rank-r terms into it
    (rows: ``addmm_``, columns: ``index_add_`` into r columns). ``x`` is saved for the row gradient anyway, so
    ``x[..., column_indices]`` is taken from it again in backward instead of being saved too. ``delta_columns``
    arrives with its overlap rows already zeroed (see ``RoCoFTLinear._column_delta``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, delta, indices, delta_columns, column_indices, transposed):  # type: ignore[no-untyped-def, override]
        y = _RowDeltaLinear.forward(x, weight, bias, delta, indices, transposed)
        x_cols = x.index_select(-1, column_indices)
        y.view(-1, y.shape[-1]).addmm_(x_cols.reshape(-1, x_cols.shape[-1]), delta_columns.t())
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def, override]
        x, weight, _bias, delta, indices, delta_columns, column_indices, transposed = inputs
        ctx.save_for_backward(x, weight, delta, indices, delta_columns, column_indices)
        ctx.transposed = transposed

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[no-untyped-def, override]
        x, weight, delta, indices, delta_columns, column_indices = ctx.saved_tensors
        g = grad_y.flatten(0, -2)
        g_rows = g.index_select(-1, indices)
        x2 = x.flatten(0, -2)
        grad_x = grad_bias = grad_delta = grad_columns = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)
            w = w.t() if ctx.transposed else w
            grad_x = (g @ w).addmm_(g_rows, delta)
            grad_x.index_add_(-1, column_indices, _thin_product(g, delta_columns.t()))
            grad_x = grad_x.view(*grad_y.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = g_rows.t() @ x2
        if ctx.needs_input_grad[5]:
            grad_columns = (x2.index_select(-1, column_indices).t() @ g).t()  # the wide product, as for columns
        return grad_x, None, grad_bias, grad_delta, None, grad_columns, None, None


def add_along(weight: torch.Tensor, dim: int, indices: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight``'s rows (dim 0) or columns (dim 1) ``indices`` += ``delta``, summed in the wider of the two
    dtypes and rounded once (a float32 delta on a bf16 W0: not rounded to bf16 before the add)."""
    dtype = torch.promote_types(weight.dtype, delta.dtype)
    summed = weight.index_select(dim, indices).to(dtype) + delta.to(dtype)
    weight.index_copy_(dim, indices, summed.to(weight.dtype))


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the trained tensors next to a W0 of ``dtype``: at least float32. A bf16 delta (and its
    AdamW moments, which follow the parameter's dtype) rounds away updates below bf16's resolution, ~0.4% of
    the value; the deltas are small, so their float32 master copy costs little memory."""
    return torch.promote_types(dtype, torch.float32)


def _copy_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``dst``, which may be an FSDP2 shard (a DTensor): every rank holds ``full``, so
    each keeps its own part, without communication."""
    if hasattr(dst, "device_mesh") and hasattr(dst, "placements"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.copy_(full)
    else:
        dst.copy_(full.to(dst))


# -- what each mode trains ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One index set a mode trains: the index buffer's name, the delta parameter's name and the seed stream of
    its random selection. The subclass says what the indices index (``axis``: 'row', 'column' or 'entries') and
    does the arithmetic on the logical (out x in) weight: the delta's shape, the forward term, the dense
    delta, and merge (``select`` W0's entries first, ``add`` the delta, ``restore`` the copy)."""

    indices: str
    delta: str
    stream: str = ""
    axis: ClassVar[str] = ""

    def limit(self, out_features: int, in_features: int) -> int:
        """How many positions the indices choose from."""
        raise NotImplementedError

    def shape(self, r: int, out_features: int, in_features: int) -> tuple[int, ...]:
        raise NotImplementedError

    def zeros(self, r: int, out_features: int, in_features: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.zeros(self.shape(r, out_features, in_features), dtype=dtype, device=device)

    def term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``y`` plus this part's ``x @ delta.T`` (the unfused forward; ``value`` in ``x``'s dtype)."""
        raise NotImplementedError

    def dense(self, dense: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``dense`` (out x in) plus the delta at its positions (out of place)."""
        raise NotImplementedError

    def mixed_term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``term`` with one adapter per example (a mixed batch): ``y`` (batch, tokens, out), ``x`` (batch, tokens,
        in), ``indices`` (batch, r) and ``values`` (batch, *delta shape) each example's own."""
        raise NotImplementedError

    def select(self, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A copy of the entries of ``weight`` this part updates."""
        raise NotImplementedError

    def add(self, weight: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> None:
        """``weight`` += the delta on its positions, in place, summed in the wider dtype and rounded once."""
        raise NotImplementedError

    def restore(self, weight: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor) -> None:
        """Put back what ``select`` copied."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Line(Part):
    """Whole rows (``dim`` 0) or columns (``dim`` 1) of the weight."""

    dim: ClassVar[int] = 0

    def dense(self, dense: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return dense.index_add(self.dim, indices, value)

    def select(self, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return weight.index_select(self.dim, indices)

    def add(self, weight: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> None:
        add_along(weight, self.dim, indices, value)

    def restore(self, weight: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor) -> None:
        weight.index_copy_(self.dim, indices, saved.to(weight.device))


@dataclass(frozen=True)
class Rows(_Line):
    axis: ClassVar[str] = "row"
    dim: ClassVar[int] = 0

    def limit(self, out_features: int, in_features: int) -> int:
        return out_features

    def shape(self, r: int, out_features: int, in_features: int) -> tuple[int, ...]:
        return (r, in_features)

    def term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # In place: the base's backward does not need its output, and an out-of-place add copies it.
        return y.index_add_(-1, indices, F.linear(x, value).to(y.dtype))

    def mixed_term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # One batched product x_b @ D_b.T for all examples, scattered into each example's own rows.
        rows = torch.bmm(x, values.transpose(1, 2)).to(y.dtype)
        return y.scatter_add_(-1, indices.unsqueeze(1).expand(-1, y.shape[1], -1), rows)


@dataclass(frozen=True)
class Columns(_Line):
    axis: ClassVar[str] = "column"
    dim: ClassVar[int] = 1

    def limit(self, out_features: int, in_features: int) -> int:
        return in_features

    def shape(self, r: int, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features, r)

    def zeros(self, r: int, out_features: int, in_features: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        # (out, r) stored as the transpose of an (r, out) block: autograd then computes dL/dD as
        # x_idx^T @ dL/dy (r x tokens x out) instead of dL/dy^T @ x_idx (out x tokens x r), which
        # BLAS runs about 3x slower on CPU for RoBERTa-base shapes.
        return torch.zeros(r, out_features, dtype=dtype, device=device).t()

    def term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return y + F.linear(x.index_select(-1, indices), value).to(y.dtype)

    def mixed_term(self, y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # Each example's own input columns, then one batched product with its own (out x r) delta.
        picked = x.gather(-1, indices.unsqueeze(1).expand(-1, x.shape[1], -1))
        return y.add_(torch.bmm(picked, values.transpose(1, 2)).to(y.dtype))


@dataclass(frozen=True)
class Entries(Part):
    """Flat positions in the logical (out x in) weight (valid on a transposed Conv1D view too)."""

    axis: ClassVar[str] = "entries"

    def limit(self, out_features: int, in_features: int) -> int:
        return out_features * in_features

    def shape(self, r: int, out_features: int, in_features: int) -> tuple[int, ...]:
        return (r,)

    def dense(self, dense: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return dense.flatten().index_add(0, indices, value).view_as(dense)

    @staticmethod
    def _positions(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return indices // weight.shape[1], indices % weight.shape[1]

    def select(self, weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return weight[self._positions(weight, indices)]

    def add(self, weight: torch.Tensor, indices: torch.Tensor, value: torch.Tensor) -> None:
        at = self._positions(weight, indices)
        dtype = torch.promote_types(weight.dtype, value.dtype)
        weight.index_put_(at, (weight[at].to(dtype) + value.to(dtype)).to(weight.dtype))

    def restore(self, weight: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor) -> None:
        weight.index_put_(self._positions(weight, indices), saved.to(weight.device))


@dataclass(frozen=True)
class Layout:
    """A mode: the parts it trains, how their deltas are read (``values``), how many of their elements are free
    (``free``), and its forward: the fused autograd node (None: none), else ``unfused``. The node takes
    ``(x, W0, bias, value_1, indices_1, ..., transposed)``, the parts in order."""

    name: str
    parts: tuple[Part, ...]
    node: Optional[type[torch.autograd.Function]] = None

    def unfused(self, layer: "RoCoFTLinear", x: torch.Tensor, terms: list[tuple[Part, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The forward where the fused node does not apply: the base's output plus each part's term. The deltas are
        cast to the input's dtype (differentiably: their gradient reaches the master copy)."""
        y = layer._base_forward(x)
        for part, indices, value in terms:
            y = part.term(y, x, indices, value.to(x.dtype))
        return y

    def values(self, deltas: Sequence[torch.Tensor], index_sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The deltas as every use reads them (forward, dense delta, merge)."""
        return tuple(deltas)

    def free(self, deltas: Sequence[torch.Tensor], index_sets: Sequence[torch.Tensor]) -> int:
        """Free parameters (what the reports count)."""
        return sum(d.numel() for d in deltas)


@dataclass(frozen=True)
class _RowsAndColumns(Layout):
    """Mode 'both': r rows and r columns. The r x r entries W[rows][:, columns] lie in a selected row and a selected
    column. They are one set of weights and belong to the row delta: the column delta's entries on the selected
    rows are read as zero everywhere, so they get no gradient and change nothing, whatever they hold.

    Why not let both deltas update the overlap and only count it once: each copy would get the full gradient, so
    an optimizer would move those r x r weights about twice as far per step as the others (AdamW: two unit-size
    steps; weight decay twice), and the training would not be that of r rows and r columns of W. Zeroing on read
    (not a gradient hook, not trusting the entries to stay zero) keeps this exact under any optimizer, torch.func,
    or a loaded or edited tensor. The free parameters are r*in + r*out - r*r, stored in r*in + r*out elements
    (the delta tensors stay dense rectangles). The copy is out x r, and its backward zeroes the same r x r block
    of the gradient."""

    def values(self, deltas: Sequence[torch.Tensor], index_sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        rows, columns = deltas
        return rows, columns.index_fill(0, index_sets[0], 0)

    def free(self, deltas: Sequence[torch.Tensor], index_sets: Sequence[torch.Tensor]) -> int:
        return super().free(deltas, index_sets) - index_sets[0].numel() * index_sets[1].numel()


@dataclass(frozen=True)
class _DenseEntries(Layout):
    """Mode 'entries': W0 plus the scattered delta as one dense weight, one matmul (its cost is full-size anyway)."""

    def unfused(self, layer: "RoCoFTLinear", x: torch.Tensor, terms: list[tuple[Part, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        weight, bias = layer._logical_weight(), layer.base.bias
        (part, indices, value), = terms
        dense = part.dense(value.new_zeros(weight.shape), indices, value)
        return F.linear(x, weight + dense.to(weight.dtype), None if bias is None else bias.to(weight.dtype))


# 'both' keeps the row names (and the row mode's random draw) for its rows; its columns draw from their own seed
# stream, so on a square matrix random rows and columns are independent. The order is config.MODES'.
LAYOUTS: dict[str, Layout] = {
    "row": Layout("row", (Rows("indices", "delta"),), _RowDeltaLinear),
    "column": Layout("column", (Columns("indices", "delta"),), _ColumnDeltaLinear),
    "entries": _DenseEntries("entries", (Entries("indices", "delta"),)),
    "both": _RowsAndColumns(
        "both", (Rows("indices", "delta"), Columns("column_indices", "delta_columns", "columns")), _RowColumnDeltaLinear
    ),
}
PARTS: dict[str, tuple[Part, ...]] = {name: layout.parts for name, layout in LAYOUTS.items()}


def _checked_indices(indices: torch.Tensor, part: Part, out_features: int, in_features: int) -> torch.Tensor:
    """``indices`` as a flat CPU LongTensor, refused unless non-empty, unique and in range for ``part``."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
    limit = part.limit(out_features, in_features)
    if indices.numel() == 0:
        raise ValueError("RoCoFTLinear needs at least one index")
    if int(indices.min()) < 0 or int(indices.max()) >= limit:
        raise ValueError(f"{part.axis} indices out of range [0, {limit}) for a {out_features}x{in_features} weight")
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{part.axis} indices must be unique")
    return indices


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: Any) -> str:
    """``name`` if it can name an adapter: letters, digits, '_' and '-' (it becomes a state_dict key segment), and
    not an attribute of the ModuleDict holding the adapters."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-' (and not a ModuleDict attribute), got {name!r}")
    return name


# -- one adapter in one layer ---------------------------------------------------------------------------


class RoCoFTDelta(nn.Module):
    """One adapter's trained tensors in one layer: its mode's index buffers (persistent, sorted ascending) and
    zero-initialised deltas, in the master dtype of ``base``'s weight. Nothing here computes: the layer does.

    ``rocoft_config`` and ``target`` (the layer's name as that config's targets see it: relative to the module
    apply_rocoft adapted) are what the adapter is saved with; apply_rocoft and load_adapter set them.
    """

    def __init__(self, base: nn.Module, mode: Mode, index_sets: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        if mode not in LAYOUTS:
            raise ValueError(f"mode must be one of {tuple(LAYOUTS)}, got {mode!r}")
        layout = LAYOUTS[mode]
        needed = [p.indices for p in layout.parts]
        if set(index_sets) != set(needed):
            raise ValueError(
                f"mode {mode!r} takes the index sets {needed}, got {sorted(index_sets)}: column_indices go with mode "
                "'both' only, and mode 'both' needs them"
            )
        out_features, in_features = features(base)
        checked = {p.indices: _checked_indices(index_sets[p.indices], p, out_features, in_features) for p in layout.parts}
        self.layout = layout
        # CPU copies survive to_empty() on the meta device; reset_parameters() restores the buffers from them.
        self._cpu_indices: dict[str, torch.Tensor] = {k: v.clone() for k, v in checked.items()}
        # Values load_adapter could not write because the deltas were on the meta device (see load_delta).
        self._loaded_deltas: dict[str, torch.Tensor] = {}
        self.rocoft_config: Optional[Any] = None
        self.target: Optional[str] = None
        weight = base.weight
        dtype = master_dtype(weight.dtype)
        for part in layout.parts:
            idx = checked[part.indices]
            self.register_buffer(part.indices, idx.to(weight.device), persistent=True)
            zeros = part.zeros(idx.numel(), out_features, in_features, dtype, weight.device)
            self.register_parameter(part.delta, nn.Parameter(zeros))

    @property
    def mode(self) -> str:
        return self.layout.name

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.layout.parts

    @property
    def deltas(self) -> dict[str, nn.Parameter]:
        """The trained parameters by name: ``delta``, and ``delta_columns`` in mode 'both'."""
        return {p.delta: getattr(self, p.delta) for p in self.parts}

    @property
    def index_sets(self) -> dict[str, torch.Tensor]:
        """The index buffers by name: ``indices``, and ``column_indices`` in mode 'both'."""
        return {p.indices: getattr(self, p.indices) for p in self.parts}

    def terms(self) -> list[tuple[Part, torch.Tensor, torch.Tensor]]:
        """(part, its indices, its delta as read: see ``Layout.values``), the parts in order."""
        index_sets = [getattr(self, p.indices) for p in self.parts]
        values = self.layout.values([getattr(self, p.delta) for p in self.parts], index_sets)
        return list(zip(self.parts, index_sets, values))

    @property
    def num_trainable(self) -> int:
        """Free parameters: the deltas' elements; mode 'both': r*in + r*out - r*r (the overlap counted once)."""
        return self.layout.free(list(self.deltas.values()), list(self.index_sets.values()))

    @property
    def num_stored(self) -> int:
        """Elements of the delta tensors (memory, optimizer state, adapter size): ``num_trainable`` except in
        mode 'both', which stores the r x r overlap twice (r*in + r*out)."""
        return sum(d.numel() for d in self.deltas.values())

    def set_trainable(self, train: bool) -> None:
        """The deltas train or not. What ``requires_grad_`` does, without its walk over submodules (there are
        none): switching adapters calls this for every adapter of every layer."""
        for delta in self._parameters.values():
            if delta is not None and delta.requires_grad != train:
                delta.requires_grad_(train)

    def cpu_indices(self) -> dict[str, torch.Tensor]:
        """CPU copies of the index buffers by name (kept through meta-device materialisation)."""
        return {k: v.clone() for k, v in self._cpu_indices.items()}

    @torch.no_grad()
    def set_indices(self, index_sets: Mapping[str, torch.Tensor]) -> None:
        """Replace index buffers and their CPU copies (a loaded adapter's or rank 0's choice); unchecked."""
        for name, idx in index_sets.items():
            if name not in self._cpu_indices:
                raise KeyError(f"RoCoFTLinear in mode {self.mode!r} has no index buffer {name!r}")
            getattr(self, name).copy_(idx.to(getattr(self, name).device))
            self._cpu_indices[name] = idx.detach().to("cpu", torch.long).clone()

    @torch.no_grad()
    def load_delta(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the deltas from full (CPU) tensors by name. On the meta device there is no memory to hold them, so
        they are kept and written by ``reset_parameters()``, which materialising code runs after ``to_empty``."""
        for name, value in values.items():
            target = getattr(self, name)
            if target.is_meta:
                self._loaded_deltas[name] = value.detach().to("cpu").clone()
            else:
                self._loaded_deltas.pop(name, None)
                _copy_full(target, value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Restore the indices and the deltas after meta-device materialisation (``to_empty``): the deltas are
        zero, or what ``load_delta`` was given while on the meta device."""
        for part in self.parts:
            delta, loaded = getattr(self, part.delta), self._loaded_deltas.get(part.delta)
            if loaded is None:
                delta.zero_()
            else:
                _copy_full(delta, loaded)
            buffer = getattr(self, part.indices)
            buffer.copy_(self._cpu_indices[part.indices].to(buffer.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in self._cpu_indices:
            if prefix + name in state_dict:
                self._cpu_indices[name] = state_dict[prefix + name].detach().to("cpu", torch.long).clone()

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{p.axis}: {getattr(self, p.indices).numel()}" for p in self.parts)
        return f"mode={self.mode}, {sizes}"


@dataclass
class _Merged:
    """What ``merge`` changed, to undo it exactly: the merged adapter, W0's entries it overwrote (per part), and a
    trained bias's master copy (the merge rounds it to W0's dtype)."""

    adapter: str
    w0: tuple[torch.Tensor, ...]
    bias: Optional[torch.Tensor]


# In a mixed-adapter batch (``mixed_adapters``): the name of "no adapter", the base model's output for that example.
BASE_ADAPTER = "__base__"


@dataclass(frozen=True)
class MixedBatch:
    """One adapter name per example of a batch, grouped once (not every forward): for each adapter used, the
    positions of its examples along the batch dimension (CPU; examples named ``BASE_ADAPTER`` get no term)."""

    size: int
    groups: tuple[tuple[str, torch.Tensor], ...]
    # Per example, the position of its adapter in ``groups``; len(groups) for BASE_ADAPTER.
    slots: torch.Tensor

    @classmethod
    def of(cls, names: Sequence[str]) -> "MixedBatch":
        order = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        groups = tuple((n, torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long)) for n in order)
        position = {n: i for i, n in enumerate(order)}
        slots = torch.tensor([position.get(n, len(order)) for n in names], dtype=torch.long)
        return cls(len(names), groups, slots)

    def per_example(self, adapters: Sequence["RoCoFTDelta"]) -> Optional[list[tuple["Part", torch.Tensor, torch.Tensor]]]:
        """(part, indices (batch, r), values (batch, *delta shape)) of each part, every example's own (zeros for
        base examples), when ``adapters`` (those of ``groups``, in order) share a mode and, per part, a rank: then
        one batched product per part serves every adapter. None otherwise."""
        if len({a.mode for a in adapters}) != 1:
            return None
        terms = [a.terms() for a in adapters]
        out = []
        for j, part in enumerate(adapters[0].parts):
            indices = [t[j][1] for t in terms]
            if len({i.numel() for i in indices}) != 1:
                return None
            values = [t[j][2] for t in terms]
            slots = self.slots.to(values[0].device)
            stacked_indices = torch.stack([*indices, indices[0]]).index_select(0, slots)
            stacked_values = torch.stack([*values, torch.zeros_like(values[0])]).index_select(0, slots)
            out.append((part, stacked_indices, stacked_values))
        return out


class RoCoFTLinear(nn.Module):
    """Wraps an ``nn.Linear`` or ``Conv1D``; only the deltas train, the indices are persistent buffers.

    ``adapters`` holds one ``RoCoFTDelta`` per adapter name; the layer computes with ``active_adapter``'s (or with
    none: ``disabled``, or after ``merge``, whose deltas are in W0). The attributes of one adapter read the active
    one's: ``indices`` are output features (rows), input features (columns) or flat positions in the logical
    (out x in) weight (entries), sorted ascending; ``delta`` is their update. Mode 'both' trains r rows and r
    columns: ``indices`` / ``delta`` (r x in) are its rows, exactly as in mode 'row', and ``column_indices`` /
    ``delta_columns`` (out x r) its columns (both None in the other modes); see ``_RowsAndColumns`` for the r x r
    overlap, which belongs to the rows: ``num_trainable`` counts it once, ``num_stored`` twice.
    """

    def __init__(
        self,
        base: nn.Module,
        mode: Mode,
        indices: torch.Tensor,
        column_indices: Optional[torch.Tensor] = None,
        *,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"RoCoFTLinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        check_supported(base)  # a quantized nn.Linear of a kind whose W0 cannot be read (rocoft_pl.quantized)
        if mode == "entries" and is_quantized(base):
            raise ValueError("mode 'entries' adds a dense delta to W0 every forward; a quantized W0 has none to add to")
        given = {"indices": indices, **({} if column_indices is None else {"column_indices": column_indices})}
        adapter = RoCoFTDelta(base, mode, given)
        self.base = base
        self.out_features, self.in_features = features(base)
        self.transposed = is_conv1d(base)
        self.adapters = nn.ModuleDict({check_adapter_name(adapter_name): adapter})
        self.active_adapter = adapter_name
        self.disabled = False  # disable_adapter: the base's outputs
        self._merged: Optional[_Merged] = None

    # The layer's switching state: plain Python values (a name, a flag, a merge record), never parameters, buffers
    # or modules, so they are set without nn.Module.__setattr__'s registry checks: switching adapters sets them in
    # every layer, and those checks cost as much as the tensor work of a merged swap.
    _STATE = frozenset({"active_adapter", "disabled", "_merged", "mixed"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RoCoFTLinear._STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- the active adapter -------------------------------------------------------------------------------
    @property
    def adapter(self) -> RoCoFTDelta:
        return self.adapters[self.active_adapter]

    @property
    def mode(self) -> str:
        return self.adapter.mode

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.adapter.parts

    @property
    def deltas(self) -> dict[str, nn.Parameter]:
        """The active adapter's trained parameters by name: ``delta``, and ``delta_columns`` in mode 'both'."""
        return self.adapter.deltas

    @property
    def index_sets(self) -> dict[str, torch.Tensor]:
        """The active adapter's index buffers by name: ``indices``, and ``column_indices`` in mode 'both'."""
        return self.adapter.index_sets

    @property
    def indices(self) -> torch.Tensor:
        return self.adapter.indices

    @property
    def delta(self) -> nn.Parameter:
        return self.adapter.delta

    @property
    def column_indices(self) -> Optional[torch.Tensor]:
        return self.adapter.index_sets.get("column_indices")

    @property
    def delta_columns(self) -> Optional[nn.Parameter]:
        return self.adapter.deltas.get("delta_columns")

    @property
    def num_trainable(self) -> int:
        return self.adapter.num_trainable

    @property
    def num_stored(self) -> int:
        return self.adapter.num_stored

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def cpu_indices(self) -> dict[str, torch.Tensor]:
        return self.adapter.cpu_indices()

    def set_indices(self, index_sets: Mapping[str, torch.Tensor]) -> None:
        self.adapter.set_indices(index_sets)

    def load_delta(self, delta: torch.Tensor, delta_columns: Optional[torch.Tensor] = None) -> None:
        """Set the active adapter's deltas from full (CPU) tensors (``delta_columns``: mode 'both' only); on the
        meta device they are written by ``reset_parameters()`` (see ``RoCoFTDelta.load_delta``)."""
        names = list(self.deltas)
        if (delta_columns is not None) != (len(names) == 2):
            raise ValueError("load_delta: delta_columns go with mode 'both' only, and mode 'both' needs them")
        self.adapter.load_delta(dict(zip(names, (delta, delta_columns))))

    # -- tensors and dtypes -------------------------------------------------------------------------------
    def _trained(self) -> list[torch.Tensor]:
        """The tensors kept in the master dtype: every adapter's deltas, and W0's bias when it trains (``train_bias``)."""
        bias = self.base.bias
        deltas = [d for adapter in self.adapters.values() for d in adapter.deltas.values()]
        return [*deltas, *([bias] if bias is not None and bias.requires_grad else [])]

    @torch.no_grad()
    def train_bias(self) -> None:
        """Train W0's bias too, in the master dtype like the deltas. Under FSDP2 this is also what lets a block
        shard at all: the trained parameters of one FSDP unit must share a dtype."""
        bias = self.base.bias
        if bias is None:
            return
        bias.data = bias.data.to(master_dtype(bias.dtype))
        bias.requires_grad_(True)

    def trained_bias(self) -> Optional[torch.Tensor]:
        """W0's bias as trained: while merged, the master copy the merge rounded (what an adapter saves)."""
        if self._merged is not None and self._merged.bias is not None:
            return self._merged.bias
        return self.base.bias

    def _apply(self, fn: Any, recurse: bool = True) -> "RoCoFTLinear":
        """Module conversions (``.to(torch.bfloat16)``, ``.half()``; Lightning's ``bf16-true`` converts the whole
        model after the callback adapted it) move the trained tensors and their gradients but keep them in the
        master dtype (``master_dtype``), converted from their own values, not from a rounded copy."""
        trained = {id(t) for p in self._trained() for t in (p, p.grad) if t is not None}

        def keep_master(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) not in trained or not out.is_floating_point() or out.dtype == master_dtype(out.dtype):
                return out
            return t.detach().to(device=out.device, dtype=master_dtype(out.dtype), copy=True)

        return super()._apply(keep_master, recurse)

    # Forward through the base's attributes so code that reads `layer.weight.dtype` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def reset_parameters(self) -> None:
        """Restore every adapter's indices and deltas after meta-device materialisation (``to_empty``): the deltas
        are zero, or what ``load_delta`` was given while on the meta device."""
        for adapter in self.adapters.values():
            adapter.reset_parameters()
        self._merged = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Checkpoints written before adapters had names hold ``<layer>.delta`` (etc.): read them as the active
        adapter's tensors."""
        for part in self.parts:
            for name in (part.indices, part.delta):
                if prefix + name in state_dict:
                    state_dict[f"{prefix}adapters.{self.active_adapter}.{name}"] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward ------------------------------------------------------------------------------------------
    # mixed_adapters: each example of the batch computes with its own adapter (None: the usual forward).
    mixed: Optional[MixedBatch] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed is not None:
            return self._mixed_forward(x, self.mixed)
        if self.disabled or self._merged is not None:
            return self._base_forward(x)
        adapter = self.adapter
        terms = adapter.terms()
        if adapter.layout.node is not None:
            dtype = self._fused_dtype(x)
            if dtype is not None:
                return self._fused(x, dtype, adapter.layout.node, terms)
        return adapter.layout.unfused(self, x, terms)

    def _mixed_forward(self, x: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        """The base's output plus each example's own adapter terms. Adapters of one mode and rank (per part): each
        example's deltas and indices are gathered (r rows / columns each) and one batched product and one scatter
        per part serve every adapter at once. Otherwise, per adapter, its examples are gathered, its terms added
        and the rows put back. Inference only: the fused nodes (and their backward) stay the single-adapter path's."""
        if self.disabled or self._merged is not None:
            raise ValueError("mixed_adapters: this layer is merged or inside disable_adapter; its W0 holds no single base")
        if torch.is_grad_enabled():
            raise RuntimeError("mixed_adapters is for inference: run the model under torch.no_grad() or torch.inference_mode()")
        if x.dim() < 2 or x.shape[0] != batch.size:
            raise ValueError(
                f"mixed_adapters: {batch.size} adapter names for a batch of {x.shape[0] if x.dim() else 0} examples "
                f"(input of shape {tuple(x.shape)}); give one name per example"
            )
        y = self._base_forward(x)
        per_example = batch.per_example([self.adapters[name] for name, _ in batch.groups]) if batch.groups else []
        if per_example is not None:
            y3, x3 = y.reshape(x.shape[0], -1, y.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1])
            for part, indices, values in per_example:
                y3 = part.mixed_term(y3, x3, indices, values.to(x.dtype))
            return y3.view(y.shape)
        for name, examples in batch.groups:  # adapters of different modes or ranks: one product each
            at = examples.to(x.device)
            xs, ys = x.index_select(0, at), y.index_select(0, at)
            for part, indices, value in self.adapters[name].terms():
                ys = part.term(ys, xs, indices, value.to(x.dtype))
            y.index_copy_(0, at, ys)
        return y

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x + b. A trained bias in the master dtype next to a low-precision W0 is cast to W0's dtype here; the
        base itself (its hooks, e.g. FSDP's) runs otherwise."""
        if is_quantized(self.base):  # the quantized kernel; a trained bias is added beside it
            return quantized_base_forward(self.base, x)
        bias = self.base.bias
        if bias is None or bias.dtype == self.base.weight.dtype:
            return self.base(x)
        weight = self._logical_weight()
        return F.linear(x, weight, bias.to(weight.dtype))

    def _column_delta(self) -> torch.Tensor:
        """Mode 'both': ``delta_columns`` with its rows ``indices`` read as zero, as every use reads it (see
        ``_RowsAndColumns``)."""
        return self.adapter.terms()[1][2]

    def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the fused row / column / both node computes in, or None where it does not apply.

        It needs a frozen plain-tensor W0 called without hooks, and one dtype for x and W0 (the master deltas and
        a trained bias are cast to it); under autocast that is autocast's dtype (what ``F.linear`` would cast to).
        A quantized W0 runs its own kernel instead (``_base_forward``).
        """
        weight = self.base.weight
        if (
            is_quantized(self.base)
            or weight.requires_grad
            or hasattr(weight, "full_tensor")  # a DTensor (sharded outside a forward)
            or self.base._forward_hooks
            or self.base._forward_pre_hooks
        ):
            return None
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype == weight.dtype else None  # the deltas and the bias are cast in _fused

    def _fused(
        self,
        x: torch.Tensor,
        dtype: torch.dtype,
        node: type[torch.autograd.Function],
        terms: list[tuple[Part, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The fused node in ``dtype``. Under autocast, x, the deltas and the bias are cast here (differentiably,
        as autocast would), but W0 is cast inside the node, forward and again in backward: the node keeps the
        resident W0, not a low-precision copy of it from forward to backward as autocast's ``F.linear`` does
        (half the frozen model's size under bf16-mixed with fp32 weights)."""
        bias = self.base.bias
        args: tuple = (x.to(dtype), self.base.weight, None if bias is None else bias.to(dtype))
        for _, indices, value in terms:
            args = (*args, value.to(dtype), indices)
        args = (*args, self.transposed)
        # Without grad mode nothing is saved for backward, so the node's forward runs as a plain function:
        # Function.apply costs tens of microseconds a call, as much as the layer itself when decoding a token.
        run = node.apply if torch.is_grad_enabled() else node.forward
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return run(*args)
        return run(*args)

    def _logical_weight(self) -> torch.Tensor:
        """W0 as (out x in), a view for Conv1D."""
        return self.base.weight.t() if self.transposed else self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The active adapter's dense (out x in) update R, C, R + C or the scattered entries (for merging and checks)."""
        delta = self.delta
        dense = torch.zeros(self.out_features, self.in_features, dtype=delta.dtype, device=delta.device)
        for part, indices, value in self.adapter.terms():
            dense = part.dense(dense, indices, value)
        return dense

    # -- merge --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Add the active adapter's deltas into W0 in place and return the base layer, now a plain layer with the
        adapter in its weight. The wrapper stays (``merged``): its forward is the base's, without the delta.

        The selected entries of W0 are copied first (r rows and / or columns: small), so ``unmerge`` restores W0
        bit-exactly; subtracting the delta again would not be exact in low precision. A trained bias in the master
        dtype is rounded to W0's dtype (the base is then usable on its own) and its master copy kept. A quantized W0
        merges only where that is exact (``rocoft_pl.quantized.merge_quantized``; ``merge_rocoft_dequantized`` gives
        a plain layer).
        """
        if self._merged is None and is_quantized(self.base):
            return merge_quantized(self)
        if self._merged is None:
            self._merge_into_w0()
        return self.base

    def _merge_into_w0(self) -> None:
        """``merge`` of a dense W0 (not merged yet), without the checks: ``swap_merged`` runs it per layer and switch."""
        weight = self._logical_weight()
        terms = self.adapter.terms()
        saved = tuple(part.select(weight, indices) for part, indices, _ in terms)
        # W0 + delta in the deltas' (master) precision, rounded once to W0's dtype. Mode 'both': each entry gets
        # its one delta value (the overlap: + 0 from the columns).
        for part, indices, value in terms:
            part.add(weight, indices, value)
        bias, master = self.base.bias, None
        if bias is not None and bias.dtype != weight.dtype:
            master = bias.detach().clone()
            bias.data = bias.data.to(weight.dtype)
        self._merged = _Merged(self.active_adapter, saved, master)

    @torch.no_grad()
    def unmerge(self) -> "RoCoFTLinear":
        """Undo ``merge``: W0's selected entries back from the copy, the deltas train again."""
        if self._merged is not None and is_quantized(self.base):
            unmerge_quantized(self)
        if self._merged is not None:
            self._restore_w0()
        return self

    def _restore_w0(self) -> None:
        """``unmerge`` of a dense W0 (merged), without the checks."""
        record, weight = self._merged, self._logical_weight()
        assert record is not None
        adapter = self.adapters[record.adapter]
        for part, indices, saved in reversed(list(zip(adapter.parts, adapter.index_sets.values(), record.w0))):
            part.restore(weight, indices, saved)
        if record.bias is not None:
            self.base.bias.data = record.bias.to(self.base.bias.device)
        self._merged = None

    @torch.no_grad()
    def swap_merged(self, name: str) -> nn.Module:
        """With one adapter merged, merge adapter ``name`` instead: the merged adapter's W0 entries come back from
        its record (r rows / columns), then ``name``'s are saved and updated. W0 itself is never copied whole, and
        unmerging afterwards restores it bit-exactly. ``name`` merged already: nothing changes."""
        if self._merged is None:
            raise ValueError("swap_merged: no adapter is merged into this layer (merge first)")
        if name not in self.adapters:
            raise ValueError(f"swap_merged: no adapter named {name!r}; the layer has {list(self.adapters)}")
        if self._merged.adapter != name and is_quantized(self.base):
            self.unmerge()
            self.active_adapter = name
            self.merge()
        elif self._merged.adapter != name:
            self._restore_w0()
            self.active_adapter = name
            self._merge_into_w0()
        return self.base

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        text = f"{kind}({self.in_features}->{self.out_features}), mode={self.mode}, trainable={self.num_trainable}"
        if len(self.adapters) > 1:
            text += f", active_adapter={self.active_adapter!r}"
        return text + (", merged" if self.merged else "") + (", disabled" if self.disabled else "")
