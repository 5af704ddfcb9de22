"""GPU memory per device for RoCoFT (and full fine-tuning) of the paper's LLMs under FSDP: `rocoft-bench memory`.

An estimate from measured bytes per parameter (``measured_bytes_per_param`` after a real step; checked by
tests/test_causal_lm.py) and the published architectures built on the meta device (nothing downloaded):
sharded states + the gathered blocks in flight + activations (checkpointed) + logits. Allocator
fragmentation, the CUDA context (~0.5-1 GiB) and communication buffers come on top.
"""

from __future__ import annotations

import argparse
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
) -> dict[str, float]:
    """Estimated peak bytes per GPU, FSDP full sharding over ``num_gpus``, in GiB per component.

    states:      (frozen x bytes_frozen + trained x bytes_trained) / N   (weights, grads, AdamW moments)
    gathered:    (1 + prefetch) full blocks of bf16 weights while a block runs
    activations: checkpointed block inputs L x b x s x h x 2 B (or, without checkpointing, ~34 b s h 2 B per
                 layer, Korthikanti et al.), plus fp32 logits and their gradient b x s x V x 8 B.
    Allocator fragmentation, CUDA context (~0.5-1 GiB) and communication buffers come on top.
    """
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}")
    b = BYTES[precision]
    frozen = total_params - trained_params
    states = (frozen * b["frozen"] + trained_params * b["trained"]) / num_gpus
    gathered = (1 + prefetch_blocks) * block_params * 2
    tokens = batch_size * seq_len
    per_layer = tokens * hidden_size * 2 if activation_checkpointing else 34 * tokens * hidden_size * 2
    activations = num_layers * per_layer + (34 * tokens * hidden_size * 2 if activation_checkpointing else 0)
    logits = tokens * vocab_size * 8
    parts = {"states": states, "gathered": gathered, "activations": activations, "logits": logits}
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


def memory_table(num_gpus: tuple[int, ...] = (1, 2, 4, 8), rank: int = 3, precision: str = "bf16-true",
                 batch_size: int = 4, seq_len: int = 256) -> list[dict[str, Any]]:
    """Rows per (model, N): parameter counts and estimated GiB per GPU for RoCoFT rows and full fine-tuning."""
    from rocoft_pl.inject import block_prefixes

    rows = []
    for name, (kind, cfg) in LLM_CONFIGS.items():
        model = meta_model(kind, **cfg)
        total = sum(p.numel() for p in model.parameters())
        blocks = block_prefixes(model)
        block = sum(p.numel() for p in model.get_submodule(blocks[0]).parameters())
        hidden = model.config.hidden_size
        trained = rocoft_count(model, "row", rank)
        for n in num_gpus:
            common = dict(total_params=total, block_params=block, num_layers=len(blocks), hidden_size=hidden,
                          vocab_size=model.config.vocab_size, num_gpus=n, batch_size=batch_size, seq_len=seq_len)
            ro = fsdp_memory_per_gpu(trained_params=trained, precision=precision, **common)
            full = fsdp_memory_per_gpu(trained_params=total, precision="fp32-master" if precision != "fp32" else "fp32", **common)
            rows.append({"model": name, "params": total, "rocoft_params": trained, "gpus": n,
                         "rocoft_gib": ro["total"], "rocoft_states_gib": ro["states"], "full_ft_gib": full["total"]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | RoCoFT 3-row params | GPUs | RoCoFT GiB/GPU (states) | full FT GiB/GPU |",
             "|:--|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['rocoft_params']:,} | {r['gpus']} | "
                     f"{r['rocoft_gib']:.1f} ({r['rocoft_states_gib']:.2f}) | {r['full_ft_gib']:.1f} |")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("memory", help="estimated GPU memory per device for the paper's LLMs under FSDP")
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts")
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--precision", default="bf16-true", choices=sorted(BYTES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    gpus = tuple(int(g) for g in args.gpus.split(",") if g)
    print(format_table(memory_table(gpus, args.rank, args.precision, args.batch_size, args.seq_len)))
    return 0
