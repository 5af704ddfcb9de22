"""tasks.reasoning: every dataset schema -> instruction rows, prompts, response-only labels, length-grouped
batches, left-padded evaluation batches, and the leakage guarantee (no gold rationale/answer in prompts)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl.preflight import PreflightError  # noqa: E402
from tasks.reasoning import (  # noqa: E402
    COMMONSENSE, DATASETS, IGNORE_INDEX, MATH, LengthGroupedSampler, ReasoningDataModule, build_prompt,
    to_instruction_row,
)

ALL_FILES = {**tl.DATASET_FILES, **tl.MERGED_FILES}


def make_dm(train=("commonsense_170k", "math_10k"), evals=tuple(ALL_FILES), **kwargs):
    dm = ReasoningDataModule("unused", train_datasets=list(train), eval_datasets=list(evals), data_files=ALL_FILES,
                             **kwargs)
    dm.tokenizer = tl.tiny_tokenizer()
    return dm


@pytest.fixture(scope="module")
def dm():
    d = make_dm(batch_size=2, eval_batch_size=3, max_length=512)
    d.setup("fit")
    return d


def test_registry_covers_the_paper_datasets():
    assert set(COMMONSENSE) == {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "openbookqa"}
    assert set(MATH) == {"multiarith", "gsm8k", "addsub", "singleeq", "svamp", "aqua", "mawps"}
    assert {"commonsense_170k", "math_10k"} <= set(DATASETS)
    assert DATASETS["arc-c"].hub_config == "ARC-Challenge" and DATASETS["gsm8k"].hub_id == "openai/gsm8k"
    assert DATASETS["mawps"].hub_id == "MU-NLPC/Calc-mawps" and DATASETS["mawps"].eval_split == "test"


@pytest.mark.parametrize("name", sorted(tl.DATASET_FILES))
def test_every_schema_becomes_an_instruction_row(name):
    rows = [json.loads(l) for l in Path(tl.DATASET_FILES[name]).read_text().splitlines()]
    converted = [to_instruction_row(name, r) for r in rows]
    expected = {
        "boolq": ["true", "false", "true"], "piqa": ["solution1", "solution2", "solution1"],
        "siqa": ["answer2", "answer1", "answer3"], "hellaswag": ["ending1", "ending2", "ending3"],
        "winogrande": ["option1", "option2", "option1"], "arc-e": ["answer2", "answer1", "answer3"],
        "arc-c": ["answer3", "answer1", "answer2"], "openbookqa": ["answer2", "answer1", "answer3"],
        "gsm8k": ["7", "12", "5000"], "multiarith": ["12", "16", "18"], "svamp": ["6", "15", "21"],
        "addsub": ["13", "13", "9"], "singleeq": ["6", "13", "13"], "aqua": ["B", "A", "E"],
        "mawps": ["9", "1.75", "24"],
    }[name]
    assert [c["answer"] for c in converted] == expected
    assert all(c["answer_type"] == DATASETS[name].answer_type for c in converted)
    for c in converted:
        assert c["output"].rstrip().endswith(c["answer"])  # the response states the answer at its end


def test_hub_ids_are_overridable_and_local_files_need_no_hub():
    dm = ReasoningDataModule("unused", eval_datasets=["boolq"], hub_ids={"boolq": {"path": "me/boolq", "eval_split": "dev"}})
    assert dm._hub("boolq") == ("me/boolq", None, "train", "dev")
    with pytest.raises(ValueError, match="no hub copy"):
        ReasoningDataModule("unused", eval_datasets=["addsub"])
    with pytest.raises(ValueError, match="unknown dataset"):
        ReasoningDataModule("unused", eval_datasets=["nope"])
    with pytest.raises(PreflightError, match="no such file /no/such.jsonl"):  # a ValueError: all bad inputs at once
        ReasoningDataModule("unused", eval_datasets=["boolq"], data_files={"boolq": "/no/such.jsonl"})


def test_templates():
    assert build_prompt("Do X", "").endswith("### Instruction:\nDo X\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in build_prompt("Do X", "ctx")
    assert build_prompt("Q?", "", "plain") == "Q?\nAnswer: "


def test_loss_on_the_response_only_by_default(dm):
    tok = dm.tokenizer
    row = to_instruction_row("math_10k", json.loads(Path(tl.MERGED_FILES["math_10k"]).read_text())[0])
    enc = dm.encode_train(row)
    prompt_len = len(tok(dm.prompt_of(row))["input_ids"])
    assert all(l == IGNORE_INDEX for l in enc["labels"][:prompt_len])
    assert enc["labels"][prompt_len:] == enc["input_ids"][prompt_len:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["labels"][prompt_len:-1]) == row["output"]
    on_inputs = make_dm(train_on_inputs=True).encode_train(row)
    assert on_inputs["labels"] == on_inputs["input_ids"]


def test_train_batches_are_right_padded_and_length_grouped(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
    lengths = [len(r["input_ids"]) for r in dm.train_rows]
    sampler = LengthGroupedSampler(lengths, batch_size=2, mega_batch_factor=100, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert max(lengths[i] for i in order[:2]) == max(lengths)  # the longest batch first
    spread = sum(abs(lengths[order[i]] - lengths[order[i + 1]]) for i in range(0, len(order) - 1, 2))
    rand = sum(abs(lengths[i] - lengths[i + 1]) for i in range(0, len(lengths) - 1, 2))
    assert spread <= rand


def test_length_grouped_sampler_shards_global_batches_across_ranks():
    lengths = list(range(40))
    one = LengthGroupedSampler(lengths, batch_size=4, num_replicas=1, seed=1, mega_batch_factor=2)
    ranks = [list(LengthGroupedSampler(lengths, batch_size=2, num_replicas=2, rank=r, seed=1, mega_batch_factor=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20 and not set(ranks[0]) & set(ranks[1])
    glob = [b for b in LengthGroupedSampler(lengths, batch_size=2, num_replicas=2, seed=1, mega_batch_factor=2).global_batches()]
    assert [b[0::2] for b in glob] == [ranks[0][i:i + 2] for i in range(0, 20, 2)]
    assert len(one) == 40
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_eval_batches_are_left_padded_with_answers_beside(dm):
    loaders = dm.val_dataloader()
    assert len(loaders) == len(ALL_FILES) and dm.val_names == list(ALL_FILES)
    batch = next(iter(loaders[dm.val_names.index("gsm8k")]))
    assert batch["answer"] == ["7", "12", "5000"] and batch["dataset"] == ["gsm8k"] * 3
    mask = batch["attention_mask"]
    assert mask[:, -1].all()  # every prompt ends at the last position
    assert (mask.cumsum(1) > 0).eq(mask.bool()).all()  # padding only on the left
    assert set(batch) == {"input_ids", "attention_mask", "answer", "answer_type", "dataset"}


def test_evaluation_prompts_never_contain_the_gold_rationale_or_answer(dm):
    """The reference code's math evaluation put the gold rationale (ending in the answer) into the prompt.
    Here the model's input is the instruction and input only: check every evaluation row of every dataset."""
    tok = dm.tokenizer
    checked = 0
    for name, rows in dm.eval_rows.items():
        raw = dm.raw_rows(name, "eval")
        for row, source in zip(rows, raw):
            full = to_instruction_row(name, source)
            text = tok.decode(row["input_ids"])
            assert text == row["prompt"] == dm.prompt_of(full)
            assert text.endswith("### Response:\n")  # nothing after the response marker
            assert full["output"] not in text
            assert "the correct answer is" not in text and "The answer is" not in text
            if DATASETS.get(name, DATASETS["math_10k"]).family == "math" and full["output"].count("\n"):
                rationale = full["output"].split("\n")[0].strip()
                assert rationale not in text, (name, rationale)
            if full["answer_type"] == "number":
                assert f" {full['answer']}" not in text.split("### Instruction:")[1] or full["answer"] in full["instruction"]
            checked += 1
        # and the collated batch the model receives holds exactly these tokens
        batch = dm.collate_eval(rows)
        for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], rows):
            assert ids[mask.bool()].tolist() == row["input_ids"]
    assert checked == sum(len(v) for v in dm.eval_rows.values()) >= 40


def test_max_eval_samples_and_heldout():
    d = make_dm(train=("commonsense_170k",), evals=(), val_fraction=0.25, max_eval_samples=1)
    d.setup("fit")
    assert d.val_names == ["heldout"] and len(d.eval_rows["heldout"]) == 1 and len(d.train_rows) == 3
    d = make_dm(train=(), evals=("gsm8k",), max_eval_samples=2)
    d.setup("validate")
    assert len(d.eval_rows["gsm8k"]) == 2


def test_mawps_loads_from_a_local_file_in_any_of_its_schemas(tmp_path):
    d = make_dm(train=("mawps",), evals=("mawps",), max_length=512)
    d.setup("fit")
    rows = [json.loads(l) for l in Path(tl.DATASET_FILES["mawps"]).read_text().splitlines()]
    evals = d.eval_rows["mawps"]
    assert [r["answer"] for r in evals] == ["9", "1.75", "24"] and {r["answer_type"] for r in evals} == {"number"}
    assert [d.prompt_of(to_instruction_row("mawps", r)) for r in rows] == [r["prompt"] for r in evals]
    assert all(r["question"] in e["prompt"] for r, e in zip(rows, evals))
    assert len(d.train_rows) == 3
    # the other MAWPS schemas, and LLM-Adapters' instruction schema, give the same instruction rows
    same = {"instruction": "Mia has 14 stickers and gives 5 to Leo. How many stickers does Mia have left?", "answer": "9"}
    for row in [
        {"sQuestion": same["instruction"], "lSolutions": [9.0], "lEquations": ["X=(14-5)"]},
        {"Question": "Mia has number0 stickers and gives number1 to Leo. How many stickers does Mia have left?",
         "Numbers": "14.0 5.0", "Equation": "- number0 number1", "Answer": 9.0},
        {"instruction": same["instruction"], "input": "", "output": "", "answer": "9"},
    ]:
        got = to_instruction_row("mawps", row)
        assert {k: got[k] for k in same} == same, row


@pytest.mark.parametrize("row, missing", [
    ({"text": "Mia has 14 stickers.", "label": 9}, "missing question field: a MAWPS row needs one of question, sQuestion, Question"),
    ({"question": "Mia has 14 stickers.", "chain": "14"}, "missing answer field result_float or result"),
])
def test_a_mawps_file_without_its_fields_names_the_file_and_the_field(tmp_path, row, missing):
    bad = tmp_path / "mawps_bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    d = ReasoningDataModule("unused", eval_datasets=["mawps"], data_files={"mawps": str(bad)})
    d.tokenizer = tl.tiny_tokenizer()
    with pytest.raises(ValueError) as info:
        d.setup("validate")
    message = str(info.value)
    assert str(bad) in message and missing in message and "row 1" in message, message
