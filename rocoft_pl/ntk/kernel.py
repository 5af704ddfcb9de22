"""Empirical NTK K_S(x, x') = <d f(x)/d theta_S, d f(x')/d theta_S> over named parameter sets, memory-bounded.

A parameter set maps a parameter name (as in ``model.named_parameters()``) to what of that tensor belongs
to the set: ``None`` (the whole tensor), ``("rows", idx)`` / ``("cols", idx)`` (rows / columns of a 2-D
weight, in storage layout), ``("index", flat_idx)`` or ``("mask", bool_tensor)``. Every requested set is
computed in the same passes.

How: the parameters are split into groups whose per-example gradients (n examples x D outputs x the part of
each tensor some set needs) fit in ``max_memory_mb`` (float32 or the model's dtype). For each group every
example goes through one forward and D backward passes (``torch.autograd.grad`` restricted to the group),
the gradients are written into the group buffer, and the Gram matrices G G^T of every set's slice are
accumulated in float64, in column chunks. The full (examples x parameters) Jacobian never exists; the cost
is (number of groups) x n forward/backward passes. A single tensor is never split, so the floor on memory
is n x D x (largest tensor needed whole). Tensors that no set needs whole store only the slices used, so
row / column / LoRA-only runs are one group and one pass. Test points (``cross_examples``) are streamed in
batches of n through a second buffer of the same size (the budget covers both), giving K(test, train)
without the test x test block. Per-example ``torch.autograd.grad`` rather than ``torch.func.vmap``: it works
on any model (HF attention-mask code, PEFT wrappers) and the group buffer already bounds memory.
Measured: a 32 x 32 MiniLM (22.7M parameters) kernel for full + rows + columns together takes about 10 s
on 2 CPU cores (3 groups at 1 GB).

The result has shape (n, D, n, D): K[i, a, j, b] = <grad f_a(x_i), grad f_b(x_j)>, the matrix-valued
kernel "per class pair" (D = 1 for a scalar output such as the binary logit difference). ``as_matrix``
reshapes it to (nD, nD), which is symmetric PSD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

Spec = Optional[tuple[str, torch.Tensor]]
ParamSet = Mapping[str, Spec]
OutputFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

_CHUNK_ELEMS = 1 << 22  # float64 elements per Gram chunk (n*D rows x chunk columns): about 32 MiB


def take(grads: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The part of per-example gradients ``grads`` (N, *shape) that ``spec`` selects, as (N, k)."""
    n = grads.shape[0]
    if spec is None:
        return grads.reshape(n, -1)
    kind, idx = spec
    if kind == "rows":
        return grads[:, idx.to(grads.device)].reshape(n, -1)
    if kind == "cols":
        return grads[:, :, idx.to(grads.device)].reshape(n, -1)
    if kind == "index":
        return grads.reshape(n, -1)[:, idx.to(grads.device)]
    if kind == "mask":
        return grads.reshape(n, -1)[:, idx.to(grads.device).reshape(-1)]
    raise ValueError(f"unknown parameter-set spec {kind!r} (use None, rows, cols, index or mask)")


def spec_size(shape: torch.Size, spec: Spec) -> int:
    numel = int(torch.Size(shape).numel())
    if spec is None:
        return numel
    kind, idx = spec
    if kind == "rows":
        return numel // shape[0] * idx.numel()
    if kind == "cols":
        return numel // shape[1] * idx.numel()
    if kind == "mask":
        return int(idx.sum())
    return int(idx.numel())


def _check_spec(name: str, shape: torch.Size, spec: Spec) -> Spec:
    if spec is None:
        return None
    kind, idx = spec
    idx = torch.as_tensor(idx)
    if kind == "mask":
        if idx.dtype != torch.bool or idx.numel() != torch.Size(shape).numel():
            raise ValueError(f"{name}: a mask must be a bool tensor with {torch.Size(shape).numel()} entries")
        return kind, idx
    idx = idx.long().flatten()
    if kind in ("rows", "cols") and len(shape) < 2:
        raise ValueError(f"{name}: {kind} needs a 2-D weight, got shape {tuple(shape)}")
    limit = {"rows": shape[0], "cols": shape[1] if len(shape) > 1 else 0, "index": torch.Size(shape).numel()}.get(kind)
    if limit is None:
        raise ValueError(f"{name}: unknown spec {kind!r}")
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= limit:
        raise ValueError(f"{name}: {kind} indices empty or out of range [0, {limit})")
    return kind, idx


def full_set(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, Spec]:
    """Every parameter of ``model`` (tied weights once), except names containing any of ``exclude``."""
    return {n: None for n, _ in model.named_parameters() if not any(e in n for e in exclude)}


def as_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """(n, D, m, D) -> (nD, mD)."""
    n, d, m, d2 = kernel.shape
    return kernel.reshape(n * d, m * d2)


def scalar_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """(n, D, m, D) -> (n, m): the trace over outputs, sum_a K[i, a, j, a] (equal to K for D = 1)."""
    return torch.diagonal(kernel, dim1=1, dim2=3).sum(-1)


@contextmanager
def _grad_only(model: nn.Module, names: set[str]):
    """requires_grad exactly on ``names`` and eval mode (no dropout) for the duration; restored after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    training = model.training
    try:
        for n, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        for n in names:
            params[n].requires_grad_(True)
        model.eval()
        yield
    finally:
        for n, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(flags[n])
        model.train(training)


def _groups(items: list[tuple[str, int]], budget: int) -> list[list[str]]:
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in items:
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def _gram_into(out: torch.Tensor, g: torch.Tensor, h: Optional[torch.Tensor] = None) -> None:
    """out += g h^T (h = g: the Gram matrix), in float64, converting a column chunk at a time."""
    n, k = g.shape
    step = max(1, _CHUNK_ELEMS // max(n + (0 if h is None else h.shape[0]), 1))
    for s in range(0, k, step):
        a = g[:, s : s + step].to(torch.float64)
        b = a if h is None else h[:, s : s + step].to(torch.float64)
        out.addmm_(a, b.T)


def empirical_ntk(
    model: nn.Module,
    output_fn: OutputFn,
    examples: Sequence[Mapping[str, Any]],
    sets: Mapping[str, ParamSet],
    *,
    cross_examples: Optional[Sequence[Mapping[str, Any]]] = None,
    max_memory_mb: float = 1024,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> Union[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Kernels (n, D, n, D) float64 on CPU, one per entry of ``sets``, over the same ``examples``.

    ``output_fn(model, example)`` returns the D outputs f(x) (1-D) for one example (a mapping of batched
    tensors, batch size 1). ``device``: default CUDA when available, else CPU; the model is moved there.
    With ``cross_examples`` (m test points) it returns ``(train_kernels, cross_kernels)``, the cross kernels
    K(test, train) of shape (m, D, n, D); test gradients are streamed in batches of at most n examples, so
    memory does not grow with m and the test x test block is never computed.
    """
    if not sets:
        raise ValueError("empirical_ntk needs at least one parameter set")
    if len(examples) == 0:
        raise ValueError("empirical_ntk needs at least one example")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    params = dict(model.named_parameters())
    checked: dict[str, dict[str, Spec]] = {}
    for set_name, pset in sets.items():
        if not pset:
            raise ValueError(f"parameter set {set_name!r} is empty")
        unknown = [n for n in pset if n not in params]
        if unknown:
            raise KeyError(f"parameter set {set_name!r} names unknown parameters: {unknown[:5]}")
        checked[set_name] = {n: _check_spec(n, params[n].shape, s) for n, s in pset.items()}

    # What each parameter must store: the whole gradient, or only the distinct slices sets ask for.
    users: dict[str, list[tuple[str, Spec]]] = {}
    for set_name, pset in checked.items():
        for n, spec in pset.items():
            users.setdefault(n, []).append((set_name, spec))
    order = [n for n in params if n in users]  # module order: groups are contiguous in the network

    def stored(n: str) -> int:
        specs = [s for _, s in users[n]]
        if any(s is None for s in specs):
            return params[n].numel()
        return min(params[n].numel(), sum(spec_size(params[n].shape, s) for s in specs))

    with torch.no_grad():
        probe = output_fn(model, _to(examples[0], device))
    if probe.dim() != 1:
        raise ValueError(f"output_fn must return a 1-D tensor of outputs, got shape {tuple(probe.shape)}")
    d = probe.numel()
    n = len(examples)
    m = len(cross_examples) if cross_examples is not None else 0
    nd = n * d
    copies = 2 if m else 1  # train buffer + one test batch buffer
    elem = torch.finfo(next(iter(params.values())).dtype).bits // 8
    budget = max(1, int(max_memory_mb * 2**20 / (copies * nd * elem)))
    groups = _groups([(p, stored(p)) for p in order], budget)

    kernels = {s: torch.zeros(nd, nd, dtype=torch.float64, device=device) for s in sets}
    cross = {s: torch.zeros(m * d, nd, dtype=torch.float64, device=device) for s in sets}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * (n + m), desc=f"NTK {len(groups)} group(s) x {n}+{m} examples", leave=False)

    def fill(group: list[str], whole: set[str], batch: Sequence[Mapping[str, Any]]) -> dict[Any, torch.Tensor]:
        rows = len(batch) * d
        buffers: dict[Any, torch.Tensor] = {}
        for p in group:
            if p in whole:
                buffers[p] = torch.empty((rows, *params[p].shape), dtype=params[p].dtype, device=device)
            else:
                for k, (_, spec) in enumerate(users[p]):
                    buffers[(p, k)] = torch.empty((rows, spec_size(params[p].shape, spec)), dtype=params[p].dtype, device=device)
        tensors = [params[p] for p in group]
        for i, example in enumerate(batch):
            out = output_fn(model, _to(example, device))
            if out.shape != probe.shape:
                raise ValueError(f"example {i}: output shape {tuple(out.shape)} differs from {tuple(probe.shape)}")
            for a in range(d):
                grads = torch.autograd.grad(out[a], tensors, retain_graph=a < d - 1, allow_unused=True)
                row = i * d + a
                for p, g in zip(group, grads):
                    if g is None:
                        g = torch.zeros_like(params[p])
                    if p in whole:
                        buffers[p][row] = g
                    else:
                        for k, (_, spec) in enumerate(users[p]):
                            buffers[(p, k)][row] = take(g.unsqueeze(0), spec)[0]
            if bar is not None:
                bar.update(1)
        return buffers

    def part(buffers: dict[Any, torch.Tensor], whole: set[str], p: str, k: int, spec: Spec) -> torch.Tensor:
        return take(buffers[p], spec) if p in whole else buffers[(p, k)]

    with _grad_only(model, set(order)):
        for group in groups:
            whole = {p for p in group if stored(p) == params[p].numel()}
            train = fill(group, whole, examples)
            for p in group:
                for k, (set_name, spec) in enumerate(users[p]):
                    _gram_into(kernels[set_name], part(train, whole, p, k, spec))
            for start in range(0, m, n):
                batch = cross_examples[start : start + n]
                test = fill(group, whole, batch)
                for p in group:
                    for k, (set_name, spec) in enumerate(users[p]):
                        block = cross[set_name][start * d : (start + len(batch)) * d]
                        _gram_into(block, part(test, whole, p, k, spec), part(train, whole, p, k, spec))
                del test
            del train
    if bar is not None:
        bar.close()
    result = {s: k.reshape(n, d, n, d).cpu() for s, k in kernels.items()}
    if cross_examples is None:
        return result
    return result, {s: k.reshape(m, d, n, d).cpu() for s, k in cross.items()}


def _to(example: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
