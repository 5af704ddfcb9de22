"""Sequence-to-sequence fine-tuning (summarization) over any ``AutoModelForSeq2SeqLM`` (BART, T5, ...).

A plain LightningModule like ``SequenceClassificationModule`` (model built in ``__init__``; the optimizer takes
the parameters that still require gradients; AdamW, warm-up, cosine / linear / constant).

Training is teacher forced: cross-entropy of the labels (``-100`` = padding), optional label smoothing.
Validation computes the same loss and generates summaries with ``model.generate`` on whole batches
(``num_beams``, ``generation_max_length``, ``generation_min_length``, ``length_penalty``,
``no_repeat_ngram_size``, ``early_stopping`` from the config; everything else from the model's generation
config). Generated text is scored against the references with the ``rouge-score`` package: ROUGE-1, ROUGE-2,
ROUGE-L and ROUGE-Lsum F-measures averaged over examples (``val/rouge1`` ...; fractions, x100 for the
paper's tables), Porter stemming on by default. ROUGE-Lsum treats newlines as sentence breaks; sentences
are split here with a small regex (after ``.``, ``!``, ``?``), not with nltk's punkt, which would need a
download; references that already hold newlines (CNN/DailyMail highlights) keep them.

Time spent generating is measured and logged: ``val/generation_seconds``, ``val/validation_seconds``,
``val/generation_share`` (of the validation loop) and, at the end of each training epoch that ran a
validation, ``time/generation_share_of_epoch`` (generation seconds / wall time of the epoch including its
validation).

The datamodule contract (``tasks.summarization.SummarizationDataModule``): batches hold ``input_ids``,
``attention_mask``, ``labels`` and ``idx`` (a row of ``datamodule.references(stage)``); without
``references`` the labels are decoded as references.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import nn

from ..extras import require_extra
from .classification import resolve_pretrained
from .optim import check_scheduler, configure_adamw
from .quantization import check_quantization, load_model

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """Newline-separated sentences, as ROUGE-Lsum wants (a regex split; keeps existing newlines)."""
    lines = []
    for line in text.strip().split("\n"):
        lines.extend(s for s in _SENTENCE_END.split(line.strip()) if s)
    return "\n".join(lines)


def rouge_scores(predictions: Sequence[str], references: Sequence[str], rouge_keys: Sequence[str] = ROUGE_KEYS, use_stemmer: bool = True) -> dict[str, float]:
    """Mean F-measure per ROUGE key over the pairs (rouge_score.RougeScorer, one score per pair)."""
    rouge_scorer = require_extra("rouge_score.rouge_scorer", "tasks")

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(rouge_keys), use_stemmer=use_stemmer)
    totals = {k: 0.0 for k in rouge_keys}
    for pred, ref in zip(predictions, references):
        if "rougeLsum" in rouge_keys:
            pred, ref = split_sentences(pred), split_sentences(ref)
        for k, score in scorer.score(ref, pred).items():  # score(target, prediction)
            totals[k] += score.fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


class Seq2SeqModule(pl.LightningModule):
    """Fine-tune an encoder-decoder model; evaluate by generation and ROUGE.

    Args:
        model_name_or_path: hub id (e.g. ``facebook/bart-large``), local directory or ``pkg:<module>``.
        learning_rate, weight_decay, adam_epsilon, adam_betas, warmup_steps, warmup_ratio, scheduler:
            as ``SequenceClassificationModule``.
        dropout: ``config.dropout`` (BART / T5 ``dropout_rate`` is set too); None keeps the model's.
        label_smoothing: cross-entropy label smoothing in training.
        num_beams, generation_max_length, generation_min_length, length_penalty, no_repeat_ngram_size,
        early_stopping: ``generate`` settings (None: the model's generation config).
        rouge_keys: which ROUGE scores to log; use_stemmer: Porter stemming (rouge-score).
        save_predictions: write ``<log_dir>/predictions_<stage>.jsonl`` (``idx``, ``prediction``, ``reference``)
            after each evaluation.
        model_kwargs: more ``from_pretrained`` keyword arguments.
        quantization, quantization_options: load W0 quantized, frozen, as ``SequenceClassificationModule`` does
            (only the Linears of the transformer blocks, after loading; embeddings and the head stay as loaded).
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: Union[float, Literal["auto"]] = 1e-4,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        warmup_ratio: Optional[float] = None,
        scheduler: str = "cosine",
        dropout: Optional[float] = None,
        label_smoothing: float = 0.0,
        num_beams: int = 4,
        generation_max_length: Optional[int] = 62,
        generation_min_length: Optional[int] = None,
        length_penalty: Optional[float] = None,
        no_repeat_ngram_size: Optional[int] = None,
        early_stopping: Optional[bool] = True,
        rouge_keys: Sequence[str] = ROUGE_KEYS,
        use_stemmer: bool = True,
        save_predictions: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        quantization: Optional[str] = None,
        quantization_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        check_quantization(quantization, quantization_options)
        unknown = set(rouge_keys) - set(ROUGE_KEYS)
        if unknown:
            raise ValueError(f"unknown rouge_keys {sorted(unknown)}; choose from {ROUGE_KEYS}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        self.save_hyperparameters()
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        path = resolve_pretrained(model_name_or_path)
        kwargs = dict(model_kwargs or {})
        if dropout is not None:
            config = AutoConfig.from_pretrained(path)
            for attr in ("dropout", "dropout_rate"):
                if hasattr(config, attr):
                    kwargs[attr] = dropout
        load = functools.partial(AutoModelForSeq2SeqLM.from_pretrained, path)
        self.model = load_model(load, quantization, quantization_options, in_memory=True, **kwargs).train()
        self._tok: Any = None
        self._reset_eval()
        self._epoch_start: Optional[float] = None
        self._epoch_generation = 0.0

    def _reset_eval(self) -> None:
        self._preds: list[tuple[int, str]] = []
        self._refs_from_labels: dict[int, str] = {}
        self._generation_seconds = 0.0
        self._eval_start = time.perf_counter()
        self.last_predictions: list[str] = []
        self.last_metrics: dict[str, float] = {}

    def _tokenizer(self) -> Any:
        if self._tok is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            self._tok = getattr(dm, "tokenizer", None)
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(resolve_pretrained(self.hparams.model_name_or_path))
        return self._tok

    def generation_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        kw: dict[str, Any] = {"num_beams": hp.num_beams}
        for name, key in (
            ("generation_max_length", "max_length"),
            ("generation_min_length", "min_length"),
            ("length_penalty", "length_penalty"),
            ("no_repeat_ngram_size", "no_repeat_ngram_size"),
            ("early_stopping", "early_stopping"),
        ):
            if hp[name] is not None:
                kw[key] = hp[name]
        if hp.num_beams == 1:
            kw.pop("early_stopping", None)
            kw.pop("length_penalty", None)
        return kw

    # -- steps -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None and "decoder_input_ids" not in inputs:  # shifted labels; the loss is ours
            inputs["decoder_input_ids"] = prepare(labels=batch["labels"])
            return self.model(**inputs)
        return self.model(**inputs, labels=batch["labels"])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        loss = self._loss(out.logits, batch["labels"], self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Summaries of a batch (decoded, special tokens removed)."""
        start = time.perf_counter()
        ids = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **self.generation_kwargs())
        self._generation_seconds += time.perf_counter() - start
        return [t.strip() for t in self._tokenizer().batch_decode(ids, skip_special_tokens=True)]

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        n = batch["input_ids"].shape[0]
        out = self(batch)
        self.log(f"{stage}/loss", self._loss(out.logits, batch["labels"]), on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        texts = self.generate(batch)
        idx = batch["idx"].tolist() if "idx" in batch else list(range(len(self._preds), len(self._preds) + n))
        self._preds.extend(zip(idx, texts))
        dm = getattr(self.trainer, "datamodule", None)
        if not callable(getattr(dm, "references", None)):
            labels = batch["labels"].masked_fill(batch["labels"] == -100, self._tokenizer().pad_token_id)
            for i, t in zip(idx, self._tokenizer().batch_decode(labels, skip_special_tokens=True)):
                self._refs_from_labels[i] = t.strip()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    on_test_epoch_start = on_validation_epoch_start

    def _finish(self, stage: str) -> None:
        preds, label_refs = list(self._preds), dict(self._refs_from_labels)
        gen_seconds = self._generation_seconds
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (preds, label_refs, gen_seconds))
            preds = [p for g in gathered for p in g[0]]
            label_refs = {k: v for g in gathered for k, v in g[1].items()}
            gen_seconds = max(g[2] for g in gathered)
        if not preds:
            return
        by_idx = dict(sorted(preds))  # DistributedSampler may repeat rows to even out ranks
        dm = getattr(self.trainer, "datamodule", None)
        refs_all = dm.references(stage) if callable(getattr(dm, "references", None)) else None
        order = sorted(by_idx)
        predictions = [by_idx[i] for i in order]
        references = [refs_all[i] for i in order] if refs_all is not None else [label_refs[i] for i in order]
        metrics = rouge_scores(predictions, references, self.hparams.rouge_keys, self.hparams.use_stemmer)
        tok = self._tokenizer()
        metrics["gen_len"] = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in predictions) / len(predictions)
        elapsed = time.perf_counter() - self._eval_start
        metrics["generation_seconds"] = gen_seconds
        metrics["validation_seconds"] = elapsed
        metrics["generation_share"] = gen_seconds / elapsed if elapsed > 0 else 0.0
        self.last_predictions, self.last_metrics = predictions, metrics
        if self.hparams.save_predictions and self.trainer.is_global_zero and not getattr(self.trainer, "sanity_checking", False):
            import json
            from pathlib import Path

            out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            rows = (json.dumps({"idx": i, "prediction": p, "reference": r}, ensure_ascii=False) for i, p, r in zip(order, predictions, references))
            (out / f"predictions_{stage}.jsonl").write_text("".join(r + "\n" for r in rows))
        if stage == "val" and not getattr(self.trainer, "sanity_checking", False):
            self._epoch_generation += gen_seconds
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", float(v), prog_bar=k in ("rouge1", "rouge2", "rougeL"))

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_generation = 0.0

    def on_train_epoch_end(self) -> None:
        if self._epoch_start is not None and self._epoch_generation > 0:
            wall = time.perf_counter() - self._epoch_start
            self.log("time/generation_share_of_epoch", self._epoch_generation / wall if wall > 0 else 0.0)
            self.log("time/epoch_seconds", wall)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"predictions": self.generate(batch)}
        if "idx" in batch:
            out["idx"] = batch["idx"].cpu()
        return out

    def configure_optimizers(self) -> Any:
        return configure_adamw(self)


SummarizationModule = Seq2SeqModule

__all__ = ["ROUGE_KEYS", "Seq2SeqModule", "SummarizationModule", "rouge_scores", "split_sentences"]
