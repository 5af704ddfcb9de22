"""RoCoFT on a quantized, frozen base: bitsandbytes ``Linear4bit`` (NF4 / FP4, with or without double
quantisation, any compute dtype) and ``Linear8bitLt``, and torchao weight-only tensors (int8; int4 through
``IntxWeightOnlyConfig``).

The quantized layer is W0 and stays as it is: ``RoCoFTLinear`` runs its own kernel, ``base(x)``, and adds the
float32 master delta's rank-r term beside it (rows: ``y[..., idx] += x @ D.T``; columns:
``+ x[..., idx] @ D.T``), exactly as over an ``nn.Linear``; only the fused autograd nodes, which read W0 as a
plain tensor, are not used. Gradients reach the deltas only (W0 has none), and the input gradient flows through
the quantized kernel's own backward. W0 is dequantised one layer at a time, never the whole model: for Wanda
scores (``dequantized_weight``), the exact-merge check, and ``merge_rocoft_dequantized``.

Neither library is imported unless such a layer is present: layers are recognised by their classes'
modules (``bitsandbytes.*``, ``torchao.*``), so Lightning's ``BitsandbytesPrecision`` layers (subclasses of
bitsandbytes' own) count too. A quantized layer of any other kind (GPTQ / AWQ ``qweight`` layers, HQQ, an
``nn.Linear`` holding integer weights) is refused by name (``unsupported_reason``)
rather than trained wrongly.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn

from .extras import require_extra

if TYPE_CHECKING:
    from .layers import RoCoFTLinear

log = logging.getLogger("rocoft_pl")

SUPPORTED = "bitsandbytes Linear4bit (NF4 / FP4) and Linear8bitLt, torchao weight-only tensors (int8, intx)"
# Module classes of other quantization libraries (they are not nn.Linear, so they would otherwise be passed over
# silently): GPTQ / AutoGPTQ / Marlin / ExLlama ``QuantLinear``, AWQ ``WQLinear_*``, HQQ, EETQ, Quanto, AQLM.
_FOREIGN = ("QuantLinear", "WQLinear", "HQQLinear", "EetqLinear", "QLinear", "QuantizedLinear", "MarlinLinear")


# -- recognising a quantized layer --------------------------------------------------------------------------


def _bnb_classes(module: nn.Module) -> tuple[str, ...]:
    """Names of the bitsandbytes classes in ``module``'s MRO, most derived first."""
    return _bnb_classes_of(type(module))


@functools.lru_cache(maxsize=None)
def _bnb_classes_of(cls: type) -> tuple[str, ...]:
    # cached per class: every RoCoFTLinear forward asks (see layers.RoCoFTLinear._fused_dtype)
    return tuple(c.__name__ for c in cls.__mro__ if c.__module__.split(".")[0] == "bitsandbytes")


def _bnb_layer(module: nn.Module) -> Optional[str]:
    """'Linear4bit' / 'Linear8bitLt' for those bitsandbytes layers (and subclasses: LinearNF4, Lightning's), else
    None."""
    classes = _bnb_classes(module)
    if not classes:
        return None
    return next((c for c in ("Linear4bit", "Linear8bitLt") if c in classes), None)


def _is_torchao(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and type(t).__module__.split(".")[0] == "torchao"


def quantization_kind(module: nn.Module) -> Optional[str]:
    """'bnb-nf4', 'bnb-fp4', 'bnb-int8', 'torchao-<tensor class>' for a supported quantized layer, else None."""
    layer = _bnb_layer(module)
    if layer == "Linear4bit":
        return f"bnb-{_quant_type(module)}"
    if layer == "Linear8bitLt":
        return "bnb-int8"
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and _is_torchao(weight) and hasattr(weight, "dequantize"):
        return f"torchao-{type(weight).__name__}"
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer RoCoFT supports (its W0 is not a plain tensor)."""
    return quantization_kind(module) is not None


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why RoCoFT cannot wrap ``module``, a quantized linear layer of a kind it does not read, else None.

    Any layer whose weight is not a floating-point tensor RoCoFT can read counts: the fused path would multiply
    by the packed integers, and Wanda would score them."""
    if is_quantized(module):
        return None
    name = type(module).__name__
    bnb = _bnb_classes(module)
    if bnb and isinstance(module, nn.Linear):
        return f"a bitsandbytes {bnb[0]}"
    if isinstance(module, nn.Linear):
        weight = module.weight
        if _is_torchao(weight):
            return f"an nn.Linear with a torchao {type(weight).__name__} weight that has no dequantize()"
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            return f"an nn.Linear with a {weight.dtype} weight (quantized storage RoCoFT cannot read)"
        return None
    if hasattr(module, "qweight") or any(name.startswith(f) for f in _FOREIGN):
        return f"a {name} ({type(module).__module__})"
    return None


def check_supported(module: nn.Module) -> None:
    """Raise TypeError for a quantized layer RoCoFT does not support (see ``unsupported_reason``)."""
    reason = unsupported_reason(module)
    if reason is not None:
        raise TypeError(unsupported_message({"": reason}))


def unsupported_message(found: Mapping[str, str]) -> str:
    """One message for every unsupported quantized target: what they are and what to do instead."""
    shown = [f"{name!r} ({why})" if name else why for name, why in list(found.items())[:3]]
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    what = f"{len(found)} targets: {'; '.join(shown)}{more}" if len(found) > 1 else shown[0]
    return (
        f"RoCoFT cannot adapt {what}: a kind of quantized layer it does not support. Supported quantized bases: "
        f"{SUPPORTED}. Load the model with transformers' BitsAndBytesConfig or torchao (or unquantized), or leave "
        "these layers out of the targets"
    )


def _quant_type(module: nn.Module) -> str:
    weight = module.weight
    state = _quant_state(module)
    return str(getattr(state, "quant_type", None) or getattr(weight, "quant_type", "fp4"))


def _quant_state(module: nn.Module) -> Any:
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def describe(module: nn.Module) -> Optional[dict[str, Any]]:
    """What the quantized base is, for the adapter's metadata and the reports; None for a plain layer."""
    kind = quantization_kind(module)
    if kind is None:
        return None
    layer = _bnb_layer(module)
    if layer == "Linear4bit":
        state, weight = _quant_state(module), module.weight
        nested = bool(getattr(state, "nested", False)) if state is not None else bool(weight.compress_statistics)
        compute = getattr(module, "compute_dtype", None)
        return {
            "kind": kind, "library": "bitsandbytes", "double_quant": nested,
            "blocksize": int(getattr(state, "blocksize", None) or weight.blocksize),
            "compute_dtype": None if compute is None else str(compute).replace("torch.", ""),
            "storage": str(weight.dtype).replace("torch.", ""),
        }
    if layer == "Linear8bitLt":
        return {"kind": kind, "library": "bitsandbytes", "threshold": float(module.state.threshold)}
    return {"kind": kind, "library": "torchao", "dtype": str(module.weight.dtype).replace("torch.", "")}


def base_quantization(layers: Mapping[str, nn.Module]) -> Optional[dict[str, Any]]:
    """The adapter metadata's note of what base it was trained on: each distinct quantization of the targets'
    bases with its layer count, or None when every base is plain. Informational: the adapter's tensors are the
    same either way and load onto a quantized or a full-precision base."""
    kinds: dict[str, dict[str, Any]] = {}
    for layer in layers.values():
        info = describe(getattr(layer, "base", layer))
        if info is not None:
            key = repr(sorted(info.items()))
            kinds.setdefault(key, {**info, "layers": 0})["layers"] += 1
    if not kinds:
        return None
    return {"quantized_targets": sum(k["layers"] for k in kinds.values()), "targets": len(layers), "kinds": list(kinds.values())}


# -- shapes and dense weights -------------------------------------------------------------------------------


def logical_shapes(model: nn.Module) -> dict[int, torch.Size]:
    """The (out x in) shape each packed weight of ``model`` stands for, by ``id`` of the parameter: a bitsandbytes
    4-bit weight is stored as (out * in / 2, 1) (or a shard of that under FSDP2, where the parameter no longer
    carries its quant state; the layer still knows its features)."""
    return {
        id(m.weight): torch.Size((m.out_features, m.in_features))
        for m in model.modules() if _bnb_layer(m) == "Linear4bit" and isinstance(getattr(m, "weight", None), torch.Tensor)
    }


def logical_numels(model: nn.Module) -> dict[int, int]:
    """Parameters each packed weight of ``model`` stands for (``logical_shapes``): what reports count."""
    return {k: int(s.numel()) for k, s in logical_shapes(model).items()}


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """W0 of one quantized layer as a dense (out x in) floating-point tensor, on the layer's device. The layer
    itself is not changed."""
    layer = _bnb_layer(module)
    weight = module.weight
    if layer == "Linear4bit":
        if not getattr(weight, "bnb_quantized", True) or _quant_state(module) is None:
            return weight.data.detach().clone()  # converted but not quantized yet (moved to a device later)
        import bitsandbytes.functional as bnb_f

        data, state = weight.data, _quant_state(module)
        if getattr(state, "packing_format_for_cpu", False):  # the inverse edits the state it is given
            data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb_f.dequantize_4bit(data, state)
    if layer == "Linear8bitLt":
        if weight.dtype != torch.int8:  # has_fp16_weights: a float weight, quantized on the fly
            return weight.data.detach().clone()
        import bitsandbytes.functional as bnb_f

        scale = getattr(weight, "SCB", None)
        scale = scale if scale is not None else module.state.SCB
        return bnb_f.int8_vectorwise_dequant(weight.data, scale)
    if _is_torchao(weight):
        return weight.dequantize()
    raise TypeError(f"dequantized_weight: {type(module).__name__} is not a supported quantized layer")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The logical (out x in) W0 of any layer RoCoFT wraps: dequantised for a quantized one, else the weight
    (a transposed view for transformers' Conv1D)."""
    if is_quantized(module):
        return dequantized_weight(module)
    from .layers import is_conv1d

    return module.weight.t() if is_conv1d(module) else module.weight


# -- the forward -------------------------------------------------------------------------------------------


def keep_trainable_layout(model: nn.Module, unpack: bool = True) -> None:
    """Turn off bitsandbytes' CPU inference layout on every 4-bit layer of ``model`` (and undo it where it was used).

    bitsandbytes 0.50 repacks a ``Linear4bit`` on a CPU with AVX512-BF16 the first time it runs in eval mode
    without grad (validation, generation). That layout has no backward: the next training step fails ("a view of
    a leaf Variable that requires grad is being used in an in-place operation"). Its inverse re-quantises the
    double-quantisation statistics from a bf16 copy, so W0 would also drift with every validation. RoCoFT
    trains through these layers, so it keeps the trainable layout (CPU inference of the quantized layers is
    then slower; nothing changes on CUDA). ``unpack=False``: only turn it off, leave a layer already repacked."""
    for module in model.modules():
        if _bnb_layer(module) == "Linear4bit":
            _keep_layout(module, unpack)


def check_packed_storage(model: nn.Module) -> None:
    """Raise if something cast the packed 4-bit weights to another dtype (a ``16-true`` precision over weights
    stored as bfloat16: a numeric cast of packed bits), rather than train on garbage."""
    for name, module in model.named_modules():
        storage = getattr(module, "quant_storage", None)
        if _bnb_layer(module) == "Linear4bit" and storage is not None and module.weight.dtype != storage:
            raise ValueError(
                f"{name}: its packed 4-bit weights, stored as {storage}, were cast to {module.weight.dtype} (by the "
                "trainer's precision?), which scrambles them. Store them in the dtype the precision converts to "
                "(bnb_4bit_quant_storage / quantization_options.quant_storage), or as uint8, which no precision casts"
            )


def _keep_layout(module: nn.Module, unpack: bool = True) -> None:
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    state = _quant_state(module)
    if unpack and getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_f

        weight = module.weight
        weight.data, state = bnb_f._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = module.quant_state = state
        log.warning("bitsandbytes had repacked a 4-bit layer for CPU inference; unpacked it to train through it")


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x)`` through the quantized kernel. A trained bias (float32 master, ``train_bias``) is added here
    instead of being handed to the layer: bitsandbytes casts its bias's ``.data`` to the input's dtype in place,
    which would round the master copy.

    The result may be updated in place (the row term), which autograd forbids on a view a custom Function
    returned (bitsandbytes' 8-bit matmul returns one): such a view is copied first."""
    if _bnb_layer(base) == "Linear4bit":
        _keep_layout(base)
    bias = base.bias
    if bias is not None and bias.requires_grad:
        y = torch.func.functional_call(base, {"bias": None}, (x,))
        return y + bias.to(y.dtype)
    y = base(x)
    return y.clone() if y._is_view() else y


# -- merging ----------------------------------------------------------------------------------------------

_UNCHANGED = "unchanged"


@torch.no_grad()
def exact_merge(layer: "RoCoFTLinear") -> Optional[Union[str, tuple[torch.Tensor, Any]]]:
    """What merging writes into a quantized base when the merge is exact, else None.

    Exact means the merged layer computes W0 + D to the last bit: always when every delta is zero (the base is
    kept as it is, ``'unchanged'``); for a bitsandbytes 4-bit base, when quantising W0 + D again and
    dequantising gives W0 + D back (then the new packed data and quant state). A trained row is almost never on
    the 4-bit grid, so in practice merging a trained adapter into 4-bit weights is refused
    (``merge_rocoft_dequantized`` gives a plain model instead)."""
    delta = layer.delta_weight()
    if not bool(delta.any()):
        return _UNCHANGED
    base = layer.base
    if _bnb_layer(base) != "Linear4bit":
        return None
    import bitsandbytes.functional as bnb_f

    w0 = dequantized_weight(base)
    target = w0.float() + delta.to(w0.device, torch.float32)
    if not torch.equal(target.to(w0.dtype).float(), target):
        return None
    state = _quant_state(base)
    data, new_state = bnb_f.quantize_4bit(
        target.to(w0.dtype), blocksize=state.blocksize, compress_statistics=bool(state.nested),
        quant_type=state.quant_type, quant_storage=getattr(base, "quant_storage", torch.uint8),
    )
    if not torch.equal(bnb_f.dequantize_4bit(data, new_state).float(), target):
        return None
    return data, new_state


def not_exact_message(names: list[str], layers: Mapping[str, "RoCoFTLinear"]) -> str:
    kind = quantization_kind(layers[names[0]].base)
    return (
        f"merge_rocoft: {len(names)} RoCoFT layers (e.g. {names[0]!r}) have a quantized base ({kind}) and W0 + delta "
        "is not exactly representable in its quantized format: re-quantising would change the trained weights. "
        "Nothing was merged. Use rocoft_pl.merge_rocoft_dequantized(model) for a plain bf16 / fp32 model, or keep "
        "the adapter unmerged (the quantized kernel plus the delta)"
    )


def check_exact_merges(layers: Mapping[str, "RoCoFTLinear"]) -> None:
    """Before ``merge_rocoft`` changes anything: refuse unless every quantized layer merges exactly."""
    inexact = [n for n, layer in layers.items() if is_quantized(layer.base) and exact_merge(layer) is None]
    if inexact:
        raise ValueError(not_exact_message(inexact, layers))


@torch.no_grad()
def merge_quantized(layer: "RoCoFTLinear") -> nn.Module:
    """``RoCoFTLinear.merge`` for a quantized base: the exact merge, with W0's packed storage kept so that
    ``unmerge`` restores it bit for bit."""
    from .layers import _Merged

    merged = exact_merge(layer)
    if merged is None:
        raise ValueError(not_exact_message(["<this layer>"], {"<this layer>": layer}))
    base = layer.base
    if merged != _UNCHANGED:
        layer._w0_quantized = (base.weight.data, _quant_state(base))
        _set_4bit(base, *merged)  # type: ignore[misc]
    bias = base.bias
    master = bias.detach().clone() if bias is not None and bias.requires_grad else None  # bnb rounds it in place
    layer._merged = _Merged(layer.active_adapter, (), master)
    return base


@torch.no_grad()
def unmerge_quantized(layer: "RoCoFTLinear") -> None:
    """Undo ``merge_quantized``: W0's packed storage and a trained bias's master copy back."""
    saved = layer.__dict__.pop("_w0_quantized", None)
    if saved is not None:
        _set_4bit(layer.base, *saved)
    record = layer._merged
    if record is not None and record.bias is not None:
        layer.base.bias.data = record.bias.to(layer.base.bias.device)
    layer._merged = None


def _set_4bit(module: nn.Module, data: torch.Tensor, state: Any) -> None:
    module.weight.data = data
    module.weight.quant_state = state
    module.quant_state = state


def _plain_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantized floating-point weights (embeddings, norms): what merging into a plain
    model converts the dequantised layers to."""
    from .inject import rocoft_layers

    deltas = {id(d) for layer in rocoft_layers(model).values() for a in layer.adapters.values() for d in a.deltas.values()}
    quantized = {id(p) for m in model.modules() if is_quantized(m) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in deltas and id(p) not in quantized and not _is_torchao(p):
            return p.dtype
    return torch.float32


def _plain_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.data.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.data.copy_(bias.detach().to(linear.bias.device, dtype))
    return linear.requires_grad_(False)


def _drop_quantization_markers(model: nn.Module) -> None:
    """Remove transformers' record that the model was loaded quantized, so ``save_pretrained`` writes an ordinary
    checkpoint and ``from_pretrained`` reads it without a quantizer."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        if getattr(module, "hf_quantizer", None) is not None:
            module.hf_quantizer = None
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(module, flag, False):
                setattr(module, flag, False)
        if "quantization_method" in vars(module):
            del module.quantization_method


@torch.no_grad()
def merge_rocoft_dequantized(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Fold every RoCoFT delta into its base and return a plain model: each quantized layer becomes an
    ``nn.Linear`` of ``dtype`` holding dequant(W0) + D (summed in float32, rounded once); the model's other
    quantized Linears are dequantised too, one layer at a time; transformers' quantization markers are removed, so
    ``save_pretrained`` writes an ordinary checkpoint. RoCoFT layers over a plain base merge as ``merge_rocoft``
    merges them. In place.

    ``dtype``: of the new layers; default the dtype of the model's unquantized weights (embeddings, norms), as
    loaded. Not undoable (there is no quantized W0 to go back to): ``save_adapter`` first to keep the adapter.
    """
    from .inject import is_merged, rocoft_layers

    layers = rocoft_layers(model)
    folded = [n for n, layer in layers.items() if getattr(layer, "reselection", None) is not None]
    if folded:
        raise ValueError(f"merge_rocoft_dequantized: {folded[0]!r} holds re-selected rows: call rocoft_pl.reselect.consolidate(model) first")
    if is_merged(model):
        raise ValueError("merge_rocoft_dequantized: the model holds layers merged by merge_rocoft; unmerge_rocoft(model) first")
    dtype = dtype or _plain_dtype(model)
    for name, layer in layers.items():
        base = layer.base
        if is_quantized(base):
            weight = dequantized_weight(base).float() + layer.delta_weight().to(base.weight.device, torch.float32)
            model.set_submodule(name, _plain_linear(weight, base.bias, dtype))
        else:
            model.set_submodule(name, layer.merge())
    for name, module in list(model.named_modules()):
        if name and is_quantized(module):
            model.set_submodule(name, _plain_linear(dequantized_weight(module), module.bias, dtype))
    _drop_quantization_markers(model)
    return model


# -- loading a quantized base --------------------------------------------------------------------------------

BNB_KINDS = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
TORCHAO_KINDS = ("torchao-int8", "torchao-int4")
KINDS = BNB_KINDS + TORCHAO_KINDS


def _dtype(value: Any) -> Any:
    return getattr(torch, value) if isinstance(value, str) else value


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"quantization must be one of {KINDS} (or None), got {kind!r}")


def hf_quantization_config(
    kind: str, compute_dtype: Any = None, quant_storage: Any = None, skip_modules: Optional[list[str]] = None
) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a bitsandbytes ``kind`` ('nf4', 'nf4-dq', 'fp4', 'fp4-dq' as
    Lightning's BitsandbytesPrecision names them; 'int8': LLM.int8).

    ``compute_dtype``: the 4-bit kernel's compute dtype (default float32); ``quant_storage``: the dtype the packed
    4-bit weights are stored as (``bfloat16`` lets FSDP2 shard them with the model's bf16 tensors; default uint8);
    ``skip_modules``: modules kept unquantized (transformers keeps the output head so by default)."""
    check_kind(kind)
    if kind not in BNB_KINDS:
        raise ValueError(f"{kind!r} is a torchao quantization: quantize_in_memory applies it after loading")
    from transformers import BitsAndBytesConfig

    extra: dict[str, Any] = {"llm_int8_skip_modules": skip_modules} if skip_modules else {}
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind.split("-")[0], bnb_4bit_use_double_quant=kind.endswith("-dq"),
        bnb_4bit_compute_dtype=_dtype(compute_dtype) or torch.float32,
        bnb_4bit_quant_storage=_dtype(quant_storage) or torch.uint8, **extra,
    )


def _block_linears(model: nn.Module, skip_modules: Optional[list[str]] = None) -> dict[str, nn.Linear]:
    """The plain nn.Linear layers of ``model``'s transformer blocks (what transformers' bitsandbytes loading
    quantizes too: the output head and embeddings stay), less names ending in one of ``skip_modules``."""
    from .inject import _inside, block_prefixes

    blocks, skip = block_prefixes(model), list(skip_modules or [])
    return {
        n: m for n, m in model.named_modules()
        if type(m) is nn.Linear and _inside(n, blocks) and not any(n == s or n.endswith("." + s) for s in skip)
    }


def _bnb_linear(linear: nn.Linear, kind: str, compute_dtype: Any, quant_storage: Any) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantized on ``linear``'s device."""
    bnb = require_extra("bitsandbytes", "quant")

    device, has_bias = linear.weight.device, linear.bias is not None
    if kind == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, device="meta")
        new.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, nested = kind.split("-")[0], kind.endswith("-dq")
        storage = _dtype(quant_storage) or torch.uint8
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=_dtype(compute_dtype),
            compress_statistics=nested, quant_type=quant_type, quant_storage=storage, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, compress_statistics=nested, quant_type=quant_type,
            quant_storage=storage, module=new,
        )
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes on the move to a device (the CPU too)


@torch.no_grad()
def quantize_in_memory(
    model: nn.Module, kind: str, compute_dtype: Any = None, quant_storage: Any = None,
    skip_modules: Optional[list[str]] = None, group_size: int = 32,
) -> nn.Module:
    """Quantize the Linear layers of ``model``'s transformer blocks in place, for a model already in memory (a
    GGUF file dequantised on load; a model built from a config). Loading with ``hf_quantization_config`` is the
    lighter way for a checkpoint: the full-precision weights then never sit in memory together.

    bitsandbytes kinds as ``hf_quantization_config``; 'torchao-int8' (``Int8WeightOnlyConfig``, per-row scales);
    'torchao-int4' (``IntxWeightOnlyConfig``, int4 values in groups of ``group_size``: it runs on the CPU, but
    stores each value in an int8, so it saves no memory over int8; torchao's packed int4 layouts need CUDA)."""
    check_kind(kind)
    for name, linear in _block_linears(model, skip_modules).items():
        model.set_submodule(name, quantize_linear(linear, kind, compute_dtype, quant_storage, group_size))
    if kind in BNB_KINDS and hasattr(model, "config"):
        # transformers' marks of a model it loaded this way: PEFT wraps bitsandbytes layers in its own LoRA
        # layers for them only when it sees them (merge_rocoft_dequantized removes them again)
        setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return model


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear, kind: str, compute_dtype: Any = None, quant_storage: Any = None, group_size: int = 32
) -> nn.Module:
    """One ``nn.Linear`` quantized (``kind`` as ``quantize_in_memory``): a new bitsandbytes layer, or for torchao
    the same layer with a torchao weight. On ``linear``'s device."""
    check_kind(kind)
    if kind in BNB_KINDS:
        return _bnb_linear(linear, kind, compute_dtype, quant_storage)
    tq = require_extra("torchao.quantization", "quant")

    if kind == "torchao-int8":
        config = tq.Int8WeightOnlyConfig()
    else:
        config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(group_size))
    holder = nn.Sequential(linear)
    tq.quantize_(holder, config)
    return holder[0]


def quantized_device_map() -> Any:
    """Where transformers puts a model it loads quantized: this process's GPU (``LOCAL_RANK``), else the CPU."""
    import os

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


__all__ = [
    "KINDS",
    "base_quantization",
    "dense_weight",
    "dequantized_weight",
    "describe",
    "hf_quantization_config",
    "is_quantized",
    "keep_trainable_layout",
    "logical_numels",
    "logical_shapes",
    "merge_rocoft_dequantized",
    "quantization_kind",
    "quantize_in_memory",
    "quantize_linear",
    "unsupported_reason",
]
