"""RoCoFTLinear: a frozen base layer plus a zero-initialised row, column or entries delta.

Why a delta and not the paper's Algorithm 1: concatenating trainable and frozen rows into a weight every
forward keeps a full-size weight for backward and computes a full-size weight gradient only to slice it.
Here W0 is never touched during training and autograd only ever sees r x d tensors:

    rows     y = base(x);  y[..., idx] += x @ D.T           D: (r, in)    dL/dD = dL/dW[idx]
    columns  y = base(x) + x[..., idx] @ D.T                 D: (out, r)   dL/dD = dL/dW[:, idx]
    entries  y = x @ (W0 + scatter(idx, D)).T + b            D: (nnz,)     full-size cost (ablation only)

"Row" always means an output feature, also for transformers' Conv1D (GPT-2), whose weight is stored
(in x out): a row there is a column of ``Conv1D.weight``. Weight decay on D pulls the weight toward W0,
not toward 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mode


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
    """Wraps an ``nn.Linear`` or ``Conv1D``; only ``delta`` trains, ``indices`` is a persistent buffer.

    ``indices`` are output features (rows), input features (columns) or flat positions in the logical
    (out x in) weight (entries), sorted ascending.
    """

    def __init__(self, base: nn.Module, mode: Mode, indices: torch.Tensor) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"RoCoFTLinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if mode not in ("row", "column", "entries"):
            raise ValueError(f"mode must be 'row', 'column' or 'entries', got {mode!r}")
        out_features, in_features = features(base)
        indices = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
        limit = {"row": out_features, "column": in_features, "entries": out_features * in_features}[mode]
        if indices.numel() == 0:
            raise ValueError("RoCoFTLinear needs at least one index")
        if int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(f"{mode} indices out of range [0, {limit}) for a {out_features}x{in_features} weight")
        if indices.unique().numel() != indices.numel():
            raise ValueError(f"{mode} indices must be unique")
        self.base = base
        self.mode = mode
        self.in_features = in_features
        self.out_features = out_features
        self.transposed = is_conv1d(base)
        # A CPU copy survives to_empty() on the meta device; reset_parameters() restores the buffer from it.
        self._indices_cpu = indices.clone()
        # Values load_adapter could not write because the delta was on the meta device (see load_delta).
        self._loaded_delta: Optional[torch.Tensor] = None
        weight = base.weight
        self.register_buffer("indices", indices.to(weight.device), persistent=True)
        self.delta = nn.Parameter(self._zero_delta(weight.dtype, weight.device))
        self.merged = False

    def _zero_delta(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        r = self._indices_cpu.numel()
        if self.mode == "column":
            # (out, r) stored as the transpose of an (r, out) block: autograd then computes dL/dD as
            # x_idx^T @ dL/dy (r x tokens x out) instead of dL/dy^T @ x_idx (out x tokens x r), which
            # BLAS runs about 3x slower on CPU for RoBERTa-base shapes.
            return torch.zeros(r, self.out_features, dtype=dtype, device=device).t()
        shape = (r, self.in_features) if self.mode == "row" else (r,)
        return torch.zeros(shape, dtype=dtype, device=device)

    # Forward through the base's attributes so code that reads `layer.weight.dtype` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def reset_parameters(self) -> None:
        """Restore the indices and the delta after meta-device materialisation (``to_empty``): the delta is
        zero, or what ``load_delta`` was given while on the meta device."""
        with torch.no_grad():
            if self._loaded_delta is None:
                self.delta.zero_()
            else:
                _copy_full(self.delta, self._loaded_delta)
            self.indices.copy_(self._indices_cpu.to(self.indices.device))
        self.merged = False

    @torch.no_grad()
    def load_delta(self, delta: torch.Tensor) -> None:
        """Set the delta from a full (CPU) tensor. On the meta device there is no memory to hold it, so it is
        kept and written by ``reset_parameters()``, which materialising code runs after ``to_empty``."""
        if self.delta.is_meta:
            self._loaded_delta = delta.detach().to("cpu").clone()
        else:
            self._loaded_delta = None
            _copy_full(self.delta, delta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "indices"
        if key in state_dict:
            self._indices_cpu = state_dict[key].detach().to("cpu", torch.long).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.mode in ("row", "column"):
            dtype = self._fused_dtype(x)
            if dtype is not None:
                return self._fused(x, dtype)
        if self.mode == "row":
            y = self.base(x)
            # In place: the base's backward does not need its output, and an out-of-place add copies it.
            return y.index_add_(-1, self.indices, F.linear(x, self.delta).to(y.dtype))
        if self.mode == "column":
            y = self.base(x)
            return y + F.linear(x.index_select(-1, self.indices), self.delta).to(y.dtype)
        weight = self._logical_weight() + self.delta_weight()
        return F.linear(x, weight, self.base.bias)

    def _fused_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the fused row / column node computes in, or None where it does not apply.

        It needs a frozen plain-tensor W0 called without hooks, and one dtype for x, W0 and D; under autocast
        that is autocast's dtype (what ``F.linear`` would cast to), otherwise they must already agree.
        """
        weight = self.base.weight
        if (
            weight.requires_grad
            or hasattr(weight, "full_tensor")  # a DTensor (sharded outside a forward)
            or self.base._forward_hooks
            or self.base._forward_pre_hooks
        ):
            return None
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype == weight.dtype == self.delta.dtype else None

    def _fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fused node in ``dtype``. Under autocast, x, D and the bias are cast here (differentiably, as
        autocast would), but W0 is cast inside the node, forward and again in backward: the node keeps the
        resident W0, not a low-precision copy of it from forward to backward as autocast's ``F.linear`` does
        (half the frozen model's size under bf16-mixed with fp32 weights)."""
        node = _RowDeltaLinear if self.mode == "row" else _ColumnDeltaLinear
        bias = self.base.bias
        args = (
            x.to(dtype), self.base.weight, None if bias is None else bias.to(dtype), self.delta.to(dtype),
            self.indices, self.transposed,
        )
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
        """The dense (out x in) update R, C or the scattered entries (for merging and checks)."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.delta.dtype, device=self.delta.device
        )
        if self.mode == "row":
            return dense.index_copy(0, self.indices, self.delta)
        if self.mode == "column":
            return dense.index_copy(1, self.indices, self.delta)
        return dense.flatten().index_copy(0, self.indices, self.delta).view_as(dense)

    def _selected(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of the entries of the logical (out x in) ``weight`` that the delta updates."""
        if self.mode == "row":
            return weight.index_select(0, self.indices)
        if self.mode == "column":
            return weight.index_select(1, self.indices)
        return weight[self._entry_positions()]

    def _entry_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries mode: (row, column) of each flat index, valid on a transposed (Conv1D) view too."""
        return self.indices // self.in_features, self.indices % self.in_features

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Add the delta into W0 in place and return the plain base layer (zero inference overhead).

        The selected entries of W0 are copied first (r rows or columns: small), so ``unmerge`` restores W0
        bit-exactly; subtracting the delta again would not be exact in low precision.
        """
        if not self.merged:
            weight = self._logical_weight()
            self._w0_selected = self._selected(weight)
            if self.mode == "row":
                weight.index_add_(0, self.indices, self.delta.to(weight.dtype))
            elif self.mode == "column":
                weight.index_add_(1, self.indices, self.delta.to(weight.dtype))
            else:
                weight.add_(self.delta_weight().to(weight.dtype))
            self.merged = True
        return self.base

    @torch.no_grad()
    def unmerge(self) -> "RoCoFTLinear":
        """Undo ``merge``: W0's selected entries back from the copy, the delta trains again."""
        if self.merged:
            weight = self._logical_weight()
            saved = self._w0_selected.to(weight.device)
            if self.mode == "row":
                weight.index_copy_(0, self.indices, saved)
            elif self.mode == "column":
                weight.index_copy_(1, self.indices, saved)
            else:
                weight.index_put_(self._entry_positions(), saved)
            del self._w0_selected
            self.merged = False
        return self

    @property
    def num_trainable(self) -> int:
        return self.delta.numel()

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return f"{kind}({self.in_features}->{self.out_features}), mode={self.mode}, trainable={self.num_trainable}"
