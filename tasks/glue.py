"""The 8 GLUE tasks of the paper (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE) as one DataModule.

A thin specialisation of TextClassificationDataModule: each task fixes its text columns, labels and metrics
(paper, appendix I). Data come from ``nyu-mll/glue`` on the hub, or from local files with the same columns
(``data_dir`` holding ``<split>.csv|tsv|json|jsonl|parquet``). GLUE test labels are hidden: training
validates on the validation split(s) (as the paper does; MNLI on matched and mismatched), ``test``
evaluates the validation split(s) too, and ``predict`` + ``write_predictions`` write the GLUE submission
files (``CoLA.tsv``, ``MNLI-m.tsv`` ...) for the test split(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .local_files import split_files
from .text_classification import TextClassificationDataModule

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    text_fields: tuple[str, ...]
    labels: tuple[str, ...]  # empty: regression
    metrics: tuple[str, ...]
    submission: str  # file stem of the GLUE submission
    val_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), ("mcc",), "CoLA"),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), ("accuracy",), "SST-2"),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "MRPC"),
    "stsb": GlueTask(("sentence1", "sentence2"), (), ("pearson", "spearman"), "STS-B"),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "QQP"),
    "mnli": GlueTask(
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "MNLI",
        val_splits=("validation_matched", "validation_mismatched"),
        test_splits=("test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "QNLI"),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE"),
}
# GLUE's server wants label names for the NLI tasks and 0/1 for the others.
_NAMED_PREDICTIONS = {"mnli", "qnli", "rte"}


class GLUEDataModule(TextClassificationDataModule):
    """One GLUE task.

    Args:
        task: cola, sst2, mrpc, stsb, qqp, mnli, qnli or rte.
        tokenizer_name_or_path: the model's tokenizer (linked to ``model.model_name_or_path`` by the CLI).
        data_dir: local files ``<split>.<ext>`` with the hub's columns (e.g. train.csv, validation.csv,
            test.csv; MNLI: validation_matched / validation_mismatched / test_matched / test_mismatched);
            None: download ``nyu-mll/glue``.
        max_length, batch_size, eval_batch_size, num_workers, seed, max_train_samples, max_eval_samples,
        cache_dir: as TextClassificationDataModule.
    """

    def __init__(
        self,
        task: str,
        tokenizer_name_or_path: str,
        data_dir: Optional[str] = None,
        max_length: int = 512,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        task = task.lower().replace("-", "")
        if task not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
        spec = GLUE_TASKS[task]
        self.task, self.spec = task, spec
        splits = ["train", *spec.val_splits, *spec.test_splits]
        data_files = split_files(data_dir, splits) if data_dir is not None else None
        if data_files is not None:
            missing = [s for s in ["train", *spec.val_splits] if s not in data_files]
            if missing:
                raise FileNotFoundError(f"data_dir {data_dir}: no file for split(s) {missing} (expected <split>.csv/.tsv/.json/.jsonl/.parquet)")
        present_tests = [s for s in spec.test_splits if data_files is None or s in data_files]
        super().__init__(
            tokenizer_name_or_path=tokenizer_name_or_path,
            dataset=None if data_files is not None else HUB_DATASET,
            dataset_config=None if data_files is not None else task,
            data_files=data_files,
            text_fields=list(spec.text_fields),
            label_field="label",
            labels=list(spec.labels) or None,
            regression=not spec.labels,
            val_splits=list(spec.val_splits),
            val_names=["val"] if len(spec.val_splits) == 1 else [s.replace("validation", "val") for s in spec.val_splits],
            predict_splits=present_tests,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            id_field="idx",
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            cache_dir=cache_dir,
        )

    @property
    def metrics(self) -> list[str]:
        return list(self.spec.metrics)

    def prediction_file(self, split: str) -> str:
        if self.task == "mnli":
            return f"MNLI-{'m' if split.endswith('_matched') else 'mm'}.tsv"
        return f"{self.spec.submission}.tsv"

    def format_prediction(self, value: Union[int, float]) -> str:
        if self.regression:
            return f"{min(5.0, max(0.0, float(value))):.3f}"  # STS-B scores live in [0, 5]
        if self.task in _NAMED_PREDICTIONS:
            return self.spec.labels[int(value)]
        return str(int(value))


__all__ = ["GLUEDataModule", "GLUE_TASKS", "GlueTask", "HUB_DATASET"]
