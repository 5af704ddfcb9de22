"""apply_rocoft / merge_rocoft / unload_rocoft: find targets and heads, swap in RoCoFTLinear, freeze the rest,
report.

apply_rocoft validates everything (targets, ranks, calibration, indices) before it touches the model, so a
failure leaves the model exactly as it was. On a model that has RoCoFT layers it adds another named adapter to
them (see multi_adapter). merge_rocoft folds the active adapter into W0 and keeps the wrappers (``merged``: their
forward skips the delta), unmerge_rocoft restores W0 bit-exactly, and unload_rocoft puts the plain layers back
(what save_pretrained needs). The merge state lives in each layer, nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .config import RoCoFTConfig
from .layers import DEFAULT_ADAPTER, RoCoFTDelta, RoCoFTLinear, check_adapter_name, is_supported_base
from .quantized import check_exact_merges, keep_trainable_layout, logical_numels, unsupported_message, unsupported_reason
from .selection import collect_input_norms, select_index_sets

# Task heads that are trained fully when modules_to_save is None (matched on the last name segment).
AUTO_HEADS = ("classifier", "score", "qa_outputs", "classification_head")


def rocoft_layers(model: nn.Module) -> dict[str, RoCoFTLinear]:
    """Every RoCoFTLinear in ``model`` by qualified name, in ``named_modules`` order (a module reachable twice
    counted once, under its first name). The walk does not enter the RoCoFT layers: with many adapters their
    per-adapter modules outnumber the model's own, and switching adapters walks the model every call."""
    if isinstance(model, RoCoFTLinear):
        return {"": model}
    found: dict[str, RoCoFTLinear] = {}
    seen = {id(model)}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            qualified = f"{prefix}.{name}" if prefix else name
            if isinstance(child, RoCoFTLinear):
                found[qualified] = child
            else:
                visit(child, qualified)

    visit(model, "")
    return found


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
    """The nn.Linear / Conv1D modules RoCoFT adapts, in module order. A RoCoFT layer stands for its base (the
    name a config's targets see), so another adapter's targets are found on an adapted model too. A quantized
    layer of a kind RoCoFT does not support that the targets select (``rocoft_pl.quantized.unsupported_reason``)
    is a TypeError naming it."""
    heads = list(heads)
    wrapped = list(rocoft_layers(model))
    refused = {
        n: why
        for n, m in model.named_modules()
        if n and not _inside(n, heads) and not _inside(n, wrapped) and (why := unsupported_reason(m))
    }
    candidates = {
        n: m
        for n, m in model.named_modules()
        if n and (isinstance(m, RoCoFTLinear) or ((is_supported_base(m) or n in refused) and not _inside(n, wrapped)))
        and not _inside(n, heads)
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


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on ``model``'s RoCoFT layers (every layer holds the same ones); [] without any."""
    layers = list(rocoft_layers(model).values())
    return list(layers[0].adapters) if layers else []


def layers_holding(model: nn.Module, name: Optional[str] = None) -> tuple[dict[str, RoCoFTLinear], str]:
    """``model``'s RoCoFT layers (one walk of the model) and the adapter name asked for (default: the active one).
    Raises with the names there are when ``model`` has no RoCoFT layers or no adapter ``name``."""
    layers = rocoft_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RoCoFT adapters (apply_rocoft, load_adapter or add_adapter first)")
    first = next(iter(layers.values()))
    name = first.active_adapter if name is None else name
    if name not in first.adapters:
        raise ValueError(f"no RoCoFT adapter named {name!r}; the model has {list(first.adapters)}")
    return layers, name


def named_adapters(model: nn.Module, name: Optional[str] = None) -> dict[str, RoCoFTDelta]:
    """Adapter ``name``'s tensors in every RoCoFT layer by layer name (default: the active adapter). Raises with
    the names there are when ``model`` has no RoCoFT layers or no adapter ``name``."""
    layers, name = layers_holding(model, name)
    return {n: layer.adapters[name] for n, layer in layers.items()}


def is_merged(model: nn.Module) -> bool:
    """Whether an adapter of ``model`` is merged into its weights (merge_rocoft)."""
    return any(layer.merged for layer in rocoft_layers(model).values())


def rocoft_report(model: nn.Module, adapter_name: Optional[str] = None) -> RoCoFTReport:
    """Counts derived from the model as it is: one adapter's deltas (default: the active one), trainable biases
    of adapted layers, everything else. No adapter's deltas count as base parameters."""
    layers = rocoft_layers(model)
    adapters = named_adapters(model, adapter_name) if layers else {}
    report = RoCoFTReport()
    bias_ids = set()
    for name, layer in layers.items():
        adapter = adapters[name]
        report.modules.append(
            ModuleReport(
                name=name,
                kind="Conv1D" if layer.transposed else "Linear",
                out_features=layer.out_features,
                in_features=layer.in_features,
                mode=adapter.mode,
                selected=sum(idx.numel() for idx in adapter.index_sets.values()),  # 'both': r rows + r columns
                trainable=adapter.num_trainable,
            )
        )
        report.rocoft_params += adapter.num_trainable
        if layer.base.bias is not None and layer.base.bias.requires_grad:
            report.bias_params += layer.base.bias.numel()
            bias_ids.add(id(layer.base.bias))
    delta_ids = {id(d) for layer in layers.values() for a in layer.adapters.values() for d in a.deltas.values()}
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
    adapter_name: str = DEFAULT_ADAPTER,
) -> RoCoFTReport:
    """Adapt ``model`` in place: targets become RoCoFTLinear, heads train fully, everything else freezes.

    ``calibration``: batches for Wanda selection ('max'/'min'/'mixed'), mappings passed as keyword
    arguments to ``forward`` (default: ``model``) with ``attention_mask`` marking padding.
    ``indices``: explicit indices per target name (used by load_adapter); overrides ``selection``. Each is a
    tensor, or (mode 'both') a mapping {"indices": rows, "column_indices": columns}.
    ``adapter_name``: the adapter's name; ``multi_adapter.add_adapter`` adds more adapters to the layers.
    """
    _check_config(config)
    check_adapter_name(adapter_name)
    names = adapter_names(model)
    if names:
        raise ValueError(
            f"model already has RoCoFT layers (adapters {names}): add_adapter(model, name, config) adds another "
            "adapter; unload_rocoft(model) gives back plain layers"
        )
    heads = find_heads(model, config)
    targets = find_targets(model, config, heads)
    chosen = _choose(model, config, targets, calibration, indices, forward)
    # Build every new layer before changing anything: a bad index fails here with the model intact.
    new = _build(targets, lambda n, base: RoCoFTLinear(base, config.mode, **chosen[n], adapter_name=adapter_name))
    for name, layer in new.items():
        layer.adapter.rocoft_config, layer.adapter.target = config, name

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():  # a head of an earlier, unloaded adapter is no head of this one
        vars(m).pop("_rocoft_head", None)
    for name, layer in new.items():
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
    return rocoft_report(model)


def attach_adapter(
    model: nn.Module,
    adapter_name: str,
    config: RoCoFTConfig,
    calibration: Optional[Iterable[Any]] = None,
    *,
    indices: Optional[Mapping[str, torch.Tensor]] = None,
    forward: Optional[Callable[..., Any]] = None,
) -> RoCoFTReport:
    """Add adapter ``adapter_name`` to the RoCoFT layers of ``model`` (``multi_adapter.add_adapter``,
    ``load_adapter``), selected as ``apply_rocoft`` selects. It must select the same layers and train no bias and no
    head (weights every adapter would share); it stays inactive and frozen until ``set_adapter``. Wanda scores it
    on the base model's activations (the adapters disabled), so it selects what a fresh model would."""
    _check_config(config)
    check_adapter_name(adapter_name)
    layers = rocoft_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RoCoFT layers to add adapter {adapter_name!r} to: apply_rocoft first")
    check_addable(model, adapter_name, config.train_bias)
    heads = find_heads(model, config)
    targets = find_targets(model, config, heads)
    _check_same_layers(layers, targets, heads, adapter_name)
    bases = {n: layers[n].base for n in targets}
    with disabled(layers.values()):
        chosen = _choose(model, config, bases, calibration, indices, forward)
    new = _build(bases, lambda n, base: RoCoFTDelta(base, config.mode, chosen[n]))
    for name, adapter in new.items():
        adapter.rocoft_config, adapter.target = config, name
        adapter.requires_grad_(False)
        layers[name].adapters[adapter_name] = adapter
    return rocoft_report(model, adapter_name)


def _check_config(config: Any) -> None:
    if not isinstance(config, RoCoFTConfig):
        raise TypeError(f"apply_rocoft expects a RoCoFTConfig, got {type(config).__name__}")


def _choose(
    model: nn.Module,
    config: RoCoFTConfig,
    bases: Mapping[str, nn.Module],
    calibration: Optional[Iterable[Any]],
    indices: Optional[Mapping[str, torch.Tensor]],
    forward: Optional[Callable[..., Any]],
) -> dict[str, dict[str, torch.Tensor]]:
    """The index sets of each target (by name; ``bases``: the plain layers): ``indices`` as given, or selected."""
    if indices is not None:
        unknown = set(indices) - set(bases)
        missing = set(bases) - set(indices)
        if unknown or missing:
            raise ValueError(
                f"stored indices do not fit the model's targets: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unknown)[:5]}"
            )
        return {n: _index_sets(indices[n]) for n in bases}
    norms: dict[str, torch.Tensor] = {}
    if config.needs_calibration:
        if calibration is None:
            raise ValueError(f"selection={config.selection!r} scores weights with real inputs: pass calibration batches")
        keep_trainable_layout(model, unpack=False)  # calibration runs in eval mode (rocoft_pl.quantized)
        norms = collect_input_norms(model, bases, calibration, forward)
    return {
        n: select_index_sets(m, n, config.mode, config.rank, config.p, config.selection, config.seed, norms.get(n))
        for n, m in bases.items()
    }


def _build(bases: Mapping[str, nn.Module], make: Callable[[str, nn.Module], Any]) -> dict[str, Any]:
    """``make(name, base)`` for every target; a refusal names the target."""
    built = {}
    for name, base in bases.items():
        try:
            built[name] = make(name, base)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{name}: {err}") from None
    return built


def check_addable(model: nn.Module, adapter_name: str, trains_shared: bool = False) -> None:
    """Raise unless adapter ``adapter_name`` can join the adapters of ``model``: a new name, nothing merged, and no
    bias or head trained by any of them or by the new one (``trains_shared``): one set of those weights would serve,
    and be saved with, every adapter."""
    names = adapter_names(model)
    if adapter_name in names:
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}: add_adapter(model, name, ...) adds another "
            "adapter under a new name; delete_adapter or unload_rocoft(model) removes adapters"
        )
    if is_merged(model):
        raise ValueError(
            f"cannot add adapter {adapter_name!r}: an adapter is merged into the weights; unmerge_rocoft(model) first"
        )
    layers = rocoft_layers(model)
    shared = [f"{n}.base.bias" for n, layer in layers.items() if layer.base.bias is not None and layer.base.bias.requires_grad]
    shared += [n for n, m in model.named_modules() if getattr(m, "_rocoft_head", False)]
    if shared or trains_shared:
        what = f"the model's adapter {names} trains {shared[0]!r}" if shared else f"adapter {adapter_name!r} trains biases or heads"
        raise ValueError(
            f"cannot add adapter {adapter_name!r} to {names}: {what}. Several adapters on one base train only their "
            "deltas: biases and heads are weights of the base that every adapter would share (train_bias=False, "
            "modules_to_save=[])"
        )


def _check_same_layers(
    layers: Mapping[str, RoCoFTLinear], targets: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], name: str
) -> None:
    """An added adapter trains no head and adapts exactly the layers the model's adapters do."""
    if heads:
        raise ValueError(
            f"cannot add adapter {name!r}: its config trains the heads {sorted(heads)} (set modules_to_save=[]); "
            "heads are weights of the base that every adapter would share"
        )
    if set(targets) != set(layers):
        other = sorted(set(targets) ^ set(layers))
        raise ValueError(
            f"cannot add adapter {name!r}: it adapts other layers than the model's adapters ({len(other)} differ, "
            f"e.g. {other[:3]}); several adapters on one base adapt the same layers"
        )


@contextmanager
def disabled(layers: Iterable[RoCoFTLinear]) -> Iterator[None]:
    """Within: ``layers`` compute their base's outputs. Afterwards (also on an exception) each is as it was."""
    layers = list(layers)
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def _index_sets(given: Any) -> dict[str, torch.Tensor]:
    """Explicit indices of one target as RoCoFTLinear's keyword arguments: a tensor is its ``indices``."""
    if isinstance(given, Mapping):
        return {k: torch.as_tensor(v, dtype=torch.long).cpu() for k, v in given.items()}
    return {"indices": torch.as_tensor(given, dtype=torch.long).cpu()}


def record_config(model: nn.Module, config: RoCoFTConfig, adapter_name: Optional[str] = None) -> None:
    """Make ``config`` the one adapter ``adapter_name`` (default: the active one) is saved with."""
    for adapter in named_adapters(model, adapter_name).values():
        adapter.rocoft_config = config


def merge_rocoft(model: nn.Module) -> nn.Module:
    """Fold the active adapter's deltas into W0 in every RoCoFT layer (W0[idx] += D). In place; returns ``model``.

    The layers stay RoCoFT layers, marked ``merged``: their forward is the base's alone, so inference costs
    about what the plain model's does, and ``unmerge_rocoft`` restores W0 bit-exactly (from the r rows / columns
    each layer copied). ``unload_rocoft(model)`` then gives plain layers for ``save_pretrained``. Merging a
    merged model changes nothing.

    A quantized W0 (4 / 8 bits) takes the deltas only where that is exact, else nothing is merged and a
    ValueError says so: ``rocoft_pl.merge_rocoft_dequantized`` gives a plain model instead.
    """
    layers = rocoft_layers(model)
    folded = [n for n, layer in layers.items() if getattr(layer, "reselection", None) is not None]
    if folded:
        # Merging would work, but unmerge would restore the folded W0, not the original one.
        raise ValueError(
            f"merge_rocoft: {len(folded)} layers (e.g. {folded[0]!r}) hold re-selected RoCoFT layers: "
            "call rocoft_pl.reselect.consolidate(model) first"
        )
    if any(layer.disabled for layer in layers.values()):
        raise ValueError("merge_rocoft inside disable_adapter: merge after the with block")
    check_exact_merges(layers)  # a quantized W0 takes W0 + D only where that is exact; else nothing changes
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_rocoft(model: nn.Module) -> nn.Module:
    """Undo ``merge_rocoft``: W0's selected entries restored from the copies taken at merge time (exact), the
    deltas train again. In place; ``model`` may also hold the merged model (a LightningModule)."""
    layers = [layer for layer in rocoft_layers(model).values() if layer.merged]
    if not layers:
        raise ValueError("unmerge_rocoft: this model has no RoCoFT layers merged by merge_rocoft")
    for layer in layers:
        layer.unmerge()
    return model


@torch.no_grad()
def unload_rocoft(model: nn.Module) -> nn.Module:
    """Put the plain base layers back in place of the RoCoFT layers, as they are: merged layers with the deltas
    in their weights (``unload_rocoft(merge_rocoft(model))`` is the merged model, ready for ``save_pretrained``),
    unmerged ones with W0, which drops their adapters. In place; returns ``model``. Nothing of RoCoFT stays on it:
    no way back to W0 after a merge (save the adapter first to keep it), no head marks. A trained bias is rounded
    to its weight's dtype, so each layer runs on its own."""
    for name, layer in rocoft_layers(model).items():
        bias = layer.base.bias
        if bias is not None and bias.dtype != layer.base.weight.dtype:
            bias.data = bias.data.to(layer.base.weight.dtype)
        model.set_submodule(name, layer.base)
    for m in model.modules():
        vars(m).pop("_rocoft_head", None)
    return model


__all__ = [
    "AUTO_HEADS",
    "RoCoFTReport",
    "adapter_names",
    "apply_rocoft",
    "attach_adapter",
    "block_prefixes",
    "disabled",
    "find_heads",
    "find_targets",
    "is_merged",
    "merge_rocoft",
    "layers_holding",
    "named_adapters",
    "record_config",
    "rocoft_layers",
    "rocoft_report",
    "unload_rocoft",
    "unmerge_rocoft",
]
