"""SquadDataModule: hub-schema and official-format files, windows across boundaries, v2, clear errors."""

import json
from pathlib import Path

import pytest

from tasks.squad import HUB_DATASETS, SquadDataModule, read_official_json

FIX = Path(__file__).parent / "fixtures" / "squad"
TINY = str(FIX / "tiny_deberta")


def dm(version="v1", **kw):
    kw.setdefault("data_dir", str(FIX / version))
    module = SquadDataModule(TINY, version=version, max_length=32, doc_stride=8, batch_size=4, **kw)
    module.setup("fit")
    return module


def decode_answer(module, feature):
    ids = feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1]
    return module.tokenizer.decode(ids)


def test_v1_hub_schema_train_and_official_validation():
    m = dm("v1")
    assert len(m._raw["train"]) == 8 and [e["id"] for e in m.eval_examples()] == ["v1", "v2", "v3"]
    assert not m.version_2_with_negative and m.dataset == HUB_DATASETS["v1"] == "rajpurkar/squad"
    # every training window that holds its answer is labelled with exactly the answer's tokens
    for f in m._features["train"]:
        ex = m._raw["train"][f["example_idx"]]
        if f["start_positions"] != 0:
            assert decode_answer(m, f) == ex["answers"]["text"][0].lower()
    batch = next(iter(m.val_dataloader()))
    assert {"input_ids", "attention_mask", "offset_mapping", "example_idx", "start_positions"} <= set(batch)
    assert batch["offset_mapping"].shape == (*batch["input_ids"].shape, 2)
    # offsets point into the context, -1 outside it (CLS, question, SEP, padding)
    assert (batch["offset_mapping"][:, 0] == -1).all()


def test_an_answer_across_a_window_boundary():
    m = dm("v1")
    examples = m.eval_examples()
    idx = [e["id"] for e in examples].index("v2")  # "Thomas Hardwick in 1820" in the long context
    windows = [f for f in m._features["validation"] if f["example_idx"] == idx]
    assert len(windows) == 3
    context = examples[idx]["context"]
    answer_start = context.index("Thomas Hardwick in 1820")
    answer_end = answer_start + len("Thomas Hardwick in 1820")
    # window 1 starts the answer but cuts it ("... thomas hardwick [SEP]"): labelled CLS (no whole answer)
    ends = [max(o[1] for o in w["offset_mapping"]) for w in windows]
    assert answer_start < ends[1] < answer_end
    assert (windows[1]["start_positions"], windows[1]["end_positions"]) == (0, 0)
    # window 2 holds all of it; consecutive windows share doc_stride context tokens
    assert decode_answer(m, windows[2]) == "thomas hardwick in 1820"
    ctx_tokens = [[tuple(o) for o in w["offset_mapping"] if o[0] >= 0] for w in windows]
    assert ctx_tokens[0][-8:] == ctx_tokens[1][:8]


def test_v2_csv_with_json_answers_and_an_unanswerable_question():
    m = dm("v2")
    assert m.version_2_with_negative and m.dataset == "rajpurkar/squad_v2"
    train = m._raw["train"]
    no_answer = [i for i, a in enumerate(train["answers"]) if not a["text"]]
    assert len(no_answer) == 2
    for f in m._features["train"]:
        if f["example_idx"] in no_answer:
            assert (f["start_positions"], f["end_positions"]) == (0, 0)
    v4 = [e for e in m.eval_examples() if e["id"] == "v4"][0]
    assert v4["answers"] == {"text": [], "answer_start": []}


def test_official_reader_marks_impossible_questions(tmp_path):
    records = read_official_json(FIX / "v2" / "validation.json")
    assert [r["id"] for r in records] == ["v1", "v2", "v3", "v4"] and records[3]["answers"]["text"] == []
    data = json.loads((FIX / "v2" / "validation.json").read_text())
    data["data"][3]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "ignored", "answer_start": 0}]  # plausible only
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    assert read_official_json(path)[3]["answers"]["text"] == []


def test_answer_not_in_context_fails_naming_the_example():
    with pytest.raises(ValueError, match=r"example 'b1': answer 'on the rug' is not in the context at answer_start=12"):
        dm("v1", data_dir=None, data_files={"validation": str(FIX / "malformed" / "answer_not_in_context.jsonl")})


def test_missing_columns_and_other_mistakes_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"has no column\(s\) \['question'\]"):
        dm("v1", data_dir=None, data_files={"validation": str(FIX / "malformed" / "no_question.jsonl")})
    with pytest.raises(ValueError, match="has no answer; SQuAD v1.1"):
        dm("v1", data_dir=str(FIX / "v2"))  # v2 data has unanswerable questions
    with pytest.raises(ValueError, match="version must be v1"):
        SquadDataModule(TINY, version="v3")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SquadDataModule(TINY, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="doc_stride"):
        SquadDataModule(TINY, max_length=32, doc_stride=32)
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "x", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": [0]}}) + "\n")
    with pytest.raises(ValueError, match="no validation split 'validation'"):
        dm("v1", data_dir=str(tmp_path))


def test_data_wrapped_hub_records_and_parquet(tmp_path):
    rows = [json.loads(line) for line in (FIX / "v1" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "validation.json").write_text(json.dumps({"version": "x", "data": rows[:3]}))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    m = dm("v1", data_dir=None, data_files={"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "validation.json")})
    assert [e["id"] for e in m.eval_examples()] == ["t1", "t2", "t3"] and len(m._raw["train"]) == 8
