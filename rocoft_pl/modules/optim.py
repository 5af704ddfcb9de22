"""AdamW with linear warm-up and a cosine / linear / constant schedule, shared by every task module.

Reads the module's hyper-parameters (``self.save_hyperparameters()``): ``learning_rate`` (a number, or
``"auto"``: rocoft_pl.recipe's rule for the model's RoCoFT mode and rank and the run's optimizer steps), ``weight_decay``,
``adam_epsilon``, ``adam_betas``, ``warmup_steps``, ``warmup_ratio``, ``scheduler`` and, when present,
``head_learning_rate``. Only parameters that still require gradients when the optimizer is built are
given to it, so one module serves full fine-tuning, RoCoFT and the PEFT baselines alike.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

SCHEDULERS = ("cosine", "linear", "constant")
# Parameters without weight decay (the usual transformer recipe).
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")
# Task heads that ``head_learning_rate`` applies to.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    return name


def configure_adamw(module: pl.LightningModule) -> dict[str, Any]:
    """The ``configure_optimizers`` return value for ``module`` (per-step scheduler)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    from ..recipe import resolve_learning_rate

    hp = module.hparams
    total = int(module.trainer.estimated_stepping_batches)
    lr = resolve_learning_rate(module, hp.learning_rate, total)  # "auto": RoCoFT's rule (mode, rank, budget)
    head_lr = hp.get("head_learning_rate") or lr
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        in_head = any(f".{h}." in f".{name}" for h in HEAD_NAMES)
        decay = 0.0 if name.endswith(NO_DECAY) else hp.get("weight_decay", 0.0)
        groups.setdefault((head_lr if in_head else lr, decay), []).append(p)
    if not groups:
        raise ValueError("no parameter requires a gradient: nothing to train")
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()],
        lr=lr,
        eps=hp.get("adam_epsilon", 1e-8),
        betas=tuple(hp.get("adam_betas", (0.9, 0.999))),
    )
    ratio = hp.get("warmup_ratio")
    warmup = int(ratio * total) if ratio is not None else hp.get("warmup_steps", 0)
    warmup = min(warmup, max(total - 1, 0))
    scheduler = check_scheduler(hp.get("scheduler", "cosine"))
    if scheduler == "cosine":
        schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    elif scheduler == "linear":
        schedule = get_linear_schedule_with_warmup(optimizer, warmup, total)
    else:
        schedule = get_constant_schedule_with_warmup(optimizer, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
