"""Extractive question answering (SQuAD v1.1 / v2.0) over any ``AutoModelForQuestionAnswering``.

A plain LightningModule like ``SequenceClassificationModule``: the model is built in ``__init__``, a method
callback (``rocoft_pl.RoCoFT``) may freeze it in ``setup()``, and the optimizer takes only the parameters that
still require gradients (AdamW, warm-up, then cosine / linear / constant).

Training: cross-entropy on the start and end positions of each window (the datamodule labels windows
without the answer, and unanswerable questions, with the CLS position).

Evaluation follows the usual recipe for SQuAD with window splitting (Hugging Face ``run_qa``'s
``postprocess_qa_predictions``): in every window of an example, the ``n_best_size`` best start and end
logits are paired; spans outside the context, reversed, or longer than ``max_answer_length`` tokens are
skipped; a span scores ``start_logit + end_logit``; the best span over *all windows of the example* is the
answer, cut from the context with the tokenizer's character offsets. For v2 the null score of an example is
the smallest ``start_logit[CLS] + end_logit[CLS]`` over its windows, and the answer is empty when
``null_score - best_span_score > null_score_diff_threshold``. Windows of one example may sit in different
batches (and on different ranks): their candidates are collected per example and combined at the end of
the validation epoch.

Metrics are those of the official evaluation scripts, re-implemented here (``squad_v1_evaluate`` for
v1.1, ``squad_v2_evaluate`` for v2.0 with its HasAns / NoAns breakdown and best-threshold search),
in percent as those scripts print them: ``val/exact_match``, ``val/f1`` (+ ``val/HasAns_exact``,
``val/HasAns_f1``, ``val/NoAns_exact``, ``val/NoAns_f1``, ``val/best_exact``, ``val/best_f1``,
``val/best_f1_thresh`` for v2) and ``val/loss``.

The datamodule contract (``tasks.squad.SquadDataModule`` fulfils it): validation batches carry
``example_idx`` (an index into ``datamodule.eval_examples(stage)``, a list of dicts with ``id``, ``context``
and ``answers`` = ``{"text": [...], "answer_start": [...]}``) and ``offset_mapping`` (character offsets of
each token in the context, ``-1`` for tokens outside the context); training batches carry
``start_positions`` and ``end_positions``.
"""

from __future__ import annotations

import functools
import collections
import math
import re
import string
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import nn

from .classification import resolve_pretrained
from .optim import check_scheduler, configure_adamw
from .quantization import check_quantization, load_model

_NOT_MODEL_INPUTS = ("example_idx", "offset_mapping", "start_positions", "end_positions")


# -- the official SQuAD evaluation (evaluate-v1.1.py / evaluate-v2.0.py), re-implemented ---------------
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (both official scripts)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)  # v2.0 compiles this with re.UNICODE (py3 default)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def f1_v1(prediction: str, ground_truth: str) -> float:
    """evaluate-v1.1.py ``f1_score``."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_v1(prediction: str, ground_truth: str) -> float:
    """evaluate-v1.1.py ``exact_match_score``."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def compute_exact(a_gold: str, a_pred: str) -> int:
    """evaluate-v2.0.py ``compute_exact``."""
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    """evaluate-v2.0.py ``compute_f1`` (an empty answer scores 1 only against an empty answer)."""
    gold_toks = _tokens(a_gold)
    pred_toks = _tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _answer_texts(example: dict[str, Any]) -> list[str]:
    answers = example.get("answers") or {}
    return list(answers.get("text", []) if isinstance(answers, dict) else [a["text"] for a in answers])


def squad_v1_evaluate(examples: Sequence[dict[str, Any]], predictions: dict[str, str]) -> dict[str, float]:
    """evaluate-v1.1.py ``evaluate``: ``{"exact_match", "f1"}`` in percent over ``examples`` (dicts with
    ``id`` and ``answers``). A question without a prediction counts 0 (the script warns "Unanswered question")."""
    f1 = exact_match = total = 0.0
    for ex in examples:
        total += 1
        if ex["id"] not in predictions:
            continue
        ground_truths = _answer_texts(ex)
        prediction = predictions[ex["id"]]
        exact_match += max(exact_v1(prediction, gt) for gt in ground_truths)
        f1 += max(f1_v1(prediction, gt) for gt in ground_truths)
    total = max(total, 1)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _raw_scores(examples: Sequence[dict[str, Any]], preds: dict[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    exact_scores: dict[str, int] = {}
    f1_scores: dict[str, float] = {}
    for ex in examples:
        qid = ex["id"]
        gold_answers = [a for a in _answer_texts(ex) if normalize_answer(a)]
        if not gold_answers:
            gold_answers = [""]  # For unanswerable questions, only correct answer is empty string
        if qid not in preds:
            continue  # the script prints "Missing prediction for ..."
        a_pred = preds[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def _apply_no_ans_threshold(scores: dict[str, float], na_probs: dict[str, float], qid_to_has_ans: dict[str, bool], thresh: float) -> dict[str, float]:
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > thresh
        new_scores[qid] = float(not qid_to_has_ans[qid]) if pred_na else s
    return new_scores


def _make_eval_dict(exact_scores: dict[str, float], f1_scores: dict[str, float], qid_list: Optional[list[str]] = None) -> dict[str, float]:
    if not qid_list:
        total = len(exact_scores)
        return {
            "exact": 100.0 * sum(exact_scores.values()) / max(total, 1),
            "f1": 100.0 * sum(f1_scores.values()) / max(total, 1),
            "total": total,
        }
    total = len(qid_list)
    return {
        "exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
        "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total,
        "total": total,
    }


def _find_best_thresh(preds: dict[str, str], scores: dict[str, float], na_probs: dict[str, float], qid_to_has_ans: dict[str, bool]) -> tuple[float, float]:
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2_evaluate(
    examples: Sequence[dict[str, Any]],
    predictions: dict[str, str],
    na_probs: Optional[dict[str, float]] = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """evaluate-v2.0.py ``main``: ``exact``, ``f1``, ``total``, ``HasAns_*`` / ``NoAns_*`` when present, and with
    ``na_probs`` (higher = more likely unanswerable) ``best_exact``, ``best_exact_thresh``, ``best_f1``,
    ``best_f1_thresh``. Scores in percent. Without ``na_probs`` every probability is 0, as in the script."""
    qid_to_has_ans = {ex["id"]: bool(_answer_texts(ex)) for ex in examples}
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    probs = dict(na_probs) if na_probs is not None else {k: 0.0 for k in predictions}
    exact_raw, f1_raw = _raw_scores(examples, predictions)
    exact_thresh = _apply_no_ans_threshold(exact_raw, probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = _apply_no_ans_threshold(f1_raw, probs, qid_to_has_ans, na_prob_thresh)
    out = _make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        for k, v in _make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids).items():
            out[f"HasAns_{k}"] = v
    if no_ans_qids:
        for k, v in _make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids).items():
            out[f"NoAns_{k}"] = v
    if na_probs is not None:
        best_exact, exact_t = _find_best_thresh(predictions, exact_raw, probs, qid_to_has_ans)
        best_f1, f1_t = _find_best_thresh(predictions, f1_raw, probs, qid_to_has_ans)
        out.update(best_exact=best_exact, best_exact_thresh=exact_t, best_f1=best_f1, best_f1_thresh=f1_t)
    return out


# -- span extraction ----------------------------------------------------------------------------------
def window_candidates(
    start_logits: Sequence[float],
    end_logits: Sequence[float],
    offsets: Sequence[Sequence[int]],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    cls_index: int = 0,
) -> tuple[list[tuple[float, int, int]], float]:
    """The ``n_best_size`` best spans of one window: ``([(score, char_start, char_end), ...], null_score)``.

    ``offsets[i]`` is the (start, end) character range of token i in the context, negative for tokens
    outside the context (question, special tokens, padding).
    """
    start = torch.as_tensor(start_logits, dtype=torch.float64)
    end = torch.as_tensor(end_logits, dtype=torch.float64)
    offs = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
    null_score = float(start[cls_index] + end[cls_index])
    k = min(n_best_size, start.numel())
    start_idx = torch.topk(start, k).indices.tolist()  # ties: torch order; the reference uses argsort
    end_idx = torch.topk(end, k).indices.tolist()
    cands = []
    for s in start_idx:
        if offs[s, 0] < 0:
            continue
        for e in end_idx:
            if offs[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            cands.append((float(start[s] + end[e]), int(offs[s, 0]), int(offs[e, 1])))
    # the example's answer is among the n best of some window: keep only those (memory, all_gather)
    cands.sort(key=lambda c: c[0], reverse=True)
    return cands[:n_best_size], null_score


def best_answers(
    examples: Sequence[dict[str, Any]],
    candidates: dict[int, list[tuple[float, int, int]]],
    null_scores: dict[int, float],
    version_2_with_negative: bool,
    null_score_diff_threshold: float = 0.0,
    n_best_size: int = 20,
) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """Combine the windows' candidates per example. Returns ``(predictions, score_diffs, best_spans)`` by id:
    the answers (empty for predicted no-answer in v2), ``null_score - best_span_score`` (v2's no-answer score,
    larger = more likely unanswerable; empty for v1) and the best non-null span texts."""
    predictions: dict[str, str] = {}
    diffs: dict[str, float] = {}
    spans: dict[str, str] = {}
    for i, ex in enumerate(examples):
        cands = sorted(candidates.get(i, []), key=lambda c: c[0], reverse=True)[:n_best_size]
        null = null_scores.get(i, math.inf)
        if cands:
            score, cs, ce = cands[0]
            text = ex["context"][cs:ce]
        else:
            score, text = -math.inf, ""  # no valid span in any window (the reference predicts "empty")
        spans[ex["id"]] = text
        if version_2_with_negative:
            diff = null - score if cands else math.inf
            diffs[ex["id"]] = diff
            predictions[ex["id"]] = "" if diff > null_score_diff_threshold else text
        else:
            predictions[ex["id"]] = text
    return predictions, diffs, spans


class QuestionAnsweringModule(pl.LightningModule):
    """Fine-tune an extractive QA model (start/end logits).

    Args:
        model_name_or_path: hub id (e.g. ``microsoft/deberta-v3-base``), local directory or ``pkg:<module>``.
        learning_rate, head_learning_rate, weight_decay, adam_epsilon, adam_betas, warmup_steps,
        warmup_ratio, scheduler: as ``SequenceClassificationModule`` (the head is ``qa_outputs``).
        hidden_dropout: ``config.hidden_dropout_prob``; None keeps the model's.
        n_best_size: start and end candidates per window.
        max_answer_length: longest answer in tokens.
        version_2_with_negative: allow "no answer" (SQuAD v2.0); None: the datamodule's setting.
        null_score_diff_threshold: v2: predict no answer when ``null - best > threshold``.
        save_predictions: write ``<log_dir>/predictions_<stage>.json`` (``{id: answer}``, the official scripts'
            input) after each evaluation, and for v2 ``null_odds_<stage>.json`` (their ``--na-prob-file``).
        model_kwargs: more ``from_pretrained`` keyword arguments.
        quantization, quantization_options: load W0 quantized, frozen, as ``SequenceClassificationModule`` does
            (only the Linears of the transformer blocks, after loading; embeddings and the head stay as loaded).
    """

    def __init__(
        self,
        model_name_or_path: str,
        learning_rate: Union[float, Literal["auto"]] = 1e-4,
        head_learning_rate: Optional[float] = None,
        weight_decay: float = 0.0,
        adam_epsilon: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        warmup_ratio: Optional[float] = None,
        scheduler: str = "cosine",
        hidden_dropout: Optional[float] = None,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: Optional[bool] = None,
        null_score_diff_threshold: float = 0.0,
        save_predictions: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        quantization: Optional[str] = None,
        quantization_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        check_quantization(quantization, quantization_options)
        if n_best_size < 1 or max_answer_length < 1:
            raise ValueError(f"n_best_size and max_answer_length must be >= 1, got {n_best_size}, {max_answer_length}")
        self.save_hyperparameters()
        from transformers import AutoModelForQuestionAnswering

        kwargs = dict(model_kwargs or {})
        if hidden_dropout is not None:
            kwargs["hidden_dropout_prob"] = hidden_dropout
        load = functools.partial(AutoModelForQuestionAnswering.from_pretrained, resolve_pretrained(model_name_or_path))
        self.model = load_model(load, quantization, quantization_options, in_memory=True, **kwargs).train()
        self._reset_eval()

    def _reset_eval(self) -> None:
        self._candidates: dict[int, list[tuple[float, int, int]]] = collections.defaultdict(list)
        self._null_scores: dict[int, float] = {}
        self.last_predictions: dict[str, str] = {}
        self.last_metrics: dict[str, float] = {}

    @property
    def version_2_with_negative(self) -> bool:
        if self.hparams.version_2_with_negative is not None:
            return bool(self.hparams.version_2_with_negative)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return bool(getattr(dm, "version_2_with_negative", False))

    # -- steps -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS})

    def _loss(self, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seq = out.start_logits.shape[1]
        start = batch["start_positions"].clamp(0, seq)
        end = batch["end_positions"].clamp(0, seq)
        ce = nn.CrossEntropyLoss(ignore_index=seq)
        return (ce(out.start_logits.float(), start) + ce(out.end_logits.float(), end)) / 2

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _collect(self, start_logits: torch.Tensor, end_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        start = start_logits.float().cpu()
        end = end_logits.float().cpu()
        if "offset_mapping" not in batch or "example_idx" not in batch:
            raise ValueError("QA evaluation needs batches with offset_mapping and example_idx (see tasks.squad.SquadDataModule)")
        offsets = batch["offset_mapping"].cpu()  # padding has offsets -1, so it is never part of a span
        for i, ex in enumerate(batch["example_idx"].tolist()):
            cands, null = window_candidates(
                start[i], end[i], offsets[i], self.hparams.n_best_size, self.hparams.max_answer_length,
                cls_index=self._cls_index(batch, i),
            )
            self._candidates[ex].extend(cands)
            self._null_scores[ex] = min(null, self._null_scores.get(ex, math.inf))

    def _cls_index(self, batch: dict[str, torch.Tensor], i: int) -> int:
        cls_id = getattr(self._tokenizer(), "cls_token_id", None)  # the null answer points at CLS
        if cls_id is not None:
            hits = (batch["input_ids"][i] == cls_id).nonzero()
            if len(hits):
                return int(hits[0])
        return 0

    def _tokenizer(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "tokenizer", None)

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        n = batch["input_ids"].shape[0]
        if "start_positions" in batch:
            self.log(f"{stage}/loss", self._loss(out, batch), on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self._collect(out.start_logits, out.end_logits, batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    on_test_epoch_start = on_validation_epoch_start

    def _finish(self, stage: str) -> None:
        candidates, nulls = dict(self._candidates), dict(self._null_scores)
        if self.trainer.world_size > 1:  # windows of one example may have gone to different ranks
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (candidates, nulls))
            candidates, nulls = collections.defaultdict(list), {}
            for c, ns in gathered:
                for k, v in c.items():
                    candidates[k].extend(v)
                for k, v in ns.items():
                    nulls[k] = min(v, nulls.get(k, math.inf))
        dm = getattr(self.trainer, "datamodule", None)
        if not callable(getattr(dm, "eval_examples", None)):
            raise ValueError("QA evaluation needs a datamodule with eval_examples(stage) (e.g. tasks.squad.SquadDataModule)")
        all_examples = dm.eval_examples(stage)
        seen = sorted(nulls)
        if len(seen) < len(all_examples):  # sanity check or limit_val_batches: score the examples seen
            examples = [all_examples[i] for i in seen]
            candidates = {j: candidates.get(i, []) for j, i in enumerate(seen)}
            nulls = {j: nulls[i] for j, i in enumerate(seen)}
        else:
            examples = list(all_examples)
        if not examples:
            return
        v2 = self.version_2_with_negative
        preds, diffs, spans = best_answers(
            examples, candidates, nulls, v2, self.hparams.null_score_diff_threshold, self.hparams.n_best_size
        )
        if v2:
            res = squad_v2_evaluate(examples, preds)
            metrics = {"exact_match": res["exact"], "f1": res["f1"]}
            metrics.update({k: v for k, v in res.items() if k.startswith(("HasAns_", "NoAns_")) and not k.endswith("_total")})
            # the official best-threshold search over the null-score differences: best_f1_thresh is the
            # null_score_diff_threshold that would have scored best_f1 on this set
            best = squad_v2_evaluate(examples, spans, na_probs=diffs)
            metrics.update({k: v for k, v in best.items() if k.startswith("best_")})
        else:
            metrics = squad_v1_evaluate(examples, preds)
        self.last_predictions, self.last_metrics = preds, metrics
        if self.hparams.save_predictions and self.trainer.is_global_zero and not getattr(self.trainer, "sanity_checking", False):
            self._write_predictions(stage, preds, diffs if v2 else None)
        for k, v in metrics.items():
            if math.isfinite(v):
                self.log(f"{stage}/{k}", float(v), prog_bar=k in ("exact_match", "f1"))

    def _write_predictions(self, stage: str, preds: dict[str, str], diffs: Optional[dict[str, float]]) -> None:
        import json
        from pathlib import Path

        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"predictions_{stage}.json").write_text(json.dumps(preds, indent=1, ensure_ascii=False))
        if diffs is not None:  # finite stand-in for "no span at all", as JSON has no infinity
            odds = {k: (v if math.isfinite(v) else 1e9) for k, v in diffs.items()}
            (out / f"null_odds_{stage}.json").write_text(json.dumps(odds, indent=1))

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        out = self(batch)
        return {"start_logits": out.start_logits.float().cpu(), "end_logits": out.end_logits.float().cpu(), "example_idx": batch["example_idx"].cpu()}

    def configure_optimizers(self) -> Any:
        return configure_adamw(self)


QAModule = QuestionAnsweringModule

__all__ = [
    "QAModule",
    "QuestionAnsweringModule",
    "best_answers",
    "compute_exact",
    "compute_f1",
    "normalize_answer",
    "squad_v1_evaluate",
    "squad_v2_evaluate",
    "window_candidates",
]
