"""save_adapter / load_adapter: a KB-to-MB adapter in PEFT's layout, written with safetensors and JSON.

    adapter_config.json         config, library version, base-model identity and structural fingerprint,
                                target shapes, head names, sha256 of the weights file
    adapter_model.safetensors   <target>.delta, <target>.indices (mode 'both' also <target>.delta_columns,
                                <target>.column_indices), trained biases, saved heads

Saving refuses NaN / inf values (``allow_nonfinite=True`` to keep a broken run for inspection) and weights
that are not materialised (meta device). Both files are written into a hidden sibling directory
(``.<name>.rocoft-tmp-<pid>-<random>``), fsynced, and the directory is swapped into place as a whole
(Linux: renameat2 RENAME_EXCHANGE; elsewhere two renames, an interruption between which the next save or
load repairs), so a crash leaves either the complete old or the complete new adapter. The next save into
the same parent removes what a killed writer left behind. A directory holding other files is not replaced.

Loading checks everything before it changes the model, so a bad adapter leaves the model untouched: the
weights file's checksum; indices (int64, in range, unique, ``rank`` many; each set in mode 'both'); finite values
(``allow_nonfinite=True`` to load anyway); the architecture; that the adapter holds exactly the targets its
config selects in this model and the base's structural fingerprint matches (``allow_partial=True`` loads
only the targets that fit, and the report lists the rest); that the model is not merged. Onto the meta
device, deltas are kept and written when the model is materialised (``to_empty`` then ``reset_parameters``
of the RoCoFT layers); trained biases and heads cannot be, and are refused there. Format 1 adapters (no
checksum, no fingerprint) still load, with the other checks.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .config import RoCoFTConfig
from .inject import (
    RoCoFTReport,
    adapter_names,
    apply_rocoft,
    attach_adapter,
    check_addable,
    find_heads,
    find_targets,
    is_merged,
    named_adapters,
    rocoft_layers,
    rocoft_report,
)
from .layers import DEFAULT_ADAPTER, PARTS, Part, RoCoFTDelta, RoCoFTLinear, check_adapter_name, features, is_supported_base
from .quantized import base_quantization, logical_shapes
from .reselect import NOT_CONSOLIDATED, is_folded

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2  # 2: weights_sha256, base_model.fingerprint, config_prefix
READABLE_FORMATS = (1, 2)
# hf config fields quoted when two base models' fingerprints differ
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


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


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _some(names: list[str], n: int = 3) -> str:
    return str(names[:n])[:-1] + (f", ... (+{len(names) - n})]" if len(names) > n else "]")


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


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s deltas and indices (default: the active adapter's), trained biases and head
    weights, by name relative to the backbone (CPU tensors)."""
    model = find_backbone(model)
    if is_folded(model):  # its delta covers only the current rows: saving it would drop every folded one
        raise ValueError(f"cannot save the adapter: {NOT_CONSOLIDATED}")
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = rocoft_layers(model)
    adapters = named_adapters(model, adapter_name)
    biases, heads = _trainable_names(model)
    # Checked on every rank before any collective, so all ranks raise alike.
    on_meta = [f"{n}.{k}" for n, adapter in adapters.items() for k, d in adapter.deltas.items() if d.is_meta]
    on_meta += [k for k in biases + heads if params[k].is_meta]
    if on_meta:
        raise ValueError(
            f"cannot save the adapter: {len(on_meta)} of its tensors (e.g. {on_meta[0]!r}) are on the meta "
            "device, so their values are not materialised. Materialise the model first (model.to_empty(device=...), "
            "load the base weights, reset_parameters() on the RoCoFT layers), or save on the ranks / devices "
            "that hold the weights"
        )
    state: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        for key, delta in adapter.deltas.items():
            state[f"{name}.{key}"] = _full(delta)
        for key, idx in adapter.index_sets.items():
            state[f"{name}.{key}"] = _full(idx)
    for key in biases:  # a merged layer's trained bias: its master copy, not the rounded one in the base
        state[key] = _full(layers[key[: -len(".base.bias")]].trained_bias())
    for key in heads:
        state[key] = _full(params[key])
    return state


def base_fingerprint(model: nn.Module, saved_modules: Iterable[str] = ()) -> dict[str, Any]:
    """What identifies the base model's structure: sha256 over its parameters' sorted (name, shape), the
    RoCoFT deltas and the saved heads left out and RoCoFTLinear's ``.base`` segment removed (so an adapted
    model and a fresh one agree), plus a few config sizes for a readable message when they differ."""
    saved_modules = list(saved_modules)
    layers = rocoft_layers(model)
    deltas = {id(d) for layer in layers.values() for adapter in layer.adapters.values() for d in adapter.deltas.values()}
    shapes = logical_shapes(model)  # 4-bit weights are stored packed: the same fingerprint on either base
    entries = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in deltas or _inside(name, saved_modules):
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base") and owner[: -len(".base")] in layers:
            name = f"{owner[: -len('.base')]}.{leaf}"
        entries.append(f"{name}:{list(shapes.get(id(p), p.shape))}")
    entries.sort()
    hf_config = getattr(model, "config", None)
    sizes = {k: getattr(hf_config, k, None) for k in SIZE_FIELDS}
    return {
        "sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest(),
        "parameters": len(entries),
        "sizes": {k: v for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)},
    }


def _config_prefix(adapters: Mapping[str, RoCoFTDelta]) -> str:
    """The backbone's name (with a dot) inside the module apply_rocoft was called on: the stored config's
    regex targets match names relative to that module. Each adapter keeps its layer's name as apply_rocoft saw
    it (``target``); ``adapters`` are named relative to the backbone."""
    for name, adapter in adapters.items():
        target = adapter.target
        if target is not None and target.endswith("." + name):
            return target[: -len(name)]
    return ""


def adapter_metadata(model: nn.Module, config: RoCoFTConfig, adapter_name: Optional[str] = None) -> dict[str, Any]:
    """What adapter_config.json holds for adapter ``adapter_name`` (default: the active one): enough to refuse a
    wrong base model with a clear message. write_adapter adds the weights' checksum."""
    from . import __version__

    backbone = find_backbone(model)
    adapters = named_adapters(backbone, adapter_name)
    hf_config = getattr(backbone, "config", None)
    biases, heads = _trainable_names(backbone)
    saved_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    return {
        "format_version": FORMAT_VERSION,
        "library": "rocoft_pl",
        "library_version": __version__,
        "config": config.to_dict(),
        "config_prefix": _config_prefix(adapters),
        "base_model": {
            "name_or_path": getattr(hf_config, "name_or_path", None) or getattr(hf_config, "_name_or_path", None),
            "architecture": architecture(backbone),
            "model_type": getattr(hf_config, "model_type", None),
            "fingerprint": base_fingerprint(backbone, saved_modules),
            # what W0 was when trained (None: full precision); the adapter loads onto either kind of base
            "quantization": base_quantization(rocoft_layers(backbone)),
        },
        "targets": {
            name: {"shape": [layer.out_features, layer.in_features], "kind": "Conv1D" if layer.transposed else "Linear"}
            for name, layer in rocoft_layers(backbone).items()
        },
        "trained_biases": biases,
        "saved_modules": saved_modules,
        "saved_parameters": heads,
        "report": {k: v for k, v in rocoft_report(backbone, adapter_name).to_dict().items() if k != "modules"},
    }


# -- writing the directory atomically ---------------------------------------------------------------------

_SIBLING = re.compile(r"^\.(?P<name>.+)\.rocoft-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_OLD_WRITER_TEMP = re.compile(r"^\.(adapter_config\.json|adapter_model\.safetensors)\..+$")  # format 1's temp files


def _nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def check_finite(state: Mapping[str, torch.Tensor], allow_nonfinite: bool = False) -> None:
    """Refuse NaN / inf in an adapter's tensors (a diverged run) unless ``allow_nonfinite``. Cheap and
    deterministic, so every rank of a distributed run can check the gathered state and fail together."""
    bad = _nonfinite(state)
    if bad and not allow_nonfinite:
        raise ValueError(
            f"refusing to save an adapter with NaN / inf values in {len(bad)} tensors (e.g. {bad[0]!r}): training "
            "diverged. Pass allow_nonfinite=True to save it anyway for inspection"
        )


def write_adapter(
    path: Union[str, os.PathLike],
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write both files into a sibling temp directory and swap it in as a whole: readers see the complete old
    adapter or the complete new one, never a mix, whenever the writer dies."""
    check_finite(state, allow_nonfinite)
    # One header key: safetensors writes several in random order, and the same adapter should give the same
    # bytes (and checksum). adapter_config.json names the library.
    data = save_safetensors(state, metadata={"format": "pt"})
    metadata = {**metadata, "format_version": FORMAT_VERSION, "weights_sha256": hashlib.sha256(data).hexdigest()}
    config = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()

    given = Path(path)
    write_directory(given, {WEIGHTS_NAME: data, CONFIG_NAME: config}, check_replaceable)
    return given


def write_directory(path: Union[str, os.PathLike], files: Mapping[str, bytes], check: Callable[[Path], None]) -> Path:
    """Write ``files`` (name -> bytes) into a sibling temp directory and swap it in place of ``path`` as a whole
    (a symlinked directory: what it points to), after ``check(path)`` allowed replacing what is there. Returns the
    resolved path."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    _remove_stale(path)
    check(path)
    tmp = _sibling(path, "tmp")
    try:
        os.mkdir(tmp, 0o777)  # 0755 under the usual umask, as any directory the user makes
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path


def _sibling(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that says what it is and which process made it."""
    return path.parent / f".{path.name}.rocoft-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _siblings(path: Path) -> list[tuple[Path, str, int]]:
    """(entry, 'tmp' or 'old', writer pid) for every sibling a writer of ``path`` made."""
    if not path.parent.is_dir():
        return []
    found = []
    for entry in path.parent.iterdir():
        m = _SIBLING.match(entry.name)
        if m and m["name"] == path.name:
            found.append((entry, m["kind"], int(m["pid"])))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _recover(path: Path) -> None:
    """Repair what a writer killed between the fallback's two renames left: ``path`` gone and the previous
    adapter parked beside it. Put that one back (it is the one known to be complete)."""
    if os.path.lexists(path):
        return
    parked = [e for e, kind, pid in _siblings(path) if kind == "old" and not _pid_alive(pid)]
    if not parked:
        return
    latest = max(parked, key=lambda e: e.stat().st_mtime)
    try:
        _rename(latest, path)
    except OSError as err:
        raise FileNotFoundError(
            f"{path} is missing: a save was interrupted and the previous adapter is at {latest}, which could not "
            f"be moved back ({err.strerror or err}); rename it to {path.name}"
        ) from None


def _remove_stale(path: Path) -> None:
    """Remove the temp and parked directories that killed writers of ``path`` left (live writers' are kept)."""
    for entry, _, pid in _siblings(path):
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def check_replaceable(path: Union[str, os.PathLike]) -> None:
    """Raise unless saving an adapter to ``path`` is allowed: saving replaces the whole directory, so it must
    not exist, or hold only an adapter's files (never drop the user's). write_adapter checks this; callers
    that write later (a callback at the end of training) can check early."""
    path = Path(os.path.realpath(path))
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ValueError(f"cannot save an adapter to {path}: it exists and is not a directory")
    others = sorted(
        e.name for e in path.iterdir() if e.name not in (CONFIG_NAME, WEIGHTS_NAME) and not _OLD_WRITER_TEMP.match(e.name)
    )
    if others:
        raise ValueError(
            f"cannot save an adapter to {path}: saving replaces the directory as a whole, and it holds files that "
            f"are not an adapter's: {_some(others, 5)}. Move them, or save the adapter to another directory"
        )


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0644 under the usual umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (new names, renames) durable. Not possible on Windows: skipped."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)


def _swap_in(new: Path, path: Path) -> None:
    """Put the directory ``new`` at ``path`` in one step where the OS allows it; remove what was there."""
    if not os.path.lexists(path):
        _rename(new, path)
        return
    if _exchange(new, path):  # ``new`` now holds the previous adapter
        _remove_tree(new)
        return
    # No atomic exchange: park the old directory, move the new one in; _recover repairs a kill in between.
    old = _sibling(path, "old")
    _rename(path, old)
    try:
        _rename(new, path)
    except BaseException:
        _rename(old, path)
        raise
    _remove_tree(old)


@functools.lru_cache(maxsize=1)
def _renameat2() -> Optional[Any]:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


# -- saving and loading -----------------------------------------------------------------------------------


def config_of(model: nn.Module, adapter_name: Optional[str] = None) -> RoCoFTConfig:
    """The RoCoFTConfig adapter ``adapter_name`` (default: the active one) was made with (apply_rocoft,
    load_adapter or the callback recorded it in the layers)."""
    if not rocoft_layers(model):
        raise ValueError("model has no RoCoFT adapter (apply_rocoft or load_adapter first)")
    config = next(iter(named_adapters(model, adapter_name).values())).rocoft_config
    if config is None:
        raise ValueError("the model's RoCoFT layers were built by hand and record no RoCoFTConfig (use apply_rocoft)")
    return config


def save_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    adapter_name: Optional[str] = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Save only what RoCoFT trained: adapter ``adapter_name`` (default: the active one). ``model`` may be the HF
    model or a LightningModule holding it; merged or not (the deltas are kept either way).
    ``allow_nonfinite``: save NaN / inf values anyway (to inspect a diverged run)."""
    if not rocoft_layers(model):
        raise ValueError("model has no RoCoFT layers to save")
    state = adapter_state_dict(model, adapter_name)
    metadata = adapter_metadata(model, config_of(model, adapter_name), adapter_name)
    return write_adapter(path, state, metadata, allow_nonfinite=allow_nonfinite)


def read_adapter(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) with clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    _recover(Path(os.path.realpath(path)))
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
    version = metadata.get("format_version")
    if version not in READABLE_FORMATS:
        raise ValueError(
            f"{config_file}: unsupported adapter format_version {version!r} (this rocoft_pl reads {READABLE_FORMATS}); "
            "a newer rocoft_pl wrote it?"
        )
    required = ("config", "base_model", "targets", "trained_biases", "saved_modules", "saved_parameters")
    required += ("weights_sha256",) if version >= 2 else ()
    absent = [k for k in required if k not in metadata]
    if absent:
        raise ValueError(f"{config_file} lacks the fields {absent}")
    data = weights_file.read_bytes()
    if version >= 2:
        actual = hashlib.sha256(data).hexdigest()
        if actual != metadata["weights_sha256"]:
            raise ValueError(
                f"{weights_file} is corrupt or was changed after saving: its sha256 {actual[:16]}... does not match "
                f"{str(metadata['weights_sha256'])[:16]}... in {CONFIG_NAME} (or the two files come from different "
                "saves). Save the adapter again"
            )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_file} is corrupt or not a safetensors file: {err}") from None
    return metadata, tensors


def _check_keys(metadata: dict[str, Any], tensors: dict[str, torch.Tensor], config: RoCoFTConfig, where: Path) -> None:
    parts = PARTS[config.mode]
    expected = {f"{t}.{k}" for t in metadata["targets"] for p in parts for k in (p.delta, p.indices)}
    expected |= set(metadata["trained_biases"]) | set(metadata["saved_parameters"])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{where / WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _check_tensors(metadata: dict[str, Any], tensors: dict[str, torch.Tensor], config: RoCoFTConfig) -> None:
    """Indices and deltas agree with each other and with the stored config, independently of any model."""
    for name, info in metadata["targets"].items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"adapter target {name!r}: stored shape {shape!r} is not [out_features, in_features]")
        for part in PARTS[config.mode]:
            _check_part(name, part, tensors, config, shape)
    for key in list(metadata["trained_biases"]) + list(metadata["saved_parameters"]):
        if not tensors[key].is_floating_point():
            raise ValueError(f"adapter tensor {key!r} is {tensors[key].dtype}, not floating point")


def _check_part(name: str, part: Part, tensors: dict[str, torch.Tensor], config: RoCoFTConfig, shape: list[int]) -> None:
    """One index set of one target (mode 'both' has two): int64, in range for its axis, unique, ``rank`` many
    (not for entries), and a floating-point delta of the shape they imply."""
    out_f, in_f = shape
    index_key, delta_key, axis = part.indices, part.delta, part.axis
    idx, delta = tensors[f"{name}.{index_key}"], tensors[f"{name}.{delta_key}"]
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(
            f"adapter target {name!r}: {index_key} must be a 1-D int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}"
        )
    n = idx.numel()
    limit = part.limit(out_f, in_f)
    if n == 0 or int(idx.min()) < 0 or int(idx.max()) >= limit:
        raise ValueError(f"adapter target {name!r}: {axis} indices empty or outside [0, {limit}) for a {out_f}x{in_f} weight")
    if idx.unique().numel() != n:
        raise ValueError(f"adapter target {name!r}: {axis} indices are not unique")
    if axis != "entries" and n != config.rank:
        raise ValueError(
            f"adapter target {name!r}: {n} {axis} indices, but the stored config says rank {config.rank}: "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} disagree"
        )
    expected = part.shape(n, out_f, in_f)
    if tuple(delta.shape) != expected or not delta.is_floating_point():
        raise ValueError(
            f"adapter target {name!r}: {delta_key} shape {tuple(delta.shape)} ({delta.dtype}) does not fit {config.mode} "
            f"mode with {n} {axis} indices on a {out_f}x{in_f} weight (expected floating point {expected})"
        )


def load_adapter(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    adapter_name: Optional[str] = None,
    allow_partial: bool = False,
    allow_nonfinite: bool = False,
) -> RoCoFTReport:
    """Re-apply RoCoFT with the stored indices and load deltas, biases and heads. In place.

    ``model`` is a fresh base model (or a LightningModule holding it): the adapter becomes its adapter
    ``adapter_name`` (default ``'default'``). Or it already carries RoCoFT layers on the same targets: an adapter
    of that name (default: the active one) is overwritten, a new name is added as another adapter, inactive
    (``add_adapter``; no trained biases or heads then). Not a merged model. On the meta device the deltas are kept
    and written when the model is materialised (``reset_parameters`` after ``to_empty``).
    ``allow_partial``: load the targets that fit a model that differs from the adapter's base, and list the
    rest in the report (``skipped_targets``, ``unadapted_targets``). ``allow_nonfinite``: load NaN / inf values.
    The report counts the loaded adapter.
    """
    if is_merged(model):
        raise ValueError(
            "load_adapter: the model has merged RoCoFT deltas (merge_rocoft); loading would apply an adapter on "
            "top of them. unmerge_rocoft(model) first, or load onto a fresh base model"
        )
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    path = Path(path)
    metadata, tensors = read_adapter(path)
    config = RoCoFTConfig.from_dict(metadata["config"])
    _check_keys(metadata, tensors, config, path)
    _check_tensors(metadata, tensors, config)
    bad = _nonfinite(tensors)
    if bad and not allow_nonfinite:
        raise ValueError(
            f"adapter at {path} holds NaN / inf values in {len(bad)} tensors (e.g. {bad[0]!r}); pass "
            "allow_nonfinite=True to load it anyway (to inspect a diverged run)"
        )
    backbone = _backbone_for_load(model, metadata, allow_partial)
    arch = metadata["base_model"]["architecture"]
    if arch and architecture(backbone) != arch:
        raise ValueError(f"adapter at {path} was trained on {arch}, not on {architecture(backbone)}")
    existing = adapter_names(backbone)
    if adapter_name is None:
        adapter_name = next(iter(rocoft_layers(backbone).values())).active_adapter if existing else DEFAULT_ADAPTER
    adding = bool(existing) and adapter_name not in existing
    shares = bool(metadata["trained_biases"] or metadata["saved_modules"])
    if adding:
        check_addable(backbone, adapter_name, shares)
    others = [n for n in existing if n != adapter_name]
    if shares and others and not adding:
        raise ValueError(
            f"adapter at {path} trains biases or heads: loading it over adapter {adapter_name!r} would change those "
            f"weights of the base for the model's other adapters {others} too. Several adapters on one base train "
            "only their deltas (train_bias=False, modules_to_save=[]); load it onto a model of its own"
        )
    overwritten = adapter_name if adapter_name in existing else None
    load, skipped, unadapted = _match_targets(backbone, metadata, tensors, config, allow_partial, path, overwritten)
    if adding and set(load) != set(rocoft_layers(backbone)):
        raise ValueError(
            f"adapter at {path} fits {len(load)} of the model's {len(rocoft_layers(backbone))} RoCoFT layers; an "
            f"adapter added as {adapter_name!r} next to {existing} must adapt the same layers"
        )

    params = dict(backbone.named_parameters(remove_duplicate=False))
    biases = [k for k in metadata["trained_biases"] if k.rsplit(".base.", 1)[0] in load]
    for key in metadata["saved_parameters"]:
        if key not in params:
            raise ValueError(f"adapter head parameter {key!r} does not exist in {type(backbone).__name__}")
        if params[key].shape != tensors[key].shape:
            raise ValueError(f"adapter head parameter {key!r}: shape {tuple(tensors[key].shape)} != {tuple(params[key].shape)}")
    on_meta = [k for k in biases + list(metadata["saved_parameters"]) if _stored_param(params, k, backbone).is_meta]
    if on_meta:
        raise ValueError(
            f"load_adapter: the adapter holds trained biases / head weights (e.g. {on_meta[0]!r}) but the model's "
            "parameters are on the meta device, where they hold no values and materialising overwrites them with the "
            "base checkpoint. Load the adapter after materialising the model (to_empty + load the base weights)"
        )

    if overwritten is None:
        heads_config = RoCoFTConfig(**{**config.to_dict(), "modules_to_save": metadata["saved_modules"] or []})
        found = set(find_heads(backbone, heads_config)) if metadata["saved_modules"] else set()
        if found != set(metadata["saved_modules"]):
            raise ValueError(f"adapter heads {metadata['saved_modules']} do not match the model's modules {sorted(found)}")
        targets_config = RoCoFTConfig(**{**heads_config.to_dict(), "targets": _exact_names(load)})
        indices = {n: _stored(tensors, n, "indices", config) for n in load}
        if adding:
            attach_adapter(backbone, adapter_name, targets_config, indices=indices)
        else:
            apply_rocoft(backbone, targets_config, indices=indices, adapter_name=adapter_name)
    adapters = named_adapters(backbone, adapter_name)
    prefix = metadata.get("config_prefix") or ""
    for name, adapter in adapters.items():  # saved again, it is the adapter it was
        adapter.rocoft_config, adapter.target = config, prefix + name
    params = dict(backbone.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in load:
            adapters[name].set_indices(_stored(tensors, name, "indices", config))
            adapters[name].load_delta(_stored(tensors, name, "delta", config))
        for key in biases:
            params[key].copy_(tensors[key].to(params[key]))
            params[key].requires_grad_(True)
        for key in metadata["saved_parameters"]:
            params[key].copy_(tensors[key].to(params[key]))
    report = rocoft_report(backbone, adapter_name)
    report.skipped_targets, report.unadapted_targets = skipped, unadapted
    return report


def _stored(tensors: dict[str, torch.Tensor], name: str, kind: str, config: RoCoFTConfig) -> dict[str, torch.Tensor]:
    """One target's stored index sets (``kind`` 'indices') or deltas ('delta'), by their names in the layer."""
    keys = [p.indices if kind == "indices" else p.delta for p in PARTS[config.mode]]
    return {k: tensors[f"{name}.{k}"] for k in keys}


def _stored_param(params: dict[str, nn.Parameter], key: str, backbone: nn.Module) -> nn.Parameter:
    """A stored parameter as the model names it now: a target's bias is stored as <target>.base.bias, and is
    <target>.bias until the target is wrapped in a RoCoFTLinear."""
    plain = key[: -len(".base.bias")] + ".bias" if key.endswith(".base.bias") else key
    param = params.get(key, params.get(plain))
    if param is None:
        raise ValueError(f"adapter parameter {key!r} does not exist in {type(backbone).__name__}")
    return param


def _match_targets(
    backbone: nn.Module,
    metadata: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    config: RoCoFTConfig,
    allow_partial: bool,
    where: Path,
    overwritten: Optional[str] = None,
) -> tuple[list[str], list[str], list[str]]:
    """(adapter targets to load, adapter targets that do not fit, targets the stored config selects in this
    model that the adapter has no values for). Unless ``allow_partial``, anything but a full match raises.
    ``overwritten``: the model's adapter the values replace, whose mode and delta shapes they must have."""
    modules = dict(backbone.named_modules())
    already = rocoft_layers(backbone)
    problems: dict[str, str] = {}
    for name, info in metadata["targets"].items():
        module = modules.get(name)
        base = module.base if isinstance(module, RoCoFTLinear) else module
        delta_shapes = [tuple(d.shape) for d in _stored(tensors, name, "delta", config).values()]
        if module is None:
            problems[name] = f"adapter target {name!r} does not exist in {type(backbone).__name__}"
        elif not is_supported_base(base):
            problems[name] = f"adapter target {name!r} is a {type(base).__name__}, not nn.Linear/Conv1D"
        elif list(features(base)) != info["shape"]:
            problems[name] = f"adapter target {name!r}: stored shape {info['shape']} != model shape {list(features(base))}"
        elif already and name not in already:
            problems[name] = f"adapter target {name!r} is not a RoCoFT layer, while the model has RoCoFT layers elsewhere"
        elif overwritten is not None and (
            (adapter := already[name].adapters[overwritten]).mode != config.mode
            or [tuple(d.shape) for d in adapter.deltas.values()] != delta_shapes
        ):
            problems[name] = (
                f"adapter target {name!r}: delta shape {_shapes(delta_shapes)} ({config.mode}) != the model's RoCoFT "
                f"layer {_shapes([tuple(d.shape) for d in adapter.deltas.values()])} ({adapter.mode})"
            )
    load = [n for n in metadata["targets"] if n not in problems]
    skipped = [n for n in metadata["targets"] if n in problems]
    selected = set(already) if already else _selected_targets(backbone, config, metadata)
    unadapted = sorted(selected - set(metadata["targets"])) if selected is not None else []
    unselected = sorted(set(metadata["targets"]) - selected) if selected is not None else []

    mismatch = []
    if problems:
        more = f" (and {len(problems) - 1} more targets)" if len(problems) > 1 else ""
        mismatch.append(next(iter(problems.values())) + more)
    if already and (unadapted or unselected):
        mismatch.append(f"the model already has RoCoFT layers on other targets than the adapter at {where}")
    elif unadapted or unselected:
        mismatch.append(
            f"its config selects {len(selected)} targets in this {type(backbone).__name__}, the adapter has "
            f"{len(metadata['targets'])}: {len(unadapted)} would stay unadapted {_some(unadapted)}"
            + (f", {len(unselected)} are not selected here {_some(unselected)}" if unselected else "")
        )
    stored = metadata["base_model"].get("fingerprint")
    if stored is not None:
        here = base_fingerprint(backbone, metadata["saved_modules"])
        if here["sha256"] != stored.get("sha256"):
            mismatch.append(f"the base model differs from the one it was trained on ({_fingerprint_diff(stored, here)})")
    if mismatch and not allow_partial:
        raise ValueError(
            f"adapter at {where} does not fit this model: " + "; ".join(mismatch) + ". Load it onto the base model "
            "it was trained on, or pass allow_partial=True to load only the targets that fit"
        )
    if not load:
        raise ValueError(f"adapter at {where}: none of its {len(metadata['targets'])} targets fits this model: {mismatch}")
    return load, skipped, unadapted


def _shapes(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(map(str, shapes))


def _fingerprint_diff(stored: dict[str, Any], here: dict[str, Any]) -> str:
    a, b = stored.get("sizes", {}), here["sizes"]
    sizes = [f"{k} {a[k]} there, {b.get(k)} here" for k in a if a[k] != b.get(k)]
    if sizes:
        return ", ".join(sizes)
    if stored.get("parameters") != here["parameters"]:
        return f"{stored.get('parameters')} parameter tensors there, {here['parameters']} here"
    return "parameter names or shapes differ"


def _selected_targets(backbone: nn.Module, config: RoCoFTConfig, metadata: dict[str, Any]) -> Optional[set[str]]:
    """The targets the stored config selects in ``backbone`` (on a fresh model), named as the adapter names
    them; None where that cannot be told (a format 1 adapter with regex targets: no config_prefix)."""
    prefix = metadata.get("config_prefix")
    if prefix is None:
        if isinstance(config.targets, str):
            return None
        prefix = ""
    root: nn.Module = backbone
    if prefix:
        # The regex matched names relative to the module apply_rocoft ran on: rebuild that naming around
        # the backbone in a throwaway holder (the backbone itself is not changed).
        root = holder = nn.Module()
        *outer, last = prefix[:-1].split(".")
        for segment in outer:
            holder.add_module(segment, nn.Module())
            holder = getattr(holder, segment)
        holder.add_module(last, backbone)
    try:
        found = find_targets(root, config, [prefix + h for h in metadata["saved_modules"]])
    except ValueError:
        return set()
    return {n[len(prefix):] for n in found if n.startswith(prefix)}


def _exact_names(names: Any) -> str:
    """A regex that matches exactly these module names."""
    return "|".join(re.escape(n) for n in names)


def _backbone_for_load(model: nn.Module, metadata: dict[str, Any], allow_partial: bool = False) -> nn.Module:
    """The module the adapter's names are relative to: ``model`` or the HF model inside it (with
    ``allow_partial``: the one holding most of the targets)."""
    targets = set(metadata["targets"])
    candidates = [model] + [m for m in model.modules() if m is not model and _is_hf_model(m)]
    overlap = [len(targets & set(dict(m.named_modules()))) for m in candidates]
    for module, n in zip(candidates, overlap):
        if n == len(targets):
            return module
    if allow_partial and max(overlap) > 0:
        return candidates[overlap.index(max(overlap))]
    missing = sorted(targets - set(dict(model.named_modules())))[:3]
    raise ValueError(
        f"adapter targets such as {missing} do not exist in {type(model).__name__}: load it onto the base model "
        "it was trained on, or pass allow_partial=True to load the targets that exist"
    )
