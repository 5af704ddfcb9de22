"""GPU memory per device for RoCoFT (and full fine-tuning) of the paper's LLMs under FSDP: `rocoft-bench memory`.

An estimate from measured bytes per parameter (``measured_bytes_per_param`` after a real step; checked by
tests/test_causal_lm.py) and the published architectures built on the meta device (nothing downloaded):
sharded states + the gathered blocks in flight + activations (checkpointed) + logits. Allocator
fragmentation, the CUDA context (~0.5-1 GiB) and communication buffers come on top.

``--quantize nf4|nf4-dq|fp4|fp4-dq|int8``: the Linear layers of the blocks hold a bitsandbytes W0
(``quantized_linear_bytes``, checked against a loaded tiny model by tests/test_quantized.py) instead of bf16,
plus the one layer the quantized kernel dequantises to bf16 at a time; embeddings, norms and the head stay bf16.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional

import torch
from torch import nn

GIB = 2**30
# Bytes per parameter (checked by tests/test_causal_lm.py::test_measured_bytes_per_parameter on a real step):
# a frozen weight holds only itself (no .grad, no optimizer state); a trained one holds itself, its gradient
# and AdamW's two moments, in the parameter dtype. RoCoFT's deltas are float32 masters whatever W0's dtype
# (rocoft_pl.layers.master_dtype): 4+4+4+4 next to a bf16 W0 too; full FT under bf16 keeps fp32 master weights.
BYTES = {"bf16-true": {"frozen": 2, "trained": 16}, "fp32-master": {"frozen": 2, "trained": 16}, "fp32": {"frozen": 4, "trained": 16}}


def measured_bytes_per_param(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """After an optimizer step: bytes held per frozen parameter and per trained parameter (weight + grad +
    optimizer state), measured from the tensors themselves."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    trained = [p for p in module.parameters() if p.requires_grad]

    def size(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    frozen_bytes = sum(size(p) + size(p.grad) + sum(size(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0) for p in frozen)
    trained_bytes = sum(size(p) + size(p.grad) + sum(size(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0) for p in trained)
    return {
        "frozen": frozen_bytes / max(sum(p.numel() for p in frozen), 1),
        "trained": trained_bytes / max(sum(p.numel() for p in trained), 1),
    }


# bitsandbytes' layouts (blocksize 64): 4-bit values two to a byte, one float32 absmax per block of 64 and a
# 16-entry float32 code table per layer; double quantisation stores the absmax as uint8 in blocks of 256 with a
# float32 scale each, a float32 offset and a 256-entry float32 table. LLM.int8: one byte per weight and one float32
# scale per output row.
QUANTIZE = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")


def quantized_linear_bytes(out_features: int, in_features: int, kind: str, blocksize: int = 64) -> int:
    """Bytes of a bitsandbytes layer's W0 (out x in): what stays resident for one frozen quantized Linear."""
    if kind not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {kind!r}")
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / blocksize)
    if kind.endswith("-dq"):
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 256 + 4 * 16
    return math.ceil(n / 2) + 4 * blocks + 4 * 16


def packed_bytes(out_features: int, in_features: int, kind: str) -> int:
    """The part of ``quantized_linear_bytes`` that is the weight parameter itself (what FSDP shards); the scales
    and tables live in the layer's quant state, which every rank keeps whole."""
    n = out_features * in_features
    return n if kind == "int8" else math.ceil(n / 2)


def quantized_bytes_per_param(kind: str, in_features: int = 4096, blocksize: int = 64) -> float:
    """Bytes per weight of a large quantized layer, the per-layer tables left out: nf4 / fp4 0.5625, with double
    quantisation 0.515869, int8 1 + 4 / in_features."""
    if kind == "int8":
        return 1 + 4 / in_features
    if kind.endswith("-dq"):
        return 0.5 + 1 / blocksize + 4 / (blocksize * 256)
    return 0.5 + 4 / blocksize


def quantized_layer_bytes(module: nn.Module) -> int:
    """Measured: bytes of the distinct tensors a loaded bitsandbytes layer keeps for its weight (packed values,
    scales, tables; a storage shared by two of them counted once)."""
    weight = module.weight
    tensors = [weight.data]
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is not None:
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    scale = getattr(weight, "SCB", None)
    if scale is None and getattr(module, "state", None) is not None and hasattr(module.state, "SCB"):
        scale = module.state.SCB
    if scale is not None and weight.dtype == torch.int8:
        tensors.append(scale)
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def rocoft_count(model: nn.Module, mode: str = "row", rank: int = 3) -> int:
    """RoCoFT trainable parameters of a model (meta-device models work): rank x in_features per target for rows,
    rank x out_features for columns, over the default targets (every Linear / Conv1D in the blocks)."""
    from rocoft_pl.config import RoCoFTConfig
    from rocoft_pl.inject import find_heads, find_targets
    from rocoft_pl.layers import features

    config = RoCoFTConfig(mode=mode, rank=rank)  # type: ignore[arg-type]
    targets = find_targets(model, config, find_heads(model, config))
    return sum(rank * (features(m)[1] if mode == "row" else features(m)[0]) for m in targets.values())


def fsdp_memory_per_gpu(
    total_params: int,
    trained_params: int,
    block_params: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    num_gpus: int,
    precision: str = "bf16-true",
    batch_size: int = 4,
    seq_len: int = 256,
    activation_checkpointing: bool = True,
    prefetch_blocks: int = 1,
    quantized_params: int = 0,
    quantized_bytes: float = 0.0,
    quantized_replicated_bytes: float = 0.0,
    block_quantized_params: int = 0,
    block_quantized_bytes: float = 0.0,
    largest_quantized: int = 0,
) -> dict[str, float]:
    """Estimated peak bytes per GPU, FSDP full sharding over ``num_gpus``, in GiB per component.

    states:      (frozen x bytes_frozen + quantized bytes + trained x bytes_trained) / N   (weights, grads,
                 AdamW moments; ``quantized_params`` of the frozen weights take ``quantized_bytes`` in all, of
                 which ``quantized_replicated_bytes``, the scales and tables, are not sharded: every rank holds them)
    gathered:    (1 + prefetch) full blocks while a block runs (bf16, its quantized Linears as stored)
    dequantized: the largest quantized layer as bf16, which the quantized kernel builds in forward and backward
    activations: checkpointed block inputs L x b x s x h x 2 B (or, without checkpointing, ~34 b s h 2 B per
                 layer, Korthikanti et al.), plus fp32 logits and their gradient b x s x V x 8 B.
    Allocator fragmentation, CUDA context (~0.5-1 GiB) and communication buffers come on top.
    """
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}")
    b = BYTES[precision]
    frozen = total_params - trained_params - quantized_params
    sharded = quantized_bytes - quantized_replicated_bytes
    states = (frozen * b["frozen"] + sharded + trained_params * b["trained"]) / num_gpus + quantized_replicated_bytes
    gathered = (1 + prefetch_blocks) * ((block_params - block_quantized_params) * 2 + block_quantized_bytes)
    tokens = batch_size * seq_len
    per_layer = tokens * hidden_size * 2 if activation_checkpointing else 34 * tokens * hidden_size * 2
    activations = num_layers * per_layer + (34 * tokens * hidden_size * 2 if activation_checkpointing else 0)
    logits = tokens * vocab_size * 8
    parts = {"states": states, "gathered": gathered, "dequantized": largest_quantized * 2, "activations": activations,
             "logits": logits}
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


# Architectures of the paper's LLMs (published configs; built on the meta device, nothing downloaded).
LLM_CONFIGS = {
    "LLaMA-2-7B": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)),
    "LLaMA-2-13B": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)),
    "BLOOMZ-7B": ("bloom", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880)),
    "GPT-J-6B": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)),
}


def meta_model(kind: str, **config: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config))


def quantized_layout(model: nn.Module, kind: str) -> dict[str, int]:
    """What ``--quantize kind`` quantizes in ``model`` (a meta-device model works): the Linear layers of the blocks,
    as transformers' bitsandbytes loading does (the head and embeddings stay). Parameter and byte counts, in all,
    in the first block, and the largest layer's size."""
    from rocoft_pl.config import RoCoFTConfig
    from rocoft_pl.inject import block_prefixes, find_heads, find_targets

    config = RoCoFTConfig()
    linears = find_targets(model, config, find_heads(model, config))
    first = block_prefixes(model)[0] + "."
    sizes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    in_first = [s for n, s in sizes.items() if n.startswith(first)]
    total = sum(quantized_linear_bytes(o, i, kind) for o, i in sizes.values())
    return {
        "quantized_params": sum(o * i for o, i in sizes.values()),
        "quantized_bytes": total,
        "quantized_replicated_bytes": total - sum(packed_bytes(o, i, kind) for o, i in sizes.values()),
        "block_quantized_params": sum(o * i for o, i in in_first),
        "block_quantized_bytes": sum(quantized_linear_bytes(o, i, kind) for o, i in in_first),
        "largest_quantized": max(o * i for o, i in sizes.values()),
    }


def memory_table(num_gpus: tuple[int, ...] = (1, 2, 4, 8), rank: int = 3, precision: str = "bf16-true",
                 batch_size: int = 4, seq_len: int = 256, quantize: Optional[str] = None) -> list[dict[str, Any]]:
    """Rows per (model, N): parameter counts and estimated GiB per GPU for RoCoFT rows (W0 in bf16, or quantized
    with ``quantize``) and full fine-tuning."""
    from rocoft_pl.inject import block_prefixes

    rows = []
    for name, (kind, cfg) in LLM_CONFIGS.items():
        model = meta_model(kind, **cfg)
        total = sum(p.numel() for p in model.parameters())
        blocks = block_prefixes(model)
        block = sum(p.numel() for p in model.get_submodule(blocks[0]).parameters())
        hidden = model.config.hidden_size
        trained = rocoft_count(model, "row", rank)
        layout = quantized_layout(model, quantize) if quantize else {}
        for n in num_gpus:
            common = dict(total_params=total, block_params=block, num_layers=len(blocks), hidden_size=hidden,
                          vocab_size=model.config.vocab_size, num_gpus=n, batch_size=batch_size, seq_len=seq_len)
            ro = fsdp_memory_per_gpu(trained_params=trained, precision=precision, **common, **layout)
            full = fsdp_memory_per_gpu(trained_params=total, precision="fp32-master" if precision != "fp32" else "fp32", **common)
            rows.append({"model": name, "params": total, "rocoft_params": trained, "gpus": n,
                         "rocoft_gib": ro["total"], "rocoft_states_gib": ro["states"], "full_ft_gib": full["total"],
                         "w0": quantize or ("fp32" if precision == "fp32" else "bf16")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | RoCoFT 3-row params | GPUs | RoCoFT GiB/GPU (states) | full FT GiB/GPU | RoCoFT W0 |",
             "|:--|--:|--:|--:|--:|--:|:--|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['rocoft_params']:,} | {r['gpus']} | "
                     f"{r['rocoft_gib']:.1f} ({r['rocoft_states_gib']:.2f}) | {r['full_ft_gib']:.1f} | {r['w0']} |")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("memory", help="estimated GPU memory per device for the paper's LLMs under FSDP")
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--precision", default="bf16-true", choices=sorted(BYTES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--quantize", choices=QUANTIZE, help="RoCoFT on a bitsandbytes-quantized W0 (the blocks' Linears)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    gpus = tuple(int(g) for g in args.gpus.split(",") if g)
    print(format_table(memory_table(gpus, args.rank, args.precision, args.batch_size, args.seq_len, args.quantize)))
    return 0
