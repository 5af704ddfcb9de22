"""The ``quantization`` / ``quantization_options`` arguments the task modules share (causal LM, classification):
checked in the constructor, before anything loads, and applied while the model loads (``rocoft_pl.quantized``).

The Linear layers of the transformer blocks are quantized and frozen; embeddings, norms and the task head stay in
the loaded dtype (a classifier's head trains). bitsandbytes' CPU inference repack is turned off on load, so a
validation before training leaves the 4-bit layers trainable (``keep_trainable_layout``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

QUANTIZATION_OPTIONS = ("compute_dtype", "quant_storage", "skip_modules", "group_size")


def check_quantization(quantization: Optional[str], options: Optional[dict[str, Any]], init_on_meta: bool = False) -> None:
    """Refuse a bad quantization setting in the constructor, before anything loads."""
    if quantization is None:
        if options:
            raise ValueError("quantization_options given without quantization")
        return
    from ..quantized import check_kind

    check_kind(quantization)
    unknown = sorted(set(options or {}) - set(QUANTIZATION_OPTIONS))
    if unknown:
        raise ValueError(f"quantization_options: unknown keys {unknown} (known: {list(QUANTIZATION_OPTIONS)})")
    if init_on_meta:
        raise ValueError(
            "quantization loads the checkpoint quantized in __init__ on every process; init_on_meta (rank 0 "
            "reads full-precision weights and broadcasts them) does not go with it: set init_on_meta: false"
        )


def load_model(
    load: Callable[..., nn.Module], quantization: Optional[str] = None, options: Optional[dict[str, Any]] = None,
    in_memory: bool = False, **kwargs: Any,
) -> nn.Module:
    """``load(**kwargs)``; with ``quantization``, the Linear layers of its blocks quantized.

    A bitsandbytes kind loads through transformers' BitsAndBytesConfig, onto this process's GPU (else the CPU), so
    the full-precision weights never sit in memory together; a torchao kind, or ``in_memory``, quantizes after
    loading (``quantize_in_memory``: only the blocks' Linears, whatever the model's head is called)."""
    from ..quantized import BNB_KINDS, hf_quantization_config, keep_trainable_layout, quantize_in_memory, quantized_device_map

    if quantization is None:
        return load(**kwargs)
    options = dict(options or {})
    if quantization in BNB_KINDS and not in_memory:
        options.pop("group_size", None)
        kwargs.setdefault("device_map", quantized_device_map())
        model = load(quantization_config=hf_quantization_config(quantization, **options), **kwargs)
    else:
        model = quantize_in_memory(load(**kwargs), quantization, **options)
    keep_trainable_layout(model, unpack=False)  # validation before training must not repack (no backward)
    return model


__all__ = ["QUANTIZATION_OPTIONS", "check_quantization", "load_model"]
