"""save_adapter / load_adapter: a KB-to-MB adapter in PEFT's layout, written with safetensors and JSON.

    adapter_config.json         config, library version, base-model identity, target shapes, head names
    adapter_model.safetensors   <target>.delta, <target>.indices, trained biases, saved heads

Loading validates everything (architecture, targets, shapes, keys, file integrity) before it changes the
model, so a bad adapter leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RoCoFTConfig
from .inject import RoCoFTReport, apply_rocoft, find_heads, merged_record, rocoft_layers, rocoft_report
from .layers import RoCoFTLinear, features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def find_backbone(model: nn.Module) -> nn.Module:
    """The module whose names the adapter uses: the Hugging Face model inside a LightningModule if there is
    exactly one holding every RoCoFT layer, else ``model`` itself."""
    layers = set(map(id, rocoft_layers(model).values()))
    if _is_hf_model(model):
        return model
    candidates = [
        m
        for m in model.modules()
        if m is not model and _is_hf_model(m) and layers and layers <= set(map(id, rocoft_layers(m).values()))
    ]
    outermost = [c for c in candidates if not any(c is not o and c in list(o.modules()) for o in candidates)]
    return outermost[0] if len(outermost) == 1 else model


def _is_hf_model(module: nn.Module) -> bool:
    return hasattr(module, "config") and hasattr(module, "save_pretrained")


def architecture(model: nn.Module) -> str:
    """The model's class name as the user wrote it: FSDP2's fully_shard swaps in a subclass named
    FSDP<Name> (bases FSDPModule, <Name>), which must not leak into the adapter."""
    for cls in type(model).__mro__:
        if not any(base.__name__ == "FSDPModule" for base in cls.__mro__):
            return cls.__name__
    return type(model).__name__


def hf_model_in(module: nn.Module) -> nn.Module:
    """The outermost Hugging Face model inside ``module`` (e.g. a LightningModule), else ``module``."""
    return next((m for m in module.modules() if _is_hf_model(m)), module)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor; gathers FSDP2 DTensors (a collective: call on every rank)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous().clone()


def _trainable_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(bias names, head parameter names) that train besides the deltas."""
    biases = [f"{n}.base.bias" for n, layer in rocoft_layers(model).items() if layer.base.bias is not None and layer.base.bias.requires_grad]
    heads = [
        f"{hn}.{pn}"
        for hn, head in model.named_modules()
        if getattr(head, "_rocoft_head", False)
        for pn, _ in head.named_parameters()
    ]
    return biases, heads


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deltas, indices, trained biases and head weights, by name relative to the backbone (CPU tensors)."""
    model = find_backbone(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, torch.Tensor] = {}
    for name, layer in rocoft_layers(model).items():
        state[f"{name}.delta"] = _full(layer.delta)
        state[f"{name}.indices"] = _full(layer.indices)
    biases, heads = _trainable_names(model)
    for key in biases + heads:
        state[key] = _full(params[key])
    return state


def adapter_metadata(model: nn.Module, config: RoCoFTConfig) -> dict[str, Any]:
    """What adapter_config.json holds: enough to refuse a wrong base model with a clear message."""
    from . import __version__

    model = find_backbone(model)
    hf_config = getattr(model, "config", None)
    biases, heads = _trainable_names(model)
    return {
        "format_version": FORMAT_VERSION,
        "library": "rocoft_pl",
        "library_version": __version__,
        "config": config.to_dict(),
        "base_model": {
            "name_or_path": getattr(hf_config, "name_or_path", None) or getattr(hf_config, "_name_or_path", None),
            "architecture": architecture(model),
            "model_type": getattr(hf_config, "model_type", None),
        },
        "targets": {
            name: {"shape": [layer.out_features, layer.in_features], "kind": "Conv1D" if layer.transposed else "Linear"}
            for name, layer in rocoft_layers(model).items()
        },
        "trained_biases": biases,
        "saved_modules": sorted({k.rsplit(".", 1)[0] for k in heads}),
        "saved_parameters": heads,
        "report": {k: v for k, v in rocoft_report(model).to_dict().items() if k != "modules"},
    }


def write_adapter(path: Union[str, os.PathLike], state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write both files atomically (temp file + rename), so a crash never leaves a half-written adapter."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, writer in (
        (WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "library": "rocoft_pl"})),
        (CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, path / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def config_of(model: nn.Module) -> RoCoFTConfig:
    """The RoCoFTConfig apply_rocoft recorded on the model."""
    config = getattr(find_backbone(model), "_rocoft_config", None) or getattr(model, "_rocoft_config", None)
    if config is None:
        raise ValueError("model has no RoCoFT adapter (apply_rocoft or load_adapter first)")
    return config


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Save only what RoCoFT trained. ``model`` may be the HF model or a LightningModule holding it."""
    if not rocoft_layers(model):
        if merged_record(model) is not None:
            raise ValueError(
                "model has no RoCoFT layers to save: merge_rocoft folded them into the weights; "
                "unmerge_rocoft(model) first, or save the merged model with save_pretrained"
            )
        raise ValueError("model has no RoCoFT layers to save")
    return write_adapter(path, adapter_state_dict(model), adapter_metadata(model, config_of(model)))


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) with clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"adapter file missing: {f}")
    try:
        metadata = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(metadata, dict) or metadata.get("library") != "rocoft_pl":
        raise ValueError(f"{config_file} is not a rocoft_pl adapter config")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_file}: unsupported adapter format_version {metadata.get('format_version')!r}")
    required = ("config", "base_model", "targets", "trained_biases", "saved_modules", "saved_parameters")
    absent = [k for k in required if k not in metadata]
    if absent:
        raise ValueError(f"{config_file} lacks the fields {absent}")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_file} is corrupt or not a safetensors file: {err}") from None
    return metadata, tensors


def _check_keys(metadata: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {f"{t}.{k}" for t in metadata["targets"] for k in ("delta", "indices")}
    expected |= set(metadata["trained_biases"]) | set(metadata["saved_parameters"])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where / WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> RoCoFTReport:
    """Re-apply RoCoFT with the stored indices and load deltas, biases and heads. In place.

    ``model`` is a fresh base model (or a LightningModule holding it), or one that already carries RoCoFT
    layers on the same targets (its deltas are then overwritten).
    """
    path = Path(path)
    metadata, tensors = read_adapter(path)
    config = RoCoFTConfig.from_dict(metadata["config"])
    _check_keys(metadata, tensors, path)
    backbone = _backbone_for_load(model, metadata)
    arch = metadata["base_model"]["architecture"]
    if arch and architecture(backbone) != arch:
        raise ValueError(f"adapter at {path} was trained on {arch}, not on {architecture(backbone)}")

    modules = dict(backbone.named_modules())
    params = dict(backbone.named_parameters(remove_duplicate=False))
    already = rocoft_layers(backbone)
    if already and set(already) != set(metadata["targets"]):
        raise ValueError(f"model already has RoCoFT layers on other targets than the adapter at {path}")
    for name, info in metadata["targets"].items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"adapter target {name!r} does not exist in {type(backbone).__name__}")
        base = module.base if isinstance(module, RoCoFTLinear) else module
        try:
            shape = list(features(base))
        except AttributeError:
            raise ValueError(f"adapter target {name!r} is a {type(base).__name__}, not nn.Linear/Conv1D") from None
        if shape != info["shape"]:
            raise ValueError(f"adapter target {name!r}: stored shape {info['shape']} != model shape {shape}")
        delta, idx = tensors[f"{name}.delta"], tensors[f"{name}.indices"]
        expected = {"row": (idx.numel(), shape[1]), "column": (shape[0], idx.numel()), "entries": (idx.numel(),)}
        if tuple(delta.shape) != expected[config.mode]:
            raise ValueError(f"adapter target {name!r}: delta shape {tuple(delta.shape)} does not fit {config.mode} mode")
        if isinstance(module, RoCoFTLinear) and module.delta.shape != delta.shape:
            raise ValueError(f"adapter target {name!r}: delta shape {tuple(delta.shape)} != {tuple(module.delta.shape)}")
    for key in metadata["saved_parameters"]:
        if key not in params:
            raise ValueError(f"adapter head parameter {key!r} does not exist in {type(backbone).__name__}")
        if params[key].shape != tensors[key].shape:
            raise ValueError(f"adapter head parameter {key!r}: shape {tuple(tensors[key].shape)} != {tuple(params[key].shape)}")

    if not already:
        heads_config = RoCoFTConfig(**{**config.to_dict(), "modules_to_save": metadata["saved_modules"] or []})
        found = set(find_heads(backbone, heads_config)) if metadata["saved_modules"] else set()
        if found != set(metadata["saved_modules"]):
            raise ValueError(f"adapter heads {metadata['saved_modules']} do not match the model's modules {sorted(found)}")
        targets_config = RoCoFTConfig(**{**heads_config.to_dict(), "targets": _exact_names(metadata["targets"])})
        indices = {n: tensors[f"{n}.indices"] for n in metadata["targets"]}
        apply_rocoft(backbone, targets_config, indices=indices)
        backbone._rocoft_config = config
    layers = rocoft_layers(backbone)
    params = dict(backbone.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.indices.copy_(tensors[f"{name}.indices"].to(layer.indices.device))
            layer._indices_cpu = tensors[f"{name}.indices"].clone()
            layer.delta.copy_(tensors[f"{name}.delta"].to(layer.delta))
        for key in metadata["trained_biases"]:
            params[key].copy_(tensors[key].to(params[key]))
            params[key].requires_grad_(True)
        for key in metadata["saved_parameters"]:
            params[key].copy_(tensors[key].to(params[key]))
    return rocoft_report(backbone)


def _exact_names(names: Any) -> str:
    """A regex that matches exactly these module names."""
    import re

    return "|".join(re.escape(n) for n in names)


def _backbone_for_load(model: nn.Module, metadata: dict[str, Any]) -> nn.Module:
    """The module the adapter's names are relative to: ``model`` or the HF model inside it."""
    names = set(dict(model.named_modules()))
    if set(metadata["targets"]) <= names:
        return model
    for module in model.modules():
        if module is not model and _is_hf_model(module) and set(metadata["targets"]) <= set(dict(module.named_modules())):
            return module
    missing = sorted(set(metadata["targets"]) - names)[:3]
    raise ValueError(f"adapter targets such as {missing} do not exist in {type(model).__name__}")
