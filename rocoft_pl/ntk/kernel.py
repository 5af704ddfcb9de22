"""Empirical NTK K_S(x, x') = <d f(x)/d theta_S, d f(x')/d theta_S> over named parameter sets, memory-bounded.

A parameter set maps a parameter name (as in ``model.named_parameters()``) to what of that tensor belongs
to the set: ``None`` (the whole tensor), ``("rows", idx)`` / ``("cols", idx)`` (rows / columns of a 2-D
weight, in storage layout), ``("index", flat_idx)`` or ``("mask", bool_tensor)``. Every requested set is
computed in the same passes.

How: the parameters are split into groups (whole tensors, in module order) whose per-example gradients
(n examples x D outputs x the part of each tensor some set needs) fit in the memory budget. For each group
the per-example gradients of all examples are computed and written into the group buffer, then the Gram
matrices G G^T of every set's slice are accumulated in float64, in column chunks, tensor by tensor. The
full (examples x parameters) Jacobian never exists; the cost is (number of groups) passes over the
examples. Tensors that no set needs whole store only the slices used, so row / column / LoRA-only runs are
one group and one pass. Large embedding tables are stored row-sparse (only the rows some example's
gradient touches: the tokens present), which keeps RoBERTa-base's 38.6M-entry word embedding at a few MB
per example instead of 154 MB. Test points (``cross_examples``) are streamed in batches of n through a
second buffer (the budget covers both), giving K(test, train) without the test x test block.

Two ways to get the per-example gradients of a group (``method``):

- ``"func"``: ``torch.func``: ``vmap(jacrev(functional_call(...)))`` over chunks of examples, differentiating
  only the group's tensors. Examples of a chunk are right-padded to a common length (the attention mask
  keeps padding exact: padded keys get zero attention weight) and sorted by length. The HF model runs
  with eager attention inside vmap (SDPA under vmap warns of a slow fallback) and the mask helpers'
  data-dependent "is there any padding?" shortcut is disabled for the duration (always building the mask
  gives the same result). The chunk size comes from the budget (``chunk_size`` caps it, default 8).
  The default: with one thread on a shared 2-core CPU it was faster than the loop in every measurement,
  1.1-1.2x on a quiet machine (MiniLM 32 x 32 full kernel 8.2 s vs 9.3 s; RoBERTa-base rows, 32 examples,
  12.5 s vs 15.3 s) and 1.7-2.1x under load (10.4 s vs 17.7 s; 16.6 s vs 35.3 s); identical kernels up to
  float32 rounding (4e-7 relative).
- ``"loop"``: one forward and D ``torch.autograd.grad`` calls per example. Works on any ``output_fn``,
  including ones with data-dependent Python control flow that vmap rejects.

Either way the model is in eval mode (no dropout) for the duration, and requires_grad flags, training mode
and attention implementation are restored afterwards.

The result has shape (n, D, n, D): K[i, a, j, b] = <grad f_a(x_i), grad f_b(x_j)>, the matrix-valued
kernel "per class pair" (D = 1 for a scalar output such as the binary logit difference). ``as_matrix``
reshapes it to (nD, nD), which is symmetric PSD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

Spec = Optional[tuple[str, torch.Tensor]]
ParamSet = Mapping[str, Spec]
OutputFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

_CHUNK_ELEMS = 1 << 22  # float64 elements per Gram chunk (n*D rows x chunk columns): about 32 MiB
_SPARSE_MIN_ROWS = 4096  # nn.Embedding tables at least this tall are stored row-sparse
_DEFAULT_CHUNK = 8  # examples per vmap call (func method), unless the budget asks for fewer


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


@contextmanager
def _vmap_friendly(model: nn.Module) -> Iterator[None]:
    """Eager attention on the outermost HF model, and transformers' mask helpers without their
    data-dependent shortcut (``padding_mask.all()`` decides whether a mask is needed; under vmap that is an
    error, and always building the mask gives the same result). Both restored on exit."""
    restore: list[Callable[[], None]] = []
    try:
        try:
            from transformers import PreTrainedModel
            from transformers import masking_utils as mu
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedModel, mu = None, None
        if mu is not None:
            for fn in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
                if hasattr(mu, fn):
                    old = getattr(mu, fn)
                    setattr(mu, fn, lambda *a, **k: False)
                    restore.append(lambda fn=fn, old=old: setattr(mu, fn, old))
        if PreTrainedModel is not None:
            hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
            impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
            if hf is not None and impl not in (None, "eager") and hasattr(hf, "set_attn_implementation"):
                try:
                    hf.set_attn_implementation("eager")
                    restore.append(lambda: hf.set_attn_implementation(impl))
                except Exception:  # noqa: BLE001 - a model without eager attention keeps its own
                    pass
        yield
    finally:
        for undo in reversed(restore):
            undo()


class _Bound(nn.Module):
    """``output_fn(model, example)`` as a module, so ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn
        self.consts: dict[str, Any] = {}

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.output_fn(self.model, {**self.consts, **tensors})


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


class _SparseRows:
    """Per-example gradients of an embedding table, only the rows that are non-zero somewhere in a chunk."""

    def __init__(self, rows: int, shape: torch.Size) -> None:
        self.rows, self.shape = rows, shape
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (buffer rows, table rows, values)

    def put(self, at: torch.Tensor, grads: torch.Tensor) -> None:
        """``grads`` (r, V, ...) for buffer rows ``at`` (r,)."""
        nz = (grads != 0).reshape(grads.shape[0], grads.shape[1], -1).any(-1).any(0).nonzero().flatten()
        self.pieces.append((at, nz, grads[:, nz].clone()))

    def union(self) -> torch.Tensor:
        return torch.unique(torch.cat([nz for _, nz, _ in self.pieces]))

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """(self.rows, len(rows) * row_size): the gradients restricted to table rows ``rows`` (sorted)."""
        row_size = int(torch.Size(self.shape[1:]).numel())
        ref = self.pieces[0][2]
        out = torch.zeros(self.rows, rows.numel(), row_size, dtype=ref.dtype, device=ref.device)
        pos = torch.full((self.shape[0],), -1, dtype=torch.long, device=ref.device)
        pos[rows] = torch.arange(rows.numel(), device=ref.device)
        for at, nz, values in self.pieces:
            p = pos[nz]
            keep = p >= 0
            if keep.any():
                out[at[:, None], p[keep][None, :]] = values[:, keep].reshape(len(at), int(keep.sum()), row_size)
        return out.reshape(self.rows, -1)


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
    method: str = "func",
    chunk_size: Optional[int] = None,
) -> Union[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Kernels (n, D, n, D) float64 on CPU, one per entry of ``sets``, over the same ``examples``.

    ``output_fn(model, example)`` returns the D outputs f(x) (1-D) for one example (a mapping of batched
    tensors, batch size 1). ``device``: default CUDA when available, else CPU; the model is moved there.
    With ``cross_examples`` (m test points) it returns ``(train_kernels, cross_kernels)``, the cross kernels
    K(test, train) of shape (m, D, n, D); test gradients are streamed in batches of at most n examples, so
    memory does not grow with m and the test x test block is never computed.
    ``method``: "func" (default: torch.func vmap(jacrev) over example chunks of at most ``chunk_size``) or
    "loop" (per-example autograd). For "func", ``output_fn`` must be vmap-safe (no data-dependent Python
    control flow on tensors); the outputs in ``rocoft_pl.ntk.outputs`` are.
    """
    if not sets:
        raise ValueError("empirical_ntk needs at least one parameter set")
    if len(examples) == 0:
        raise ValueError("empirical_ntk needs at least one example")
    if method not in ("func", "loop"):
        raise ValueError(f"method must be 'func' or 'loop', got {method!r}")
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
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings >= _SPARSE_MIN_ROWS}
    whole = {p for p in order if any(s is None for _, s in users[p])}
    sparse = {p for p in whole if id(params[p]) in embedding_tables and all(s is None for _, s in users[p])}
    tokens = sum(v.numel() for ex in examples for v in ex.values() if isinstance(v, torch.Tensor) and not v.is_floating_point())

    def stored(p: str) -> int:
        if p in sparse:  # estimate: at most one touched row per input token
            return min(params[p].numel(), max(tokens, 1) * params[p].numel() // params[p].shape[0])
        if p in whole:
            return params[p].numel()
        return min(params[p].numel(), sum(spec_size(params[p].shape, s) for _, s in users[p]))

    with torch.no_grad(), _grad_only(model, set()):
        probe = output_fn(model, _to(examples[0], device))
    if probe.dim() != 1:
        raise ValueError(f"output_fn must return a 1-D tensor of outputs, got shape {tuple(probe.shape)}")
    d = probe.numel()
    n = len(examples)
    m = len(cross_examples) if cross_examples is not None else 0
    nd = n * d
    copies = 2 if m else 1  # train buffer + one test batch buffer
    elem = torch.finfo(next(iter(params.values())).dtype).bits // 8
    total = max_memory_mb * 2**20
    sizes = [(p, stored(p)) for p in order]
    buffer_bytes = total if method == "loop" else 0.9 * total
    groups = _groups(sizes, max(1, int(buffer_bytes / (copies * nd * elem))))
    if method == "func":
        # A vmap chunk also holds the full-tensor gradients of its group (x3 for jacrev's temporaries): reserve
        # room for a full chunk of the largest group, at most half the budget, and regroup with the rest.
        largest = max(sum(params[p].numel() for p in g if p not in sparse) for g in groups)  # tables: small chunks
        need = 3 * (chunk_size or _DEFAULT_CHUNK) * d * elem * largest
        if need > total - buffer_bytes:
            buffer_bytes = max(total / 2, total - need)
            groups = _groups(sizes, max(1, int(buffer_bytes / (copies * nd * elem))))

    kernels = {s: torch.zeros(nd, nd, dtype=torch.float64, device=device) for s in sets}
    cross = {s: torch.zeros(m * d, nd, dtype=torch.float64, device=device) for s in sets}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups) * (n + m), desc=f"NTK ({method}) {len(groups)} group(s) x {n}+{m} examples", leave=False)

    def new_buffers(group: list[str], rows: int) -> dict[Any, Any]:
        buffers: dict[Any, Any] = {}
        for p in group:
            if p in sparse:
                buffers[p] = _SparseRows(rows, params[p].shape)
            elif p in whole:
                buffers[p] = torch.empty((rows, *params[p].shape), dtype=params[p].dtype, device=device)
            else:
                for k, (_, spec) in enumerate(users[p]):
                    buffers[(p, k)] = torch.empty((rows, spec_size(params[p].shape, spec)), dtype=params[p].dtype, device=device)
        return buffers

    def store(buffers: dict[Any, Any], p: str, at: torch.Tensor, g: torch.Tensor) -> None:
        """Gradients ``g`` (r, *shape) of tensor ``p`` for buffer rows ``at``."""
        if p in sparse:
            buffers[p].put(at, g)
        elif p in whole:
            buffers[p][at] = g.to(buffers[p].dtype)
        else:
            for k, (_, spec) in enumerate(users[p]):
                buffers[(p, k)][at] = take(g, spec).to(buffers[(p, k)].dtype)

    def fill_loop(group: list[str], batch: Sequence[Mapping[str, Any]]) -> dict[Any, Any]:
        buffers = new_buffers(group, len(batch) * d)
        tensors = [params[p] for p in group]
        for i, example in enumerate(batch):
            out = output_fn(model, _to(example, device))
            if out.shape != probe.shape:
                raise ValueError(f"example {i}: output shape {tuple(out.shape)} differs from {tuple(probe.shape)}")
            per: list[list[torch.Tensor]] = [[] for _ in group]
            for a in range(d):
                grads = torch.autograd.grad(out[a], tensors, retain_graph=a < d - 1, allow_unused=True)
                for slot, (p, g) in enumerate(zip(group, grads)):
                    per[slot].append(torch.zeros_like(params[p]) if g is None else g)
            at = torch.arange(i * d, (i + 1) * d, device=device)
            for p, gs in zip(group, per):
                store(buffers, p, at, torch.stack(gs))
            if bar is not None:
                bar.update(1)
        return buffers

    bound = _Bound(model, output_fn)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0

    def fill_func(group: list[str], batch: Sequence[Mapping[str, Any]]) -> dict[Any, Any]:
        from torch.func import functional_call, jacrev, vmap

        buffers = new_buffers(group, len(batch) * d)
        gparams = {p: params[p].detach() for p in group}
        full_bytes = sum(params[p].numel() for p in group) * elem * d
        step = max(1, int((total - buffer_bytes) / max(3 * full_bytes, 1)))  # x3: jacrev temporaries
        step = min(step, chunk_size or _DEFAULT_CHUNK)  # at least 1: a chunk of one may exceed the budget

        def f(gp: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(bound, {f"model.{k}": v for k, v in gp.items()}, (tensors,))

        per_example = vmap(jacrev(f), in_dims=(None, 0))
        for idx, tensors, consts in _chunks(batch, step, pad_id):
            bound.consts = consts
            try:
                jac = per_example(gparams, {k: v.to(device) for k, v in tensors.items()})
            except RuntimeError as err:
                if "vmap" in str(err):
                    raise RuntimeError(f"{err}\n(output_fn or the model is not vmap-safe: use method='loop')") from err
                raise
            finally:
                bound.consts = {}
            at = (torch.as_tensor(idx, device=device)[:, None] * d + torch.arange(d, device=device)).flatten()
            for p in group:
                g = jac[p]
                if g.shape[:2] != (len(idx), d):
                    raise ValueError(f"output shape {tuple(g.shape[1:-params[p].dim()])} differs from {tuple(probe.shape)}")
                store(buffers, p, at, g.reshape(len(idx) * d, *params[p].shape))
            del jac
            if bar is not None:
                bar.update(len(idx))
        return buffers

    fill = fill_func if method == "func" else fill_loop

    def parts(buffers: dict[Any, Any], p: str, rows: Optional[torch.Tensor] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(set name, (r, k) gradient matrix) for every set that uses ``p``."""
        if p in sparse:
            dense = buffers[p].dense(rows)
            for set_name, _ in users[p]:
                yield set_name, dense
            return
        for k, (set_name, spec) in enumerate(users[p]):
            yield set_name, take(buffers[p], spec) if p in whole else buffers[(p, k)]

    context = _vmap_friendly(model) if method == "func" else _nullcontext()
    with _grad_only(model, set(order) if method == "loop" else set()), context:
        for group in groups:
            train = fill(group, examples)
            rows = {p: train[p].union() for p in group if p in sparse}
            dense_train: dict[str, list[tuple[str, torch.Tensor]]] = {}
            for p in group:
                dense_train[p] = list(parts(train, p, rows.get(p)))
                for set_name, g in dense_train[p]:
                    _gram_into(kernels[set_name], g)
            for start in range(0, m, n):
                batch = cross_examples[start : start + n]
                test = fill(group, batch)
                for p in group:
                    for (set_name, g), (_, h) in zip(parts(test, p, rows.get(p)), dense_train[p]):
                        _gram_into(cross[set_name][start * d : (start + len(batch)) * d], g, h)
                del test
            del train, dense_train
    if bar is not None:
        bar.close()
    result = {s: k.reshape(n, d, n, d).cpu() for s, k in kernels.items()}
    if cross_examples is None:
        return result
    return result, {s: k.reshape(m, d, n, d).cpu() for s, k in cross.items()}


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _chunks(
    batch: Sequence[Mapping[str, Any]], step: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], dict[str, Any]]]:
    """(indices, stacked tensors (B, *shape), non-tensor entries) for vmap, at most ``step`` examples each.

    Examples with an ``attention_mask`` are right-padded to the longest of their chunk (every tensor of the
    mask's shape: input_ids with the model's pad id, the rest with 0) after sorting by length; examples that
    differ in anything else (other shapes, non-tensor entries) go to different chunks.
    """

    def length(ex: Mapping[str, Any]) -> int:
        mask = ex.get("attention_mask")
        return int(mask.shape[-1]) if isinstance(mask, torch.Tensor) and mask.dim() >= 1 else 0

    def key(ex: Mapping[str, Any]) -> tuple:
        mask = ex.get("attention_mask")
        padded = mask.shape if isinstance(mask, torch.Tensor) and mask.dim() >= 1 else None
        parts = []
        for k in sorted(ex):
            v = ex[k]
            if isinstance(v, torch.Tensor):
                parts.append((k, "pad", tuple(v.shape[:-1]), v.dtype) if padded is not None and v.shape == padded else (k, tuple(v.shape), v.dtype))
            else:
                parts.append((k, "const", repr(v)))
        return tuple(parts)

    buckets: dict[tuple, list[int]] = {}
    for i, ex in enumerate(batch):
        buckets.setdefault(key(ex), []).append(i)
    for members in buckets.values():
        members = sorted(members, key=lambda i: length(batch[i]))
        for s in range(0, len(members), step):
            idx = members[s : s + step]
            first = batch[idx[0]]
            longest = max(length(batch[i]) for i in idx)
            mask_shape = first["attention_mask"].shape if length(first) else None
            tensors, consts = {}, {}
            for k, v in first.items():
                if not isinstance(v, torch.Tensor):
                    consts[k] = v
                    continue
                rows = [batch[i][k] for i in idx]
                if mask_shape is not None and v.shape == mask_shape:
                    value = pad_id if k == "input_ids" else 0
                    rows = [torch.nn.functional.pad(r, (0, longest - r.shape[-1]), value=value) for r in rows]
                tensors[k] = torch.stack(rows)
            yield idx, tensors, consts


def _to(example: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
