"""Which rows / columns / entries to train: first, random, and Wanda max / min / mixed.

Wanda (Sun et al., 2023) scores a weight by S_ij = |W_ij| * ||X_j||_2, with X the inputs the layer really
sees (padding excluded). The row score sums S over j (one score per output feature), the column score
sums over i (one per input feature). 'mixed' takes ceil(r/2) from the top and floor(r/2) from the bottom.
Mode 'both' selects its rows and its columns each this way (``select_index_sets``).
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .layers import PARTS, features
from .quantized import dense_weight


def module_generator(seed: int, name: str, stream: str = "") -> torch.Generator:
    """A generator per module: the choice for one module does not depend on which others are targeted.
    ``stream`` names another independent draw for the same module (mode 'both''s columns)."""
    key = f"{name}#{stream}" if stream else name
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def select_from_scores(scores: torch.Tensor, r: int, strategy: str) -> torch.Tensor:
    """Indices (sorted) of the r highest ('max'), lowest ('min') or half of each ('mixed') scores."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    if strategy == "max":
        chosen = order[:r]
    elif strategy == "min":
        chosen = order[-r:]
    elif strategy == "mixed":
        top = (r + 1) // 2
        chosen = torch.cat([order[:top], order[len(order) - (r - top):]]) if r - top else order[:top]
    else:
        raise ValueError(f"unknown score-based selection {strategy!r}")
    return torch.sort(chosen).values


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor, mode: str) -> torch.Tensor:
    """Row (per output feature) or column (per input feature) Wanda scores of a logical (out x in) weight."""
    s = weight.detach().abs().double() * input_norm.double().to(weight.device)[None, :]
    return s.sum(dim=1) if mode == "row" else s.sum(dim=0)


def select_indices(
    module: nn.Module,
    name: str,
    mode: str,
    rank: int,
    p: float,
    strategy: str,
    seed: int,
    input_norm: Optional[torch.Tensor] = None,
    stream: str = "",
) -> torch.Tensor:
    """Sorted CPU LongTensor of the rows / columns / flat entries of ``module`` to train (``mode``: 'row',
    'column' or 'entries'; mode 'both' has two index sets: ``select_index_sets``). ``stream``: see
    ``module_generator``."""
    if mode not in ("row", "column", "entries"):
        raise ValueError(f"select_indices selects one index set (row, column, entries), not {mode!r}: see select_index_sets")
    out_features, in_features = features(module)
    n = PARTS[mode][0].limit(out_features, in_features)
    if mode == "entries":  # a fraction p of the entries, not r of them
        mask = torch.rand(n, generator=module_generator(seed, name)) < p
        chosen = mask.nonzero().flatten()
        if chosen.numel() == 0:  # p * n < 1: keep at least one entry so every target trains something
            chosen = torch.randint(n, (1,), generator=module_generator(seed, name))
        return chosen
    if rank > n:
        raise ValueError(f"rank {rank} exceeds the {n} {mode}s of {name} ({out_features}x{in_features})")
    if strategy == "first":
        return torch.arange(rank)
    if strategy == "random":
        return torch.sort(torch.randperm(n, generator=module_generator(seed, name, stream))[:rank]).values
    if input_norm is None:
        raise ValueError(f"selection {strategy!r} needs calibration inputs for {name}")
    if module.weight.is_meta:
        raise ValueError(f"selection {strategy!r} needs real weights; {name} is on the meta device")
    weight = dense_weight(module)  # a quantized W0 is dequantised here, this one layer only
    return select_from_scores(wanda_scores(weight, input_norm, mode), rank, strategy).cpu()


def select_index_sets(
    module: nn.Module,
    name: str,
    mode: str,
    rank: int,
    p: float,
    strategy: str,
    seed: int,
    input_norm: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """The index sets ``mode`` trains in ``module``, by buffer name (``RoCoFTLinear``'s keyword arguments):
    ``indices``, and in mode 'both' ``column_indices`` too, each selected over its own axis by ``strategy``
    (Wanda: row scores for the rows, column scores for the columns; random: independent seed streams)."""
    return {
        part.indices: select_indices(module, name, part.axis, rank, p, strategy, seed, input_norm, part.stream)
        for part in PARTS[mode]
    }


class _TokenMask:
    """The current batch's attention mask, so forward hooks can drop padding positions."""

    mask: Optional[torch.Tensor] = None


def _valid_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x as (tokens, features) without padding when the mask's (batch, seq) shape matches x."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    # Inputs whose layout differs from the encoder mask (e.g. a decoder): every position counts.
    return x.reshape(-1, x.shape[-1])


def filter_batch(forward: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the keys ``forward`` accepts (data loaders often add ids or metadata)."""
    params = inspect.signature(forward.forward if isinstance(forward, nn.Module) else forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(batch)
    return {k: v for k, v in batch.items() if k in params}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration: Iterable[Any],
    forward: Optional[Any] = None,
) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input feature of each module over all non-padding tokens of the calibration batches.

    Each batch is a mapping (passed as keyword arguments, keys the forward does not take are dropped,
    ``attention_mask`` masks padding) or a tensor (passed positionally). ``forward`` defaults to ``model``.
    """
    forward = forward if forward is not None else model
    sums = {name: None for name in modules}
    state = _TokenMask()

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _valid_tokens(args[0].detach(), state.mask).double()
            sq = (x * x).sum(dim=0)
            sums[name] = sq if sums[name] is None else sums[name] + sq

        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in calibration:
            batch = _to_device(batch, device)
            if isinstance(batch, Mapping):
                state.mask = batch.get("attention_mask")
                forward(**filter_batch(forward, batch))
            else:
                state.mask = None
                forward(batch)
            seen += 1
        if seen == 0:
            raise ValueError("Wanda calibration got no batches")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise ValueError(f"Wanda calibration never reached these modules: {missing[:5]}")
    return {n: s.sqrt() for n, s in sums.items()}

