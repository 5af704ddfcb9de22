"""export_lora: a RoCoFT row / column adapter written as the LoRA it exactly is, in PEFT's format.

A row adapter changes W by R = S D, where S (out x r) is the one-hot selector of the chosen rows
(S[idx[k], k] = 1) and D (r x in) the row delta: a rank-r LoRA with B = S, A = D. A column adapter changes W
by C = D S^T with D (out x r) and S (in x r) the column selector: B = D, A = S^T. With lora_alpha = r
(scaling 1) PEFT computes W0 x + B (A x), the same function; B A equals the dense delta bit for bit (each
entry is one product with 1 plus zeros). Mode 'both' (r rows + r columns) is a rank <= 2r LoRA:
B = [S_rows | Dc], A = [Dr ; S_cols^T], with Dc's entries on the selected rows read as zero as the layer
reads them (``RoCoFTLinear._column_delta``). Entries mode is a scattered sparse update of full rank: refused.

    OUT_DIR/adapter_config.json          peft_type LORA, r, lora_alpha = r, target_modules (exact names),
                                         fan_in_fan_out (Conv1D), modules_to_save (trained heads), lora_bias
    OUT_DIR/adapter_model.safetensors    base_model.model.<target>.lora_A.weight / lora_B.weight
                                         (/ lora_B.bias), base_model.model.<head>.<param>
    OUT_DIR/rocoft_export.json           what was exported from (marks the directory as an export)

Trained biases (``train_bias``) become PEFT's ``lora_B.bias``, which PEFT adds to the base layer's own bias:
it must hold b - b0, so the export reads b0 (only the biases) from the base model: a model in memory, a
local checkpoint directory, or a hub name (the adapter's recorded base by default). Nothing else of the
base is needed. vLLM does not load ``lora_B.bias`` (``refuse_bias`` refuses such adapters instead).

OUT_DIR must not exist, be empty, or hold an earlier export (which is replaced as a whole, atomically, as
``save_adapter`` replaces an adapter); anything else is refused and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _backbone_for_load,
    _check_keys,
    _check_tensors,
    _nonfinite,
    adapter_metadata,
    adapter_state_dict,
    base_fingerprint,
    config_of,
    read_adapter,
    write_directory,
)
from .config import RoCoFTConfig
from .inject import rocoft_layers
from .layers import PARTS, RoCoFTLinear

EXPORT_RECORD = "rocoft_export.json"
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, EXPORT_RECORD)
PREFIX = "base_model.model."

# vLLM's LoRA loader, as its source documents it (vllm/config/lora.py, vllm/lora/peft_helper.py,
# vllm/lora/lora_model.py, vllm/lora/utils.py); checked against the files, never run here.
# --max-lora-rank choices common to its versions (newer ones also take 1, 320 and 512); its default is 16.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Module names (last segment) vLLM's implementation of an architecture accepts LoRA weights for: its linear
# layers, the fused ones' parts (packed_modules_mapping) and its embedding modules.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
               "down_proj", "embed_tokens", "lm_head")
VLLM_LORA_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
}
# Architectures whose vLLM implementation does not support LoRA at all (no SupportsLoRA).
VLLM_WITHOUT_LORA = ("GPT2LMHeadModel",)


@dataclass
class LoRAExport:
    """What ``export_lora`` wrote: the LoRA rank, its targets, whether it needs ``lora_bias`` support, the
    trained heads it carries, and what vLLM's documented loader rules say about it."""

    path: Path
    mode: str
    rank: int
    r: int
    targets: int
    lora_bias: bool
    modules_to_save: list[str]
    dtype: str
    base_model: Optional[str]
    architecture: Optional[str]
    notes: list[str] = field(default_factory=list)
    vllm_problems: list[str] = field(default_factory=list)

    @property
    def vllm_max_lora_rank(self) -> Optional[int]:
        """The smallest ``--max-lora-rank`` choice that fits r (None: r is above every choice)."""
        return next((c for c in VLLM_MAX_LORA_RANKS if c >= self.r), None)

    def vllm_command(self, name: Optional[str] = None) -> str:
        """The ``vllm serve`` command line that would serve this adapter on its base model."""
        rank = self.vllm_max_lora_rank or VLLM_MAX_LORA_RANKS[-1]
        model = self.base_model or "BASE_MODEL"
        module = f"{name or self.path.name}={self.path}"
        return f"vllm serve {model} --enable-lora --lora-modules {module} --max-lora-rank {rank}"

    def summary(self) -> str:
        """What was written, for a person: rank, targets, lora_bias, heads, the vLLM verdict and command."""
        bias = (
            "yes: the trained biases are lora_B.bias; loading needs PEFT's lora_bias support (vLLM does not load it; "
            "--refuse-bias refuses such adapters)"
        )
        lines = [
            f"wrote a PEFT LoRA adapter to {self.path}: RoCoFT {self.mode} (rank {self.rank}) as LoRA r={self.r}, "
            f"lora_alpha={self.r} (scaling 1), {self.targets} target modules, {self.dtype}",
            "lora_bias: " + (bias if self.lora_bias else "no"),
            "modules_to_save: " + (", ".join(self.modules_to_save) if self.modules_to_save else "none"),
            *[f"note: {n}" for n in self.notes],
        ]
        verdict = "would refuse it:" if self.vllm_problems else "no problem found; to serve:"
        lines.append(f"vLLM (its documented loader rules, checked on the files; not run): {verdict}")
        lines += [f"  - {p}" for p in self.vllm_problems]
        if self.architecture not in VLLM_LORA_MODULES and self.architecture not in VLLM_WITHOUT_LORA:
            lines.append(
                f"  (module names not checked for {self.architecture or 'this base model'}: vLLM serves LoRA only for "
                "the architectures its supported-models list marks as LoRA-capable)"
            )
        lines.append(f"  {self.vllm_command()}")
        return "\n".join(lines)


# -- the factors --------------------------------------------------------------------------------------------


def selector(indices: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The (r x size) matrix whose row k is the one-hot vector of ``indices[k]``."""
    out = torch.zeros(indices.numel(), size, dtype=dtype)
    return out.index_put_((torch.arange(indices.numel()), indices.long()), torch.ones((), dtype=dtype))


def lora_factors(
    mode: str, shape: tuple[int, int], parts: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), A: (r' x in), B: (out x r'), with B @ A equal to the layer's dense delta (out x in).

    ``parts``: a target's stored tensors by their layer names (``indices``, ``delta``; mode 'both' also
    ``column_indices``, ``delta_columns``). Computed in the deltas' dtype, which holds the selectors' 0 and 1
    exactly.
    """
    out_f, in_f = shape
    delta, idx = parts["delta"], parts["indices"]
    if mode == "row":
        return delta, selector(idx, out_f, delta.dtype).t().contiguous()
    if mode == "column":
        return selector(idx, in_f, delta.dtype), delta
    if mode == "both":
        columns = parts["delta_columns"].index_fill(0, idx, 0)  # the overlap belongs to the row delta
        a = torch.cat([delta, selector(parts["column_indices"], in_f, delta.dtype)])
        b = torch.cat([selector(idx, out_f, delta.dtype).t(), columns], dim=1)
        return a, b.contiguous()
    check_low_rank(mode)
    raise AssertionError(mode)


def check_low_rank(mode: str) -> None:
    """Refuse the modes with no exact LoRA form, saying why."""
    if mode not in ("row", "column", "both"):
        raise ValueError(
            f"mode {mode!r} is not low-rank: an entries adapter updates scattered single weights (a sparse update "
            "of any rank up to min(out, in)), so it has no exact LoRA form and nothing was written. Merge it instead "
            "(load_adapter + merge_rocoft + save_pretrained)"
        )


def lora_rank(config: RoCoFTConfig) -> int:
    """The LoRA r of a mode's factors: rank, or 2 * rank for mode 'both'."""
    return 2 * config.rank if config.mode == "both" else config.rank


# -- the source adapter -------------------------------------------------------------------------------------


def _source(source: Union[str, os.PathLike, nn.Module]) -> tuple[dict[str, Any], dict[str, torch.Tensor], Optional[Path]]:
    """(metadata, tensors, directory or None) of a saved adapter or of a RoCoFT model in memory, checked as
    ``load_adapter`` checks them."""
    if isinstance(source, nn.Module):
        if not rocoft_layers(source):
            raise ValueError("export_lora: the model has no RoCoFT layers (unload_rocoft removed them, or none were applied)")
        return adapter_metadata(source, config_of(source)), adapter_state_dict(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"export_lora: source must be an adapter directory or a model, got {type(source).__name__}")
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass the directory save_adapter wrote")
    if (path / EXPORT_RECORD).is_file():
        raise ValueError(f"{path} is already a LoRA export, not a RoCoFT adapter")
    metadata, tensors = read_adapter(path)
    config = RoCoFTConfig.from_dict(metadata["config"])
    _check_keys(metadata, tensors, config, path)
    _check_tensors(metadata, tensors, config)
    return metadata, tensors, path


# -- the base biases ----------------------------------------------------------------------------------------


def _bias_targets(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Target name -> its trained-bias key (``<target>.base.bias``)."""
    return {key[: -len(".base.bias")]: key for key in metadata["trained_biases"]}


def original_biases(base: Union[str, os.PathLike, nn.Module], metadata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """b0 of every target whose bias was trained, by target name: from the base model in memory, or read from
    its checkpoint files (only these tensors)."""
    targets = list(_bias_targets(metadata))
    if isinstance(base, nn.Module):
        return _module_biases(base, metadata, targets)
    return _checkpoint_biases(str(base), targets)


def _module_biases(model: nn.Module, metadata: Mapping[str, Any], targets: list[str]) -> dict[str, torch.Tensor]:
    """b0 from a base model in memory; refused for an adapted or merged model (its biases may be trained)."""
    if rocoft_layers(model):
        raise ValueError(
            "export_lora: base_model must be the plain base model, not one with RoCoFT layers (its biases were trained)"
        )
    backbone = _backbone_for_load(model, dict(metadata))
    stored = metadata["base_model"].get("fingerprint")
    here = base_fingerprint(backbone, metadata["saved_modules"])["sha256"]
    if stored is not None and here != stored.get("sha256"):
        raise ValueError(
            "export_lora: base_model differs from the model the adapter was trained on (structural fingerprint)"
        )
    modules = dict(backbone.named_modules())
    found = {}
    for name in targets:
        bias = getattr(modules[name], "bias", None)
        if isinstance(modules[name], RoCoFTLinear) or bias is None:
            raise ValueError(f"export_lora: base_model's {name!r} has no plain bias to read b0 from")
        found[name] = bias.detach().to("cpu").clone()
    return found


def _checkpoint_files(name: str) -> list[Path]:
    """The weight files of a checkpoint: a local directory, ``pkg:<module>``, or a hub name (cache first)."""
    if name.startswith("pkg:"):
        from .modules.classification import resolve_pretrained

        name = resolve_pretrained(name)
    directory = Path(name)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as err:  # offline miss, unknown repo, bad name: all say the same to the user
            raise FileNotFoundError(f"cannot find the base model {name!r} ({type(err).__name__}: {err})") from None
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    files = files or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    return files


def _checkpoint_biases(name: str, targets: list[str]) -> dict[str, torch.Tensor]:
    """b0 read from checkpoint files; a key may carry or lack the base-model prefix (``bert.``, ``model.``)."""
    from safetensors import safe_open

    available: dict[str, Path] = {}
    for f in _checkpoint_files(name):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                available.update({k: f for k in handle.keys()})
        else:
            available.update({k: f for k in torch.load(f, map_location="meta", weights_only=True)})
    found = {}
    for target in targets:
        key = _match_key(f"{target}.bias", available)
        if key is None:
            raise ValueError(
                f"export_lora: no bias for {target!r} in the checkpoint of {name!r}: pass the base model in memory "
                "(export_lora(..., base_model=model)) or its directory (--base-model DIR)"
            )
        found[target] = _read_tensor(available[key], key)
    return found


def _match_key(name: str, available: Mapping[str, Path]) -> Optional[str]:
    """``name``, else the one checkpoint key that equals it up to a leading prefix on either side."""
    if name in available:
        return name
    hits = [k for k in available if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[key].clone()


# -- the LoRA files -----------------------------------------------------------------------------------------


def _lora_tensors(
    metadata: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    config: RoCoFTConfig,
    b0: Mapping[str, torch.Tensor],
    dtype: Optional[torch.dtype],
) -> dict[str, torch.Tensor]:
    """PEFT's keys (no adapter name in saved files): A and B of every target, lora_B.bias = b - b0 where a
    bias trained (zeros on targets without one, as lora_bias is one switch for all), the heads' parameters."""
    trained = _bias_targets(metadata)
    state: dict[str, torch.Tensor] = {}
    for name, info in metadata["targets"].items():
        parts = {k: tensors[f"{name}.{k}"] for p in PARTS[config.mode] for k in (p.indices, p.delta)}
        a, b = lora_factors(config.mode, tuple(info["shape"]), parts)
        work = dtype or a.dtype
        state[f"{PREFIX}{name}.lora_A.weight"] = a.to(work).contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.to(work).contiguous()
        if trained:
            state[f"{PREFIX}{name}.lora_B.bias"] = _bias_delta(name, trained, tensors, b0, info["shape"][0], work)
    for key in metadata["saved_parameters"]:
        value = tensors[key]
        state[f"{PREFIX}{key}"] = (value.to(dtype) if dtype is not None else value).contiguous()
    return state


def _bias_delta(
    name: str, trained: Mapping[str, str], tensors: Mapping[str, torch.Tensor], b0: Mapping[str, torch.Tensor],
    out_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    """b - b0, computed in at least float32 (b is the float32 master, b0 the checkpoint's dtype)."""
    if name not in trained:
        return torch.zeros(out_features, dtype=dtype)
    b, base = tensors[trained[name]], b0[name]
    if tuple(base.shape) != tuple(b.shape):
        raise ValueError(
            f"export_lora: the base model's bias of {name!r} has shape {tuple(base.shape)}, the adapter's {tuple(b.shape)}"
        )
    work = torch.promote_types(torch.promote_types(b.dtype, base.dtype), torch.float32)
    return (b.to(work) - base.to(work)).to(dtype)


def _architecture_fields(metadata: Mapping[str, Any]) -> tuple[Optional[str], Optional[str]]:
    base = metadata.get("base_model") or {}
    return base.get("name_or_path"), base.get("architecture")


def lora_config(
    metadata: Mapping[str, Any], config: RoCoFTConfig, lora_bias: bool, base_model: Optional[str]
) -> dict[str, Any]:
    """adapter_config.json: the fields PEFT's LoraConfig needs here, the rest left to its defaults."""
    r = lora_rank(config)
    conv1d = any(info.get("kind") == "Conv1D" for info in metadata["targets"].values())
    _, arch = _architecture_fields(metadata)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if arch and arch.endswith(("ForCausalLM", "LMHeadModel")) else None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": conv1d,
        "target_modules": sorted(metadata["targets"]),
        "modules_to_save": list(metadata["saved_modules"]) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


# -- the output directory -----------------------------------------------------------------------------------


def check_out_dir(out_dir: Union[str, os.PathLike], source_dir: Optional[Path] = None) -> Path:
    """Raise unless ``out_dir`` may receive an export: absent, empty, or an earlier export (whole-directory
    replacement must never drop other files, least of all the source adapter's)."""
    path = Path(os.path.realpath(out_dir))
    if source_dir is not None and Path(os.path.realpath(source_dir)) in (path, *path.parents):
        raise ValueError(
            f"OUT_DIR {path} is the RoCoFT adapter directory or inside it (which holds only the adapter's files): "
            "export into another directory"
        )
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise ValueError(f"cannot export to {path}: it exists and is not a directory")
    entries = sorted(e.name for e in path.iterdir())
    if not entries:
        return path
    if EXPORT_RECORD in entries and set(entries) <= set(EXPORT_FILES):
        return path
    what = "a RoCoFT adapter" if _is_rocoft_adapter(path) else f"files that are not an earlier export: {entries[:5]}"
    raise ValueError(
        f"cannot export to {path}: it holds {what}. The export replaces its directory as a whole, so it goes into "
        "a new or empty directory, or over an earlier export"
    )


def _is_rocoft_adapter(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("library") == "rocoft_pl"
    except (OSError, ValueError, AttributeError):
        return False


def _write_export(out_dir: Union[str, os.PathLike], files: Mapping[str, bytes], source_dir: Optional[Path]) -> Path:
    """Write the files into a sibling temp directory and swap it in as a whole (as write_adapter does)."""
    return write_directory(out_dir, files, lambda path: check_out_dir(path, source_dir))


def _json(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# -- the entry point ----------------------------------------------------------------------------------------


def export_lora(
    source: Union[str, os.PathLike, nn.Module],
    out_dir: Union[str, os.PathLike],
    *,
    base_model: Union[None, str, os.PathLike, nn.Module] = None,
    refuse_bias: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> LoRAExport:
    """Write the exact PEFT LoRA form of a RoCoFT adapter (a directory save_adapter wrote, or a RoCoFT model
    in memory) to ``out_dir``. Every check runs before anything is written.

    ``base_model``: where the base's original biases come from when biases were trained (a model in memory, a
    checkpoint directory or hub name; default: the base the adapter records), and, as a name, what
    ``base_model_name_or_path`` says. ``refuse_bias``: refuse an adapter with trained biases (their
    ``lora_B.bias`` needs lora_bias support, which vLLM lacks). ``dtype``: of the written tensors (default:
    the deltas' dtype for A, B and lora_B.bias, the heads' own dtype for the heads).
    """
    metadata, tensors, source_dir = _source(source)
    config = RoCoFTConfig.from_dict(metadata["config"])
    check_low_rank(config.mode)
    bad = _nonfinite(tensors)
    if bad:
        raise ValueError(f"export_lora: the adapter holds NaN / inf values in {len(bad)} tensors (e.g. {bad[0]!r})")
    trained = bool(metadata["trained_biases"])
    if trained and refuse_bias:
        raise ValueError(
            f"the adapter trained the biases of {len(metadata['trained_biases'])} layers (train_bias): they export "
            "as PEFT's lora_B.bias, which vLLM does not load, and refuse_bias (--refuse-bias) is set"
        )
    check_out_dir(out_dir, source_dir)
    recorded, arch = _architecture_fields(metadata)
    name = str(base_model) if isinstance(base_model, (str, os.PathLike)) else recorded
    b0 = {}
    if trained:
        where = base_model if base_model is not None else recorded
        if not where:
            raise ValueError(
                "the adapter trained biases (train_bias), and their LoRA form lora_B.bias = b - b0 needs the base "
                "model's original biases b0; the adapter records no base model name: pass base_model (--base-model)"
            )
        b0 = original_biases(where, metadata)
    state = _lora_tensors(metadata, tensors, config, b0, dtype)
    result = LoRAExport(
        path=Path(out_dir), mode=config.mode, rank=config.rank, r=lora_rank(config), targets=len(metadata["targets"]),
        lora_bias=trained, modules_to_save=list(metadata["saved_modules"]),
        dtype=str(state[next(iter(state))].dtype).removeprefix("torch."), base_model=name, architecture=arch,
    )
    result.notes = _notes(metadata, trained)
    files = {
        WEIGHTS_NAME: save_safetensors(state, metadata={"format": "pt"}),
        CONFIG_NAME: _json(lora_config(metadata, config, trained, name)),
        EXPORT_RECORD: _json(_record(metadata, config, result, source_dir)),
    }
    _write_export(out_dir, files, source_dir)
    result.vllm_problems = vllm_problems(out_dir, architecture=arch)
    return result


def _notes(metadata: Mapping[str, Any], trained: bool) -> list[str]:
    """What a user should know beyond the summary: targets that get a zero lora_B.bias for lack of a bias."""
    if not trained:
        return []
    without = sorted(set(metadata["targets"]) - set(_bias_targets(metadata)))
    if not without:
        return []
    return [
        f"{len(without)} targets have no bias (e.g. {without[0]!r}) and get a zero lora_B.bias (lora_bias is one switch "
        "for all targets): PEFT computes them exactly but its merge_and_unload refuses such layers"
    ]


def _record(
    metadata: Mapping[str, Any], config: RoCoFTConfig, result: LoRAExport, source_dir: Optional[Path]
) -> dict[str, Any]:
    """rocoft_export.json: where the export came from; it also marks the directory as an export."""
    from . import __version__

    return {
        "library": "rocoft_pl",
        "library_version": __version__,
        "kind": "lora_export",
        "source": str(source_dir) if source_dir is not None else None,
        "source_weights_sha256": metadata.get("weights_sha256"),
        "config": config.to_dict(),
        "base_model": dict(metadata["base_model"]),
        "lora": {"r": result.r, "lora_alpha": result.r, "lora_bias": result.lora_bias, "targets": result.targets,
                 "modules_to_save": result.modules_to_save, "dtype": result.dtype},
    }


# -- vLLM's loader rules ------------------------------------------------------------------------------------


def vllm_problems(
    path: Union[str, os.PathLike], *, architecture: Optional[str] = None, max_lora_rank: Optional[int] = None
) -> list[str]:
    """Why vLLM's LoRA loader would refuse the PEFT LoRA directory ``path``, by the rules its source states
    (an empty list: none of them applies; this runs no vLLM). ``max_lora_rank``: the ``--max-lora-rank`` to
    serve with (default: the smallest choice that fits). ``architecture``: the base model's class (default:
    from rocoft_export.json); known ones are checked against the module names vLLM accepts for them."""
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / CONFIG_NAME).read_text())
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as handle:
        keys = list(handle.keys())
    if architecture is None and (path / EXPORT_RECORD).is_file():
        architecture = json.loads((path / EXPORT_RECORD).read_text()).get("base_model", {}).get("architecture")
    problems = [f"adapter_config.json lacks {k!r}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    problems += _vllm_config_problems(config, max_lora_rank)
    problems += _vllm_key_problems(keys, architecture)
    return problems


def _vllm_config_problems(config: Mapping[str, Any], max_lora_rank: Optional[int]) -> list[str]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save {config['modules_to_save']} (trained heads): vLLM only supports modules_to_save being None"
        )
    if config.get("use_dora"):
        problems.append("DoRA is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: adapter bias is not supported")
    r = config.get("r", 0)
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of vLLM's choices {VLLM_MAX_LORA_RANKS}")
    limit = max_lora_rank if max_lora_rank is not None else VLLM_MAX_LORA_RANKS[-1]
    if isinstance(r, int) and r > limit:
        problems.append(f"LoRA rank {r} is greater than max_lora_rank {limit}")
    return problems


def _vllm_key_problems(keys: list[str], architecture: Optional[str]) -> list[str]:
    """Every key must be ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (lora_B.bias is an
    unsupported LoRA weight), and each module's last name a LoRA module of the architecture."""
    problems = []
    bias = [k for k in keys if k.endswith(".lora_B.bias")]
    if bias:
        problems.append(f"{len(bias)} lora_B.bias tensors (trained biases, lora_bias): vLLM does not load LoRA biases")
    other = [k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias"))]
    if other:
        problems.append(f"{len(other)} tensors that are not LoRA factors (e.g. {other[0]!r}): unsupported LoRA weights")
    if architecture in VLLM_WITHOUT_LORA:
        problems.append(f"vLLM's {architecture} does not support LoRA")
    accepted = VLLM_LORA_MODULES.get(architecture or "")
    if accepted is not None:
        modules = {k[len(PREFIX):].rsplit(".", 2)[0] for k in keys if k.startswith(PREFIX) and ".lora_" in k}
        unexpected = sorted(m for m in modules if m.rsplit(".", 1)[-1] not in accepted)
        if unexpected:
            problems.append(
                f"modules vLLM's {architecture} has no LoRA for: {unexpected[:3]} (it takes {list(accepted)})"
            )
    return problems


# -- `rocoft export-lora` -----------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str]) -> None:
    """``rocoft export-lora ADAPTER_DIR OUT_DIR [--refuse-bias] [--base-model NAME] [--dtype D]``; errors
    propagate to ``rocoft_pl.cli.main``, which reports them in one line."""
    parser = argparse.ArgumentParser(
        prog="rocoft export-lora",
        description="Write a RoCoFT row/column adapter as the exact PEFT LoRA it is (vLLM can serve it when no heads "
        "or biases were trained and vLLM supports LoRA for the base architecture).",
    )
    parser.add_argument("adapter_dir", help="a RoCoFT adapter directory (save_adapter / the callback's adapter_dir)")
    parser.add_argument("out_dir", help="a new or empty directory, or an earlier export (replaced)")
    parser.add_argument(
        "--refuse-bias", action="store_true", help="refuse an adapter with trained biases (vLLM cannot load lora_bias)"
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME",
        help="base model directory or hub name: base_model_name_or_path, and where trained biases' original values "
        "are read (default: the base the adapter records)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written tensors (default: the deltas')")
    args = parser.parse_args(argv)
    result = export_lora(args.adapter_dir, args.out_dir, base_model=args.base_model, refuse_bias=args.refuse_bias,
                         dtype=DTYPES[args.dtype] if args.dtype else None)
    print(result.summary())
