"""The methods a leaderboard compares, each as a Lightning callback that adapts the HF model on setup.

RoCoFT variants are rocoft_pl's own callback; BitFit and full fine-tuning only set requires_grad; every
other baseline comes from the peft library (not re-implemented). All methods count parameters the same
way: ``adapter_params`` are the trainable parameters outside the task head, ``head_params`` the head's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from torch import nn

from rocoft_pl import RoCoFT, RoCoFTConfig
from rocoft_pl.adapter import hf_model_in
from rocoft_pl.extras import require_extra
from rocoft_pl.inject import block_prefixes, find_heads, find_targets, rocoft_layers

PEFT_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt", "vera", "loha", "lokr")
ROCOFT_METHODS = ("rocoft-row", "rocoft-column", "rocoft-entries", "rocoft-both")
METHODS = ("full", "bitfit", *ROCOFT_METHODS, *PEFT_METHODS)

_INT, _NUMBER, _NAMES = (int,), (int, float), (list,)
# The params each non-RoCoFT method reads (peft_config below), with their types; RoCoFT's are its
# callback's arguments. MethodCallback refuses any other, so a misspelt param fails before a run.
METHOD_PARAMS: dict[str, dict[str, tuple[type, ...]]] = {
    "full": {},
    "bitfit": {},
    "lora": {"r": _INT, "alpha": _NUMBER, "dropout": _NUMBER, "targets": _NAMES},
    "adalora": {"init_r": _INT, "r": _INT, "alpha": _NUMBER, "total_step": _INT, "tinit": _INT, "tfinal": _INT, "targets": _NAMES},
    "ia3": {"targets": _NAMES},
    "vera": {"r": _INT, "targets": _NAMES},
    "loha": {"r": _INT, "alpha": _NUMBER, "targets": _NAMES},
    "lokr": {"r": _INT, "alpha": _NUMBER, "targets": _NAMES},
    "prefix": {"num_virtual_tokens": _INT},
    "prompt": {"num_virtual_tokens": _INT},
}


@dataclass
class ParamCounts:
    adapter_params: int
    head_params: int
    total_params: int

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.head_params


def head_names(model: nn.Module) -> list[str]:
    """The task head's module names (classifier, score, qa_outputs, ...), as RoCoFT auto-detects them."""
    return list(find_heads(model, RoCoFTConfig()))


def count_params(model: nn.Module, heads: list[str]) -> ParamCounts:
    """Trainable parameters split into head (any name under a head module) and everything else. A packed 4-bit
    weight counts as the (out x in) parameters it stands for, so totals agree across quantized and plain bases."""
    from rocoft_pl.quantized import logical_numels

    logical = logical_numels(model)
    adapter = head = total = 0
    for name, p in model.named_parameters():
        total += logical.get(id(p), p.numel())
        if not p.requires_grad:
            continue
        if any(f".{h}." in f".{name}" for h in heads):
            head += p.numel()
        else:
            adapter += p.numel()
    return ParamCounts(adapter, head, total)


def target_suffixes(model: nn.Module) -> list[str]:
    """RoCoFT's default targets as names relative to their block (e.g. attention.self.query), for PEFT."""
    blocks = block_prefixes(model)
    suffixes = []
    for name in find_targets(model, RoCoFTConfig()):
        block = max((b for b in blocks if name.startswith(b + ".")), key=len)
        suffix = name[len(block) + 1 :]
        if suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for marker, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
    ):
        if marker in name:
            return task
    return "FEATURE_EXTRACTION"


def _feedforward(model: nn.Module, suffixes: list[str]) -> list[str]:
    """IA3 scales the input of the feed-forward down-projection: the targets with in_features > out_features."""
    ff = []
    for name, module in find_targets(model, RoCoFTConfig()).items():
        suffix = next(s for s in suffixes if name.endswith(s))
        out_f, in_f = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
        if in_f > out_f and suffix not in ff:
            ff.append(suffix)
    return ff


def peft_config(method: str, model: nn.Module, total_steps: Optional[int] = None, **params: Any) -> Any:
    """A peft config for ``method`` on the same targets RoCoFT adapts (or ``targets``: module-name suffixes)."""
    peft = require_extra("peft", "bench")

    task_type = _task_type(model)
    targets = list(params.get("targets") or target_suffixes(model))
    heads = [h.split(".")[-1] for h in head_names(model)]
    common: dict[str, Any] = {"task_type": task_type}
    adapters: dict[str, Callable[[], Any]] = {
        "lora": lambda: peft.LoraConfig(
            r=params.get("r", 8), lora_alpha=params.get("alpha", 16), lora_dropout=params.get("dropout", 0.0),
            target_modules=targets, modules_to_save=heads, **common,
        ),
        "adalora": lambda: peft.AdaLoraConfig(
            init_r=params.get("init_r", 12), target_r=params.get("r", 8), lora_alpha=params.get("alpha", 16),
            total_step=params.get("total_step", total_steps), tinit=params.get("tinit", 0),
            tfinal=params.get("tfinal", 0), target_modules=targets, modules_to_save=heads, **common,
        ),
        "ia3": lambda: peft.IA3Config(
            target_modules=targets, feedforward_modules=_feedforward(model, targets), modules_to_save=heads, **common
        ),
        "vera": lambda: peft.VeraConfig(r=params.get("r", 256), target_modules=targets, modules_to_save=heads, **common),
        "loha": lambda: peft.LoHaConfig(r=params.get("r", 8), alpha=params.get("alpha", 8), target_modules=targets, modules_to_save=heads, **common),
        "lokr": lambda: peft.LoKrConfig(r=params.get("r", 8), alpha=params.get("alpha", 8), target_modules=targets, modules_to_save=heads, **common),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=params.get("num_virtual_tokens", 20), **common),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=params.get("num_virtual_tokens", 20), **common),
    }
    if method not in adapters:
        raise ValueError(f"unknown PEFT method {method!r}; known: {PEFT_METHODS}")
    if method == "adalora" and not params.get("total_step", total_steps):
        raise ValueError("adalora needs total_step (or a Trainer with max_steps)")
    return adapters[method]()


def keep_4bit_training_kernel(model: nn.Module) -> None:
    """Over bitsandbytes 4-bit layers (QLoRA): keep the kernel RoCoFT keeps (``keep_trainable_layout``). On a CPU
    with AVX512-BF16, bitsandbytes otherwise repacks each layer for a bf16 inference kernel at the first eval
    forward: a validation would then score LoRA with another kernel than RoCoFT on the same base, and the next
    training step would fail (that layout has no backward)."""
    from rocoft_pl.quantized import keep_trainable_layout

    keep_trainable_layout(model)  # touches bitsandbytes 4-bit layers only


def _hf_attribute(pl_module: pl.LightningModule) -> str:
    """The attribute of the LightningModule that holds the HF model (PEFT replaces it with a wrapper)."""
    model = hf_model_in(pl_module)
    for attr, child in pl_module.named_children():
        if child is model:
            return attr
    raise ValueError(f"{type(pl_module).__name__} holds no Hugging Face model as a direct attribute")


class MethodCallback(pl.Callback):
    """Apply a non-RoCoFT method (full, bitfit, or a peft baseline) to the LightningModule's HF model."""

    def __init__(self, method: str, **params: Any) -> None:
        if method not in ("full", "bitfit", *PEFT_METHODS):
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        known = METHOD_PARAMS[method]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise TypeError(f"{method} takes no param(s) {unknown}; it takes {sorted(known) or 'none'}")
        for name, value in params.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, known[name])):
                kinds = " or ".join(t.__name__ for t in known[name])
                raise TypeError(f"{method} param {name} must be {kinds}, got {value!r}")
        self.method, self.params = method, params
        self.counts: Optional[ParamCounts] = None
        self._applied = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._applied:
            return
        attr = _hf_attribute(pl_module)
        model = getattr(pl_module, attr)
        heads = head_names(model)
        if self.method in ("full", "bitfit"):
            for name, p in model.named_parameters():
                in_head = any(f".{h}." in f".{name}" for h in heads)
                p.requires_grad_(self.method == "full" or in_head or name.endswith("bias"))
        else:
            peft = require_extra("peft", "bench")

            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            config = peft_config(self.method, model, total_steps=steps, **self.params)
            keep_4bit_training_kernel(model)
            model = peft.get_peft_model(model, config)
            setattr(pl_module, attr, model)
        self.counts = count_params(model, heads)
        self._applied = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # AdaLoRA reallocates ranks after each optimizer step; Lightning clears gradients only at the start
        # of the next step, so they are still there for its importance scores.
        if self.method == "adalora":
            hf_model_in(pl_module).base_model.update_and_allocate(trainer.global_step)


def method_callback(method: str, **params: Any) -> pl.Callback:
    """The callback for a registry name: rocoft-row/column/both (rank, selection, train_bias...), rocoft-entries
    (p), full, bitfit, lora (r, alpha), adalora, ia3, prefix, prompt, vera, loha, lokr."""
    if method in ROCOFT_METHODS:
        mode = method.split("-", 1)[1]
        if mode == "entries":
            params.setdefault("selection", "random")
        return RoCoFT(mode=mode, **params)
    return MethodCallback(method, **params)


def counts_of(callback: pl.Callback, pl_module: pl.LightningModule) -> ParamCounts:
    """Parameter counts after setup, the same way for every method. RoCoFT's 'both' counts the r x r overlap
    of its row and column deltas once, as its report does (it is one block of weights, stored twice)."""
    if isinstance(callback, RoCoFT):
        model = hf_model_in(pl_module)
        counts = count_params(model, head_names(model))
        counts.adapter_params -= sum(layer.num_stored - layer.num_trainable for layer in rocoft_layers(model).values())
        return counts
    if callback.counts is None:
        raise ValueError("method not applied yet")
    return callback.counts
