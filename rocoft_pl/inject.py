"""apply_rocoft / merge_rocoft: find targets and heads, swap in RoCoFTLinear, freeze the rest, report.

apply_rocoft validates everything (targets, ranks, calibration, indices) before it touches the model, so a
failure leaves the model exactly as it was. merge_rocoft keeps a stack of records (one per call), so
apply -> merge -> apply -> merge can be undone step by step by unmerge_rocoft, bit-exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import RoCoFTConfig
from .layers import RoCoFTLinear, is_supported_base
from .quantized import check_exact_merges, keep_trainable_layout, logical_numels, unsupported_message, unsupported_reason
from .selection import collect_input_norms, select_index_sets

# Task heads that are trained fully when modules_to_save is None (matched on the last name segment).
AUTO_HEADS = ("classifier", "score", "qa_outputs", "classification_head")


def rocoft_layers(model: nn.Module) -> dict[str, RoCoFTLinear]:
    """Every RoCoFTLinear in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RoCoFTLinear)}


def block_prefixes(model: nn.Module) -> list[str]:
    """Names of the transformer blocks: the elements of ModuleLists whose elements share one class."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and not is_supported_base(module[0]):
                prefixes.extend(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return prefixes


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_heads(model: nn.Module, config: RoCoFTConfig) -> dict[str, nn.Module]:
    """The modules trained fully (the task head): auto-detected or named in ``config.modules_to_save``."""
    named = dict(model.named_modules())
    if config.modules_to_save is None:
        blocks = block_prefixes(model)
        found = {n: m for n, m in named.items() if n.split(".")[-1] in AUTO_HEADS and not _inside(n, blocks)}
    else:
        found = {}
        for suffix in config.modules_to_save:
            hits = {n: m for n, m in named.items() if n and _matches_suffix(n, suffix)}
            if not hits:
                raise ValueError(f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}")
            found.update(hits)
    # Keep only the outermost of nested matches.
    return {n: m for n, m in found.items() if not _inside(n, [o for o in found if o != n])}


def find_targets(model: nn.Module, config: RoCoFTConfig, heads: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The nn.Linear / Conv1D modules RoCoFT adapts, in module order. A quantized layer of a kind RoCoFT does
    not support that the targets select (``rocoft_pl.quantized.unsupported_reason``) is a TypeError naming it."""
    heads = list(heads)
    refused = {n: why for n, m in model.named_modules() if n and not _inside(n, heads) and (why := unsupported_reason(m))}
    candidates = {
        n: m for n, m in model.named_modules() if (is_supported_base(m) or n in refused) and n and not _inside(n, heads)
    }
    if config.targets is None:
        blocks = block_prefixes(model)
        chosen = {n: m for n, m in candidates.items() if _inside(n, blocks)}
        where = "inside the transformer blocks (ModuleList elements)"
    elif isinstance(config.targets, str):
        pattern = re.compile(config.targets)
        chosen = {n: m for n, m in candidates.items() if pattern.fullmatch(n)}
        where = f"matching the regex {config.targets!r}"
    else:
        chosen = {n: m for n, m in candidates.items() if any(_matches_suffix(n, s) for s in config.targets)}
        where = f"ending in one of {config.targets}"
    if not chosen:
        sample = list(candidates)[:8]
        raise ValueError(
            f"RoCoFT targets match nothing: no nn.Linear/Conv1D of {type(model).__name__} {where}. "
            f"Some Linear layers it has: {sample}"
        )
    unsupported = {n: refused[n] for n in chosen if n in refused}
    if unsupported:
        raise TypeError(unsupported_message(unsupported))
    return chosen


@dataclass
class ModuleReport:
    name: str
    kind: str
    out_features: int
    in_features: int
    mode: str
    selected: int
    trainable: int


@dataclass
class RoCoFTReport:
    """Parameter counts after apply_rocoft. Percentages are of the base model's parameters."""

    modules: list[ModuleReport] = field(default_factory=list)
    rocoft_params: int = 0
    bias_params: int = 0
    head_params: int = 0
    other_trainable_params: int = 0
    base_params: int = 0
    # load_adapter(allow_partial=True) only: adapter targets it did not load (absent or shaped differently
    # in this model), and targets the adapter's config selects in this model that it has no values for.
    skipped_targets: list[str] = field(default_factory=list)
    unadapted_targets: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return self.rocoft_params + self.bias_params + self.head_params + self.other_trainable_params

    def percent(self, n: int) -> float:
        return 100.0 * n / max(self.base_params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rocoft_params": self.rocoft_params,
            "bias_params": self.bias_params,
            "head_params": self.head_params,
            "other_trainable_params": self.other_trainable_params,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "trainable_percent": self.percent(self.trainable_params),
            "skipped_targets": list(self.skipped_targets),
            "unadapted_targets": list(self.unadapted_targets),
            "modules": [vars(m) for m in self.modules],
        }

    def table(self) -> str:
        """One row per adapted module: name, kind, shape, mode, rows/columns selected, trainable."""
        width = max([len(m.name) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  kind    shape (out x in)  mode     selected  trainable"]
        for m in self.modules:
            shape = f"{m.out_features} x {m.in_features}"
            lines.append(f"{m.name:<{width}}  {m.kind:<6}  {shape:<16}  {m.mode:<7}  {m.selected:>8}  {m.trainable:>9,}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The counts (RoCoFT, bias, head, other, trainable) and any targets an adapter load skipped."""
        lines = []
        for label, n in (
            ("RoCoFT", self.rocoft_params),
            ("bias", self.bias_params),
            ("head", self.head_params),
            ("other", self.other_trainable_params),
            ("trainable", self.trainable_params),
        ):
            if n or label in ("RoCoFT", "trainable"):
                lines.append(f"{label + ' parameters:':<24}{n:>14,}  ({self.percent(n):.4f}% of {self.base_params:,})")
        if self.skipped_targets:
            lines.append(f"skipped {len(self.skipped_targets)} adapter targets that do not fit this model: "
                         f"{_some(self.skipped_targets)}")
        if self.unadapted_targets:
            lines.append(f"{len(self.unadapted_targets)} targets the adapter's config selects here have no adapter "
                         f"values and stay plain: {_some(self.unadapted_targets)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.summary()}"


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n})" if len(names) > n else "")


def rocoft_report(model: nn.Module) -> RoCoFTReport:
    """Counts derived from the model as it is: deltas, trainable biases of adapted layers, everything else."""
    layers = rocoft_layers(model)
    report = RoCoFTReport()
    bias_ids = set()
    for name, layer in layers.items():
        report.modules.append(
            ModuleReport(
                name=name,
                kind="Conv1D" if layer.transposed else "Linear",
                out_features=layer.out_features,
                in_features=layer.in_features,
                mode=layer.mode,
                selected=sum(idx.numel() for idx in layer.index_sets.values()),  # 'both': r rows + r columns
                trainable=layer.num_trainable,
            )
        )
        report.rocoft_params += layer.num_trainable
        if layer.base.bias is not None and layer.base.bias.requires_grad:
            report.bias_params += layer.base.bias.numel()
            bias_ids.add(id(layer.base.bias))
    delta_ids = {id(d) for layer in layers.values() for d in layer.deltas.values()}
    head_ids = {id(p) for n, m in model.named_modules() if getattr(m, "_rocoft_head", False) for p in m.parameters()}
    packed = logical_numels(model)  # a packed 4-bit weight counts the parameters it stands for
    for p in model.parameters():
        if id(p) in delta_ids:
            continue
        report.base_params += packed.get(id(p), p.numel())
        if p.requires_grad and id(p) not in bias_ids:
            if id(p) in head_ids:
                report.head_params += p.numel()
            else:
                report.other_trainable_params += p.numel()
    return report


def apply_rocoft(
    model: nn.Module,
    config: RoCoFTConfig,
    calibration: Optional[Iterable[Any]] = None,
    *,
    indices: Optional[Mapping[str, torch.Tensor]] = None,
    forward: Optional[Callable[..., Any]] = None,
) -> RoCoFTReport:
    """Adapt ``model`` in place: targets become RoCoFTLinear, heads train fully, everything else freezes.

    ``calibration``: batches for Wanda selection ('max'/'min'/'mixed'), mappings passed as keyword
    arguments to ``forward`` (default: ``model``) with ``attention_mask`` marking padding.
    ``indices``: explicit indices per target name (used by load_adapter); overrides ``selection``. Each is a
    tensor, or (mode 'both') a mapping {"indices": rows, "column_indices": columns}.
    """
    if not isinstance(config, RoCoFTConfig):
        raise TypeError(f"apply_rocoft expects a RoCoFTConfig, got {type(config).__name__}")
    if rocoft_layers(model):
        raise ValueError("model already has RoCoFT layers; use merge_rocoft() first or start from a fresh model")
    heads = find_heads(model, config)
    targets = find_targets(model, config, heads)
    if indices is not None:
        unknown = set(indices) - set(targets)
        missing = set(targets) - set(indices)
        if unknown or missing:
            raise ValueError(
                f"stored indices do not fit the model's targets: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unknown)[:5]}"
            )
        chosen = {n: _index_sets(indices[n]) for n in targets}
    else:
        norms: dict[str, torch.Tensor] = {}
        if config.needs_calibration:
            if calibration is None:
                raise ValueError(
                    f"selection={config.selection!r} scores weights with real inputs: pass calibration batches"
                )
            keep_trainable_layout(model, unpack=False)  # calibration runs in eval mode (rocoft_pl.quantized)
            norms = collect_input_norms(model, targets, calibration, forward)
        chosen = {
            n: select_index_sets(m, n, config.mode, config.rank, config.p, config.selection, config.seed, norms.get(n))
            for n, m in targets.items()
        }
    # Build every new layer before changing anything: a bad index fails here with the model intact.
    new_layers = {}
    for name, module in targets.items():
        try:
            new_layers[name] = RoCoFTLinear(module, config.mode, **chosen[name])
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}: {err}") from None

    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        model.set_submodule(name, layer)
        for delta in layer.deltas.values():
            delta.requires_grad_(True)
        if config.train_bias:
            layer.train_bias()
    for head in heads.values():
        head._rocoft_head = True
        for p in head.parameters():
            p.requires_grad_(True)
    keep_trainable_layout(model)  # bitsandbytes' CPU inference layout has no backward (rocoft_pl.quantized)
    model._rocoft_config = config
    return rocoft_report(model)


def _index_sets(given: Any) -> dict[str, torch.Tensor]:
    """Explicit indices of one target as RoCoFTLinear's keyword arguments: a tensor is its ``indices``."""
    if isinstance(given, Mapping):
        return {k: torch.as_tensor(v, dtype=torch.long).cpu() for k, v in given.items()}
    return {"indices": torch.as_tensor(given, dtype=torch.long).cpu()}


# Where merge_rocoft keeps its records for unmerge_rocoft: a list (a stack, one entry per merge) of the merged
# wrappers by name (deltas, indices, W0's original entries), in the model's __dict__, not as a submodule,
# so state_dict and save_pretrained do not see them.
MERGED_LAYERS = "_rocoft_merged_layers"


def merge_rocoft(model: nn.Module) -> nn.Module:
    """Fold every delta into its base weight and put the plain layer back (W0[idx] += D). In place.

    The result has no RoCoFT modules, so ``save_pretrained`` works and inference costs nothing extra.
    ``unmerge_rocoft`` undoes it (W0 restored bit-exactly) while this model object lives; from a saved
    merged checkpoint, load the adapter onto the base model instead. Merging again after another
    ``apply_rocoft`` pushes a second record: each ``unmerge_rocoft`` undoes the latest merge.

    A quantized W0 (4 / 8 bits) takes the deltas only where that is exact, else nothing is merged and a
    ValueError says so: ``rocoft_pl.merge_rocoft_dequantized`` gives a plain model instead.
    """
    layers = rocoft_layers(model)
    if not layers:
        return model
    folded = [n for n, layer in layers.items() if getattr(layer, "reselection", None) is not None]
    if folded:
        # Merging would work, but unmerge would restore the folded W0, not the original one.
        raise ValueError(
            f"merge_rocoft: {len(folded)} layers (e.g. {folded[0]!r}) hold re-selected RoCoFT layers: "
            "call rocoft_pl.reselect.consolidate(model) first"
        )
    check_exact_merges(layers)  # a quantized W0 takes W0 + D only where that is exact; else nothing changes
    record = merged_record(model)
    if record is not None and record[0] is not model:
        # One stack per model keeps the merges in order; two (here and in a submodule) would not.
        inner = next(n for n, m in model.named_modules() if m is record[0])
        raise ValueError(
            f"merge_rocoft: the submodule {inner!r} holds earlier merges (merge_rocoft was called on it); "
            f"call merge_rocoft on that submodule, so one record keeps the merges in order"
        )
    merged = {}
    for name, layer in layers.items():
        model.set_submodule(name, layer.merge())
        merged[name] = layer
    model.__dict__.setdefault(MERGED_LAYERS, []).append(merged)
    return model


def merged_record(model: nn.Module) -> Optional[tuple[nn.Module, dict[str, RoCoFTLinear]]]:
    """(the module merge_rocoft was called on, the wrappers of its latest merge by name), searched in
    ``model`` and its submodules (a LightningModule holding the merged model), or None if nothing is merged."""
    for module in model.modules():
        stack = module.__dict__.get(MERGED_LAYERS)
        if stack:
            return module, stack[-1]
    return None


def unmerge_rocoft(model: nn.Module, *, discard_later: bool = False) -> nn.Module:
    """Undo the latest ``merge_rocoft``: W0's selected entries restored from the copies taken at merge time
    (exact), the RoCoFT layers put back with their deltas, ready to train or save again. In place; ``model``
    may also hold the merged model (a LightningModule).

    After apply -> merge -> apply -> merge, the first call brings back the second adapter's layers (over
    W0 + D1), the next one W0 and the first adapter's layers. That second step replaces the second adapter's
    layers, whose deltas were trained on the merged weights: it refuses unless ``discard_later=True``
    (``save_adapter`` them first to keep them).
    """
    record = merged_record(model)
    if record is None:
        raise ValueError("unmerge_rocoft: this model has no layers merged by merge_rocoft")
    holder, merged = record
    later = []
    for name, layer in merged.items():  # check everything before changing anything
        try:
            current = holder.get_submodule(name)
        except AttributeError:
            current = None
        if isinstance(current, RoCoFTLinear) and current.base is layer.base and not current.merged:
            later.append(name)  # applied on top of this merge after it
        elif current is not layer.base:
            raise ValueError(f"unmerge_rocoft: {name!r} is no longer the layer merge_rocoft left there")
    if later and not discard_later:
        raise ValueError(
            f"unmerge_rocoft: {len(later)} layers merged earlier now hold RoCoFT layers applied after that merge "
            f"(e.g. {later[0]!r}); their deltas were trained on the merged weights and undoing the merge "
            "discards them. save_adapter(model) first if you need them, then unmerge_rocoft(model, discard_later=True)"
        )
    for name, layer in merged.items():
        holder.set_submodule(name, layer.unmerge().to(layer.base.weight.device))
    stack = holder.__dict__[MERGED_LAYERS]
    stack.pop()
    if not stack:
        del holder.__dict__[MERGED_LAYERS]
    return model


__all__ = [
    "AUTO_HEADS",
    "RoCoFTReport",
    "apply_rocoft",
    "block_prefixes",
    "find_heads",
    "find_targets",
    "merge_rocoft",
    "merged_record",
    "rocoft_layers",
    "rocoft_report",
    "unmerge_rocoft",
]
