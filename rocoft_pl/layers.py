"""RoCoFTLinear: a frozen base layer plus a zero-initialised row, column, row-and-column or entries delta.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mode
from .quantized import base_forward as quantized_base_forward
from .quantized import check_supported, is_quantized, merge_quantized, unmerge_quantized


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


@dataclass(frozen=True)
class Part:
    """One index set a mode trains: the index buffer's name, the delta parameter's name, what the indices
    index (``axis``: 'row', 'column' or 'entries') and the seed stream of its random selection."""

    indices: str
    delta: str
    axis: str
    stream: str = ""


# What each mode trains. 'both' keeps the row names (and the row mode's random draw) for its rows; its
# columns draw from their own seed stream, so on a square matrix random rows and columns are independent.
PARTS: dict[str, tuple[Part, ...]] = {
    "row": (Part("indices", "delta", "row"),),
    "column": (Part("indices", "delta", "column"),),
    "entries": (Part("indices", "delta", "entries"),),
    "both": (Part("indices", "delta", "row"), Part("column_indices", "delta_columns", "column", "columns")),
}


def _checked_indices(indices: torch.Tensor, axis: str, out_features: int, in_features: int) -> torch.Tensor:
    """``indices`` as a flat CPU LongTensor, refused unless non-empty, unique and in range for ``axis``."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
    limit = {"row": out_features, "column": in_features, "entries": out_features * in_features}[axis]
    if indices.numel() == 0:
        raise ValueError("RoCoFTLinear needs at least one index")
    if int(indices.min()) < 0 or int(indices.max()) >= limit:
        raise ValueError(f"{axis} indices out of range [0, {limit}) for a {out_features}x{in_features} weight")
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{axis} indices must be unique")
    return indices


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


class RoCoFTLinear(nn.Module):
    """Wraps an ``nn.Linear`` or ``Conv1D``; only the deltas train, the indices are persistent buffers.

    ``indices`` are output features (rows), input features (columns) or flat positions in the logical
    (out x in) weight (entries), sorted ascending; ``delta`` is their update. Mode 'both' trains r rows and r
    columns: ``indices`` / ``delta`` (r x in) are its rows, exactly as in mode 'row', and ``column_indices`` /
    ``delta_columns`` (out x r) its columns (both None in the other modes).

    The r x r entries W[indices][:, column_indices] lie in a selected row and a selected column. They are
    one set of weights, and they belong to the row delta: the column delta's entries on the selected rows
    are read as zero everywhere (forward, ``delta_weight``, ``merge``), so they get no gradient and change
    nothing, whatever they hold. Mode 'both' thus has r*in + r*out - r*r free parameters (``num_trainable``,
    what the reports count: the overlap counted once), stored in r*in + r*out tensor elements
    (``num_stored``: the delta tensors stay dense rectangles).
    """

    def __init__(
        self, base: nn.Module, mode: Mode, indices: torch.Tensor, column_indices: Optional[torch.Tensor] = None
    ) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"RoCoFTLinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        check_supported(base)  # a quantized nn.Linear of a kind whose W0 cannot be read (rocoft_pl.quantized)
        if mode not in PARTS:
            raise ValueError(f"mode must be one of {tuple(PARTS)}, got {mode!r}")
        if (column_indices is not None) != (mode == "both"):
            raise ValueError("column_indices go with mode 'both' only, and mode 'both' needs them")
        if mode == "entries" and is_quantized(base):
            raise ValueError("mode 'entries' adds a dense delta to W0 every forward; a quantized W0 has none to add to")
        out_features, in_features = features(base)
        given = {"indices": indices, "column_indices": column_indices}
        checked = {p.indices: _checked_indices(given[p.indices], p.axis, out_features, in_features) for p in PARTS[mode]}
        self.base = base
        self.mode = mode
        self.in_features = in_features
        self.out_features = out_features
        self.transposed = is_conv1d(base)
        # CPU copies survive to_empty() on the meta device; reset_parameters() restores the buffers from them.
        self._cpu_indices: dict[str, torch.Tensor] = {k: v.clone() for k, v in checked.items()}
        # Values load_adapter could not write because the deltas were on the meta device (see load_delta).
        self._loaded_deltas: dict[str, torch.Tensor] = {}
        weight = base.weight
        for part in PARTS[mode]:
            self.register_buffer(part.indices, checked[part.indices].to(weight.device), persistent=True)
            self.register_parameter(part.delta, nn.Parameter(self._zero_delta(part, master_dtype(weight.dtype), weight.device)))
        if mode != "both":  # the attributes exist in every mode; None is in neither state_dict nor parameters()
            self.register_buffer("column_indices", None)
            self.register_parameter("delta_columns", None)
        self.merged = False

    def _zero_delta(self, part: Part, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        r = self._cpu_indices[part.indices].numel()
        if part.axis == "column":
            # (out, r) stored as the transpose of an (r, out) block: autograd then computes dL/dD as
            # x_idx^T @ dL/dy (r x tokens x out) instead of dL/dy^T @ x_idx (out x tokens x r), which
            # BLAS runs about 3x slower on CPU for RoBERTa-base shapes.
            return torch.zeros(r, self.out_features, dtype=dtype, device=device).t()
        shape = (r, self.in_features) if part.axis == "row" else (r,)
        return torch.zeros(shape, dtype=dtype, device=device)

    @property
    def parts(self) -> tuple[Part, ...]:
        return PARTS[self.mode]

    @property
    def deltas(self) -> dict[str, nn.Parameter]:
        """The trained parameters by name: ``delta``, and ``delta_columns`` in mode 'both'."""
        return {p.delta: getattr(self, p.delta) for p in self.parts}

    @property
    def index_sets(self) -> dict[str, torch.Tensor]:
        """The index buffers by name: ``indices``, and ``column_indices`` in mode 'both'."""
        return {p.indices: getattr(self, p.indices) for p in self.parts}

    def _trained(self) -> list[torch.Tensor]:
        """The tensors kept in the master dtype: the deltas, and W0's bias when it trains (``train_bias``)."""
        bias = self.base.bias
        return [*self.deltas.values(), *([bias] if bias is not None and bias.requires_grad else [])]

    @torch.no_grad()
    def train_bias(self) -> None:
        """Train W0's bias too, in the master dtype like the deltas. Under FSDP2 this is also what lets a block
        shard at all: the trained parameters of one FSDP unit must share a dtype."""
        bias = self.base.bias
        if bias is None:
            return
        bias.data = bias.data.to(master_dtype(bias.dtype))
        bias.requires_grad_(True)

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

    # Forward through the base's attributes so code that reads `layer.weight.dtype` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def reset_parameters(self) -> None:
        """Restore the indices and the deltas after meta-device materialisation (``to_empty``): the deltas are
        zero, or what ``load_delta`` was given while on the meta device."""
        with torch.no_grad():
            for part in self.parts:
                delta, loaded = getattr(self, part.delta), self._loaded_deltas.get(part.delta)
                if loaded is None:
                    delta.zero_()
                else:
                    _copy_full(delta, loaded)
                buffer = getattr(self, part.indices)
                buffer.copy_(self._cpu_indices[part.indices].to(buffer.device))
        self.merged = False

    @torch.no_grad()
    def load_delta(self, delta: torch.Tensor, delta_columns: Optional[torch.Tensor] = None) -> None:
        """Set the deltas from full (CPU) tensors (``delta_columns``: mode 'both' only). On the meta device there
        is no memory to hold them, so they are kept and written by ``reset_parameters()``, which materialising
        code runs after ``to_empty``."""
        if (delta_columns is not None) != (self.mode == "both"):
            raise ValueError("load_delta: delta_columns go with mode 'both' only, and mode 'both' needs them")
        values = {"delta": delta, "delta_columns": delta_columns}
        for part in self.parts:
            target, value = getattr(self, part.delta), values[part.delta]
            if target.is_meta:
                self._loaded_deltas[part.delta] = value.detach().to("cpu").clone()
            else:
                self._loaded_deltas.pop(part.delta, None)
                _copy_full(target, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in self._cpu_indices:
            if prefix + name in state_dict:
                self._cpu_indices[name] = state_dict[prefix + name].detach().to("cpu", torch.long).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._base_forward(x)
        if self.mode != "entries":
            dtype = self._fused_dtype(x)
            if dtype is not None:
                return self._fused(x, dtype)
        # The deltas are cast to the input's dtype (differentiably: their gradient reaches the master copy).
        if self.mode == "row":
            y = self._base_forward(x)
            # In place: the base's backward does not need its output, and an out-of-place add copies it.
            return y.index_add_(-1, self.indices, F.linear(x, self.delta.to(x.dtype)).to(y.dtype))
        if self.mode == "column":
            y = self._base_forward(x)
            return y + F.linear(x.index_select(-1, self.indices), self.delta.to(x.dtype)).to(y.dtype)
        if self.mode == "both":
            y = self._base_forward(x)
            y = y.index_add_(-1, self.indices, F.linear(x, self.delta.to(x.dtype)).to(y.dtype))
            return y + F.linear(x.index_select(-1, self.column_indices), self._column_delta().to(x.dtype)).to(y.dtype)
        weight = self._logical_weight()
        bias = self.base.bias
        return F.linear(x, weight + self.delta_weight().to(weight.dtype), None if bias is None else bias.to(weight.dtype))

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
        """Mode 'both': ``delta_columns`` with its rows ``indices`` read as zero, as every use reads it.

        Why not let both deltas update the overlap and only count it once: each copy would get the full
        gradient, so an optimizer would move those r x r weights about twice as far per step as the others
        (AdamW: two unit-size steps; weight decay twice), and the training would not be that of r rows and r
        columns of W. Zeroing on read (not a gradient hook, not trusting the entries to stay zero) keeps this
        exact under any optimizer, torch.func, or a loaded or edited tensor: those entries get no gradient and
        have no effect, so the count r*in + r*out - r*r is the number of free parameters. The copy is out x r,
        and its backward zeroes the same r x r block of the gradient.
        """
        return self.delta_columns.index_fill(0, self.indices, 0)

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

    def _fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fused node in ``dtype``. Under autocast, x, the deltas and the bias are cast here (differentiably,
        as autocast would), but W0 is cast inside the node, forward and again in backward: the node keeps the
        resident W0, not a low-precision copy of it from forward to backward as autocast's ``F.linear`` does
        (half the frozen model's size under bf16-mixed with fp32 weights)."""
        bias = self.base.bias
        args: tuple = (
            x.to(dtype), self.base.weight, None if bias is None else bias.to(dtype), self.delta.to(dtype),
            self.indices,
        )
        if self.mode == "both":
            node: type[torch.autograd.Function] = _RowColumnDeltaLinear
            args = (*args, self._column_delta().to(dtype), self.column_indices, self.transposed)
        else:
            node = _RowDeltaLinear if self.mode == "row" else _ColumnDeltaLinear
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
        """The dense (out x in) update R, C, R + C or the scattered entries (for merging and checks)."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.delta.dtype, device=self.delta.device
        )
        if self.mode == "row":
            return dense.index_copy(0, self.indices, self.delta)
        if self.mode == "column":
            return dense.index_copy(1, self.indices, self.delta)
        if self.mode == "both":  # the overlap from the row delta: the column delta is zero there
            return dense.index_copy(1, self.column_indices, self._column_delta()).index_copy(0, self.indices, self.delta)
        return dense.flatten().index_copy(0, self.indices, self.delta).view_as(dense)

    def _selected(self, weight: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the entries of the logical (out x in) ``weight`` that the deltas update (mode 'both': the
        rows and the columns, r x in and out x r)."""
        if self.mode == "row":
            return weight.index_select(0, self.indices)
        if self.mode == "column":
            return weight.index_select(1, self.indices)
        if self.mode == "both":
            return weight.index_select(0, self.indices), weight.index_select(1, self.column_indices)
        return weight[self._entry_positions()]

    def _entry_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries mode: (row, column) of each flat index, valid on a transposed (Conv1D) view too."""
        return self.indices // self.in_features, self.indices % self.in_features

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Add the deltas into W0 in place and return the plain base layer (zero inference overhead).

        The selected entries of W0 are copied first (r rows and / or columns: small), so ``unmerge`` restores W0
        bit-exactly; subtracting the delta again would not be exact in low precision. A quantized W0 merges only where
        that is exact (``rocoft_pl.quantized.merge_quantized``; ``merge_rocoft_dequantized`` gives a plain layer).
        """
        if not self.merged and is_quantized(self.base):
            return merge_quantized(self)
        if not self.merged:
            weight = self._logical_weight()
            self._w0_selected = self._selected(weight)
            # W0 + delta in the deltas' (master) precision, rounded once to W0's dtype.
            if self.mode in ("row", "both"):
                add_along(weight, 0, self.indices, self.delta)
            if self.mode == "column":
                add_along(weight, 1, self.indices, self.delta)
            if self.mode == "both":  # each entry gets its one delta value (the overlap: + 0 from the columns)
                add_along(weight, 1, self.column_indices, self._column_delta())
            if self.mode == "entries":
                weight.copy_(weight.to(self.delta.dtype) + self.delta_weight())
            bias = self.base.bias
            if bias is not None and bias.dtype != weight.dtype:  # a float32 trained bias: the plain layer's dtype
                self._bias_master = bias.detach().clone()
                bias.data = bias.data.to(weight.dtype)
            self.merged = True
        return self.base

    @torch.no_grad()
    def unmerge(self) -> "RoCoFTLinear":
        """Undo ``merge``: W0's selected entries back from the copy, the deltas train again."""
        if self.merged and is_quantized(self.base):
            unmerge_quantized(self)
        if self.merged:
            weight = self._logical_weight()
            if self.mode == "both":  # both copies hold W0's original overlap, so the order does not matter
                rows, columns = self._w0_selected
                weight.index_copy_(0, self.indices, rows.to(weight.device))
                weight.index_copy_(1, self.column_indices, columns.to(weight.device))
            else:
                saved = self._w0_selected.to(weight.device)
                if self.mode == "row":
                    weight.index_copy_(0, self.indices, saved)
                elif self.mode == "column":
                    weight.index_copy_(1, self.indices, saved)
                else:
                    weight.index_put_(self._entry_positions(), saved)
            del self._w0_selected
            master = self.__dict__.pop("_bias_master", None)
            if master is not None:
                self.base.bias.data = master.to(self.base.bias.device)
            self.merged = False
        return self

    @property
    def num_trainable(self) -> int:
        """Free parameters: the delta's elements; mode 'both': r*in + r*out - r*r (the overlap counted once,
        see ``_column_delta``)."""
        if self.mode == "both":
            overlap = self.indices.numel() * self.column_indices.numel()
            return self.delta.numel() + self.delta_columns.numel() - overlap
        return self.delta.numel()

    @property
    def num_stored(self) -> int:
        """Elements of the delta tensors (memory, optimizer state, adapter size): ``num_trainable`` except in
        mode 'both', which stores the r x r overlap twice (r*in + r*out)."""
        return sum(d.numel() for d in self.deltas.values())

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return f"{kind}({self.in_features}->{self.out_features}), mode={self.mode}, trainable={self.num_trainable}"
