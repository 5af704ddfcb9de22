"""SummarizationDataModule: XSum / CNN-DailyMail presets, local files, configurable columns, clear errors."""

import json
from pathlib import Path

import pytest

from tasks.summarization import SUMMARIZATION_TASKS, SummarizationDataModule

FIX = Path(__file__).parent / "fixtures" / "summarization"
TINY = str(FIX / "tiny_bart")


def test_presets_name_the_hub_datasets_and_columns():
    xsum = SummarizationDataModule(TINY, task="xsum")
    assert (xsum.dataset, xsum.dataset_config, xsum.document_field, xsum.summary_field) == ("EdinburghNLP/xsum", None, "document", "summary")
    cnn = SummarizationDataModule(TINY, task="cnn_dailymail")
    assert (cnn.dataset, cnn.dataset_config, cnn.document_field, cnn.summary_field) == ("abisee/cnn_dailymail", "3.0.0", "article", "highlights")
    assert set(SUMMARIZATION_TASKS) == {"xsum", "cnn_dailymail"}


def test_xsum_local_files_batches():
    dm = SummarizationDataModule(TINY, task="xsum", data_dir=str(FIX / "xsum"), batch_size=3, max_source_length=16, max_target_length=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape[1] <= 16 and batch["labels"].shape[1] <= 6
    assert (batch["labels"] == -100).any() or batch["labels"].shape[1] == 6  # padding is ignored by the loss
    val = next(iter(dm.val_dataloader()))
    refs = dm.references("val")
    rows = [json.loads(line) for line in (FIX / "xsum" / "validation.jsonl").read_text().splitlines()]
    assert refs == [r["summary"] for r in rows] and val["idx"].tolist() == [0, 1, 2]


def test_cnn_columns_from_the_preset_and_overrides():
    dm = SummarizationDataModule(TINY, task="cnn_dailymail", data_dir=str(FIX / "cnn"), batch_size=2)
    dm.setup("validate")
    import pandas as pd

    assert dm.references() == list(pd.read_csv(FIX / "cnn" / "validation.csv")["highlights"])  # the preset's column
    custom = SummarizationDataModule(TINY, data_files={"train": str(FIX / "cnn" / "train.csv"), "validation": str(FIX / "cnn" / "validation.csv")},
                                     document_field="article", summary_field="highlights", source_prefix="summarize: ")
    custom.setup("fit")
    assert len(custom._tokenized["train"]) == 8


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"has no column\(s\) \['summary'\].*set document_field / summary_field"):
        SummarizationDataModule(TINY, task="xsum", data_files={"validation": str(FIX / "malformed" / "no_summary.jsonl")}).setup("validate")
    with pytest.raises(ValueError, match="unknown summarization task"):
        SummarizationDataModule(TINY, task="gigaword")
    with pytest.raises(ValueError, match="give a task"):
        SummarizationDataModule(TINY)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SummarizationDataModule(TINY, task="xsum", data_dir=str(tmp_path / "nowhere"))
    bad = tmp_path / "validation.jsonl"
    bad.write_text(json.dumps({"document": "a", "summary": None}) + "\n")
    with pytest.raises(ValueError, match="row 0 has a missing or non-text"):
        SummarizationDataModule(TINY, task="xsum", data_dir=str(tmp_path)).setup("validate")
