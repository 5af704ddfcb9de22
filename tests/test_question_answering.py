"""QuestionAnsweringModule: exact SQuAD evaluation on hand-made logits, default targets, `rocoft fit`."""

import collections
import re
import string
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from rocoft_pl.modules.question_answering import (
    QuestionAnsweringModule,
    best_answers,
    compute_f1,
    normalize_answer,
    squad_v1_evaluate,
    squad_v2_evaluate,
    window_candidates,
)
from tasks.squad import SquadDataModule

ROOT = Path(__file__).parent.parent
FIX = ROOT / "tests" / "fixtures" / "squad"
TINY = str(FIX / "tiny_deberta")


# -- an independent, line-by-line transcription of the official scripts (evaluate-v1.1.py, evaluate-v2.0.py)
def _off_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_v1(dataset, predictions):
    def f1_score(prediction, ground_truth):
        prediction_tokens = _off_normalize(prediction).split()
        ground_truth_tokens = _off_normalize(ground_truth).split()
        common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    def exact_match_score(prediction, ground_truth):
        return _off_normalize(prediction) == _off_normalize(ground_truth)

    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(exact_match_score(prediction, gt) for gt in ground_truths)
                f1 += max(f1_score(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def official_v2(dataset, preds, na_probs=None, na_prob_thresh=1.0):
    def get_tokens(s):
        return _off_normalize(s).split() if s else []

    def compute_exact(a_gold, a_pred):
        return int(_off_normalize(a_gold) == _off_normalize(a_pred))

    def f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(pred_toks)
        recall = 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    qid_to_has_ans = {}
    exact_scores, f1_scores = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
                gold = [a["text"] for a in qa["answers"] if _off_normalize(a["text"])] or [""]
                exact_scores[qa["id"]] = max(compute_exact(a, preds[qa["id"]]) for a in gold)
                f1_scores[qa["id"]] = max(f1(a, preds[qa["id"]]) for a in gold)
    na = na_probs or {k: 0.0 for k in preds}

    def thresh(scores):
        return {q: (float(not qid_to_has_ans[q]) if na[q] > na_prob_thresh else s) for q, s in scores.items()}

    ex, f = thresh(exact_scores), thresh(f1_scores)
    out = {"exact": 100.0 * sum(ex.values()) / len(ex), "f1": 100.0 * sum(f.values()) / len(f), "total": len(ex)}
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        ids = [q for q, h in qid_to_has_ans.items() if h == keep]
        if ids:
            out[f"{prefix}_exact"] = 100.0 * sum(ex[q] for q in ids) / len(ids)
            out[f"{prefix}_f1"] = 100.0 * sum(f[q] for q in ids) / len(ids)
            out[f"{prefix}_total"] = len(ids)
    if na_probs is not None:
        for name, raw in (("exact", exact_scores), ("f1", f1_scores)):
            cur = best = sum(1 for h in qid_to_has_ans.values() if not h)
            best_t = 0.0
            for q in sorted(na, key=lambda k: na[k]):
                cur += raw[q] if qid_to_has_ans[q] else (-1 if preds[q] else 0)
                if cur > best:
                    best, best_t = cur, na[q]
            out[f"best_{name}"], out[f"best_{name}_thresh"] = 100.0 * best / len(raw), best_t
    return out


def as_official(examples):
    return [
        {"paragraphs": [{"context": e["context"], "qas": [{"id": e["id"], "answers": [{"text": t} for t in e["answers"]["text"]]}]}]}
        for e in examples
    ]


PAIRS = [
    ("The Nobel Prize", "nobel prize!"),
    ("an apple, a pear", "apple pear"),
    ("Thomas Hardwick", "Hardwick Thomas Hardwick"),
    ("1,000", "1000"),
    ("", ""),
    ("", "something"),
    ("the", ""),
    ("Élan vital", "élan"),
]


def test_metric_functions_match_the_official_transcription():
    examples = [{"id": f"q{i}", "context": "", "answers": {"text": [g] if g else [], "answer_start": [0] if g else []}} for i, (g, _) in enumerate(PAIRS)]
    preds = {f"q{i}": p for i, (_, p) in enumerate(PAIRS)}
    answered = [e for e in examples if e["answers"]["text"]]
    assert squad_v1_evaluate(answered, preds) == pytest.approx(official_v1(as_official(answered), preds))
    na = {q: 0.1 * i for i, q in enumerate(preds)}
    assert squad_v2_evaluate(examples, preds) == pytest.approx(official_v2(as_official(examples), preds))
    assert squad_v2_evaluate(examples, preds, na_probs=na) == pytest.approx(official_v2(as_official(examples), preds, na))
    assert normalize_answer("  The  Cat's, hat! ") == "cats hat"
    assert compute_f1("the cat sat", "a cat") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_window_candidates_respect_context_order_and_max_length():
    start = [9.0, 0, 5, 0, 0, 0]
    end = [9.0, 0, 0, 0, 4, 6]
    offsets = [[-1, -1], [0, 3], [4, 7], [8, 11], [12, 15], [16, 19]]
    cands, null = window_candidates(start, end, offsets, n_best_size=6, max_answer_length=3)
    assert null == 18.0  # CLS + CLS
    best = max(cands)
    assert best == (9.0, 4, 15)  # start 2 + end 4 (end 5 is 4 tokens away, longer than 3)
    assert all(s <= e for _, s, e in cands)


def _datamodule(version, **kw):
    dm = SquadDataModule(TINY, version=version, data_dir=str(FIX / version), max_length=32, doc_stride=8, batch_size=4, eval_batch_size=1, **kw)
    dm.setup("validate")
    return dm


def _token_span(dm, feature, text, context):
    """Token indices of ``text`` (the first match) inside a validation window, or None."""
    cs = context.index(text)
    ce = cs + len(text)
    offs = feature["offset_mapping"]
    s = next((k for k, o in enumerate(offs) if o[0] == cs), None)
    e = next((k for k, o in enumerate(offs) if o[1] == ce), None)
    return (s, e) if s is not None and e is not None else None


class HandLogits(QuestionAnsweringModule):
    """The model's logits replaced by a table: (example_idx, window number) -> (start, end) logits."""

    def __init__(self, table, **kw):
        super().__init__(TINY, **kw)
        self.table = table
        self.seen = collections.Counter()

    def forward(self, batch):
        starts, ends = [], []
        for i, ex in enumerate(batch["example_idx"].tolist()):
            s, e = self.table[(ex, self.seen[ex])]
            self.seen[ex] += 1
            width = batch["input_ids"].shape[1]
            starts.append(torch.nn.functional.pad(s, (0, width - len(s)), value=-100.0))
            ends.append(torch.nn.functional.pad(e, (0, width - len(e)), value=-100.0))
        return collections.namedtuple("Out", "start_logits end_logits")(torch.stack(starts), torch.stack(ends))


def _table(dm, spans):
    """spans: example id -> list of (window number, answer text, start logit, end logit); null logits per window
    from ``nulls`` (example id -> value at CLS for start and end)."""
    examples = dm.eval_examples()
    by_id = {e["id"]: i for i, e in enumerate(examples)}
    windows = collections.defaultdict(list)
    for f in dm._features[dm.val_split]:
        windows[f["example_idx"]].append(f)
    table = {}
    for ex_idx, feats in windows.items():
        for w, f in enumerate(feats):
            n = len(f["input_ids"])
            table[(ex_idx, w)] = (torch.full((n,), -10.0), torch.full((n,), -10.0))
    for qid, items in spans.items():
        ex_idx = by_id[qid]
        for w, text, sl, el in items:
            s, e = table[(ex_idx, w)]
            if text is None:  # the null answer (CLS, position 0)
                s[0], e[0] = sl, el
                continue
            pos = _token_span(dm, windows[ex_idx][w], text, examples[ex_idx]["context"])
            assert pos is not None, (qid, w, text)
            s[pos[0]], e[pos[1]] = sl, el
    return table, windows


def _validate(module, dm):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_v1_hand_logits_give_the_official_scores_across_window_boundaries():
    dm = _datamodule("v1")
    table, windows = _table(
        dm,
        {
            "v1": [(0, "the mat", 5.0, 5.0)],  # gold "on the mat": EM 0, F1 2/3
            # "Thomas Hardwick in 1820" crosses the end of window 1 (of 0..2): window 1 offers the shorter span,
            # window 2 the whole answer with a higher score; the best over all windows wins
            "v2": [(1, "Thomas Hardwick", 6.0, 6.0), (2, "Thomas Hardwick in 1820", 7.0, 7.0)],
            "v3": [(0, "Rex ran fast", 3.0, 3.0)],  # gold "Rex": EM 0, F1 0.5
        },
    )
    assert len(windows[1]) == 3  # the long context is split
    module = HandLogits(table)
    metrics = _validate(module, dm)
    preds = module.last_predictions
    assert preds == {"v1": "the mat", "v2": "Thomas Hardwick in 1820", "v3": "Rex ran fast"}
    import json

    expected = official_v1(json.loads((FIX / "v1" / "validation.json").read_text())["data"], preds)
    assert metrics["val/exact_match"] == pytest.approx(expected["exact_match"]) == pytest.approx(100 / 3)
    assert metrics["val/f1"] == pytest.approx(expected["f1"]) == pytest.approx(100 * (2 / 3 + 1 + 0.5) / 3)


def test_v2_null_answers_threshold_and_breakdown():
    dm = _datamodule("v2")
    spans = {
        "v1": [(0, "on the mat", 4.0, 4.0), (0, None, 1.0, 1.0)],  # span 8 > null 2: answered, correct
        "v2": [(2, "Thomas Hardwick", 3.0, 3.0)] + [(w, None, 0.0, 0.0) for w in range(3)],  # 6 > 0
        "v3": [(0, "Rex", 1.0, 1.0), (0, None, 2.0, 2.0)],  # null 4 > span 2: predicted unanswerable (wrong)
        "v4": [(1, "The old mill", 1.0, 1.0)] + [(w, None, 5.0 - w, 5.0) for w in range(3)],  # min null 8 > 2: ""
    }
    table, _ = _table(dm, spans)
    module = HandLogits(table)
    metrics = _validate(module, dm)
    preds = module.last_predictions
    assert preds == {"v1": "on the mat", "v2": "Thomas Hardwick", "v3": "", "v4": ""}
    import json

    data = json.loads((FIX / "v2" / "validation.json").read_text())["data"]
    expected = official_v2(data, preds)
    assert metrics["val/exact_match"] == pytest.approx(expected["exact"]) == pytest.approx(50.0)
    assert metrics["val/f1"] == pytest.approx(expected["f1"])
    for k in ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert metrics[f"val/{k}"] == pytest.approx(expected[k]), k
    assert metrics["val/NoAns_exact"] == 100.0 and metrics["val/HasAns_exact"] == pytest.approx(100 / 3)
    # the official best-threshold search over the best spans and the null-score differences
    # (v1 -6, v2 -6, v3 4 - 2 = 2, v4 8 - 2 = 6): a threshold of 2 answers v3 ("Rex") and still not v4
    diffs = {"v1": -6.0, "v2": -6.0, "v3": 2.0, "v4": 6.0}
    spans_text = {"v1": "on the mat", "v2": "Thomas Hardwick", "v3": "Rex", "v4": "The old mill"}
    best = official_v2(data, spans_text, na_probs=diffs)
    assert metrics["val/best_exact"] == pytest.approx(best["best_exact"]) == pytest.approx(75.0)
    assert metrics["val/best_exact_thresh"] == pytest.approx(best["best_exact_thresh"]) == pytest.approx(2.0)
    assert metrics["val/best_f1"] == pytest.approx(best["best_f1"])
    module2 = HandLogits(table, null_score_diff_threshold=2.0)
    assert _validate(module2, dm)["val/exact_match"] == pytest.approx(75.0)
    assert module2.last_predictions["v3"] == "Rex" and module2.last_predictions["v4"] == ""


def test_best_answers_v1_ignores_null_scores():
    examples = [{"id": "a", "context": "abc def", "answers": {"text": ["abc"], "answer_start": [0]}}]
    preds, diffs, _ = best_answers(examples, {0: [(1.0, 0, 3), (5.0, 4, 7)]}, {0: 100.0}, version_2_with_negative=False)
    assert preds == {"a": "def"} and diffs == {}


def test_default_targets_cover_deberta_v2():
    from transformers import DebertaV2ForQuestionAnswering

    from rocoft_pl import RoCoFTConfig, apply_rocoft, rocoft_layers

    model = DebertaV2ForQuestionAnswering.from_pretrained(TINY)
    report = apply_rocoft(model, RoCoFTConfig(rank=1))
    names = sorted(rocoft_layers(model))
    expected = sorted(
        f"deberta.encoder.layer.{i}.{s}"
        for i in range(2)
        for s in ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj", "attention.output.dense", "intermediate.dense", "output.dense")
    )
    assert names == expected
    assert report.head_params == sum(p.numel() for p in model.qa_outputs.parameters())


def test_rocoft_fit_through_the_cli(tmp_path):
    from rocoft_pl.cli import RoCoFTCLI

    config = {
        "model": {"class_path": "rocoft_pl.modules.question_answering.QuestionAnsweringModule", "init_args": {"model_name_or_path": TINY, "learning_rate": 1e-2, "warmup_steps": 1, "save_predictions": True}},
        "data": {"class_path": "tasks.squad.SquadDataModule", "init_args": {"version": "v2", "data_dir": str(FIX / "v2"), "max_length": 32, "doc_stride": 8, "batch_size": 4}},
        "trainer": {
            "max_steps": 2, "val_check_interval": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "rocoft_pl.RoCoFT", "init_args": {"mode": "row", "rank": 1, "adapter_dir": str(tmp_path / "adapter")}}],
        },
    }
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = RoCoFTCLI(args=["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for k in ("val/exact_match", "val/f1", "val/HasAns_f1", "val/NoAns_exact", "val/loss"):
        assert k in metrics, k
    assert (tmp_path / "adapter").is_dir()
    import json

    written = json.loads((tmp_path / "predictions_val.json").read_text())
    assert set(written) == {"v1", "v2", "v3", "v4"} and written == cli.model.last_predictions
    assert set(json.loads((tmp_path / "null_odds_val.json").read_text())) == set(written)
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/exact_match", "test/f1", "test/NoAns_exact"} <= set(tested)


@pytest.mark.parametrize("name", ["v1.yaml", "v2.yaml"])
def test_squad_configs_parse_with_table10_values(name, capsys):
    from rocoft_pl.cli import RoCoFTCLI

    with pytest.raises(SystemExit):
        RoCoFTCLI(args=["fit", "--config", str(ROOT / "configs" / "squad" / name), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = printed["model"]["init_args"], printed["data"]["init_args"], printed["trainer"]
    assert (model["learning_rate"], trainer["max_epochs"], data["batch_size"], model["weight_decay"], model["warmup_steps"], model["scheduler"]) == (
        1e-4, 4, 16, 0.0, 100, "cosine")
    assert model["hidden_dropout"] == 0.1 and model["model_name_or_path"] == "microsoft/deberta-v3-base"
    rocoft = trainer["callbacks"][-1]["init_args"]
    assert (rocoft["rank"], rocoft["train_bias"], rocoft["selection"]) == (3, True, "random")
    assert data["version"] == name[:2] and model["version_2_with_negative"] == (name == "v2.yaml")
