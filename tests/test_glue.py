"""GLUEDataModule on committed fixtures with the nyu-mll/glue column schema (a few rows per split)."""

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
GLUE = FIXTURES / "glue"
TINY = str(FIXTURES / "text_classification" / "tiny_bert")
PAIRS = {"cola": False, "sst2": False, "mrpc": True, "stsb": True, "qqp": True, "mnli": True, "qnli": True, "rte": True}


def glue(task, **kw):
    from tasks.glue import GLUEDataModule

    dm = GLUEDataModule(task, tokenizer_name_or_path=TINY, data_dir=str(GLUE / task), batch_size=4, max_length=32, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("task", sorted(PAIRS))
def test_every_task_yields_batches(task):
    dm = glue(task)
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "idx"} <= set(batch)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape == batch["attention_mask"].shape
    # dynamic padding: padded to the longest row of the batch, not to max_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    # sentence pairs: the second segment has token type 1
    assert bool((batch["token_type_ids"] == 1).any()) == PAIRS[task]
    if task == "stsb":
        assert dm.num_labels == 1 and dm.metrics == ["pearson", "spearman"]
        assert batch["labels"].dtype == torch.float32 and float(batch["labels"].min()) >= 0
    else:
        assert batch["labels"].dtype == torch.long
        assert 0 <= int(batch["labels"].min()) and int(batch["labels"].max()) < dm.num_labels
    vals = dm.val_dataloader()
    if task == "mnli":
        assert dm.num_labels == 3 and len(vals) == 2 and dm.val_names == ["val_matched", "val_mismatched"]
        assert len(dm.predict_dataloader()) == 2
    else:
        assert len(vals.dataset) == 6 and dm.val_names == ["val"]
        test_batch = next(iter(dm.predict_dataloader()))
        assert (test_batch["labels"] == -1).all()  # GLUE test labels are hidden


def test_metrics_per_task():
    from tasks.glue import GLUE_TASKS

    assert GLUE_TASKS["cola"].metrics == ("mcc",)
    assert GLUE_TASKS["mrpc"].metrics == GLUE_TASKS["qqp"].metrics == ("accuracy", "f1")
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearman")
    assert all(GLUE_TASKS[t].metrics == ("accuracy",) for t in ("sst2", "mnli", "qnli", "rte"))


def _fake_predictions(n, values):
    return [{"idx": torch.arange(n), "predictions": torch.tensor(values)}]


def test_submission_files(tmp_path):
    dm = glue("rte")
    (path,) = dm.write_predictions(_fake_predictions(3, [1, 0, 1]), tmp_path)
    assert path.name == "RTE.tsv"
    assert path.read_text().splitlines() == ["index\tprediction", "0\tnot_entailment", "1\tentailment", "2\tnot_entailment"]
    (path,) = glue("cola").write_predictions(_fake_predictions(2, [1, 0]), tmp_path)
    assert path.name == "CoLA.tsv" and path.read_text().splitlines()[1:] == ["0\t1", "1\t0"]
    (path,) = glue("stsb").write_predictions(_fake_predictions(3, [-0.5, 2.25, 7.0]), tmp_path)
    assert path.name == "STS-B.tsv" and path.read_text().splitlines()[1:] == ["0\t0.000", "1\t2.250", "2\t5.000"]
    paths = glue("mnli").write_predictions([_fake_predictions(1, [0]), _fake_predictions(1, [2])], tmp_path)
    assert [p.name for p in paths] == ["MNLI-m.tsv", "MNLI-mm.tsv"]
    assert paths[1].read_text().splitlines()[1] == "0\tcontradiction"


def test_bad_task_and_paths(tmp_path):
    from tasks.glue import GLUEDataModule

    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        GLUEDataModule("wnli", tokenizer_name_or_path=TINY)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GLUEDataModule("rte", tokenizer_name_or_path=TINY, data_dir=str(tmp_path / "missing"))
    (tmp_path / "train.csv").write_text((GLUE / "cola" / "train.csv").read_text())
    with pytest.raises(FileNotFoundError, match=r"no file for split\(s\) \['validation'\]"):
        GLUEDataModule("cola", tokenizer_name_or_path=TINY, data_dir=str(tmp_path))
    # columns of another task: the error names what is missing and what is there
    (tmp_path / "validation.csv").write_text((GLUE / "cola" / "validation.csv").read_text())
    dm = GLUEDataModule("mrpc", tokenizer_name_or_path=TINY, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence1', 'sentence2'\]"):
        dm.setup("fit")
