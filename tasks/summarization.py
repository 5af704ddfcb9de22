"""Abstractive summarization (XSum, CNN/DailyMail, or any document/summary dataset) for seq2seq models.

Sources: ``task: xsum`` (``EdinburghNLP/xsum``: ``document``, ``summary``), ``task: cnn_dailymail``
(``abisee/cnn_dailymail``, config ``3.0.0``: ``article``, ``highlights``), any hub ``dataset`` (+
``dataset_config``), or local files by split (``data_files`` / ``data_dir`` with ``<split>.<ext>``; CSV, TSV,
JSON, JSONL, parquet). The document and summary columns are configurable (``document_field``,
``summary_field``; the task presets fill them in).

Batches: ``input_ids``, ``attention_mask``, ``labels`` (summary token ids, padding = -100) and ``idx`` (the
row of the split, so that the module scores generated text against the untruncated reference from
``references(stage)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from rocoft_pl.extras import require_extra

from .loaders import task_loader
from .local_files import LOCAL_FORMATS, data_suffix, local_data_files

SUMMARIZATION_TASKS: dict[str, dict[str, Any]] = {
    "xsum": {"dataset": "EdinburghNLP/xsum", "dataset_config": None, "document_field": "document", "summary_field": "summary"},
    "cnn_dailymail": {"dataset": "abisee/cnn_dailymail", "dataset_config": "3.0.0", "document_field": "article", "summary_field": "highlights"},
}
IGNORE_INDEX = -100


class SummarizationDataModule(pl.LightningDataModule):
    """Document -> summary pairs for ``AutoModelForSeq2SeqLM``.

    Args:
        tokenizer_name_or_path: the model's tokenizer (linked to ``model.model_name_or_path`` by the CLI).
        task: ``xsum`` or ``cnn_dailymail`` (presets for dataset and columns), or None.
        dataset, dataset_config: a hub dataset (overrides the preset's); ignored with local files.
        data_files: local files by split; data_dir: a directory with ``<split>.<ext>`` files.
        document_field, summary_field: columns (default: the preset's, else ``document`` / ``summary``).
        source_prefix: text put before every document (T5: ``"summarize: "``).
        max_source_length, max_target_length: truncation of documents and summaries (BART: 1024 / 128).
        train_split, val_split, test_split: split names (the test split is optional).
        batch_size, eval_batch_size, num_workers, seed, max_train_samples, max_eval_samples, cache_dir:
            as TextClassificationDataModule (samples are seeded).
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        task: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        data_files: Optional[dict[str, str]] = None,
        data_dir: Optional[str] = None,
        document_field: Optional[str] = None,
        summary_field: Optional[str] = None,
        source_prefix: str = "",
        max_source_length: int = 1024,
        max_target_length: int = 128,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: Optional[str] = "test",
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        preset: dict[str, Any] = {}
        if task is not None:
            key = task.lower().replace("-", "_").replace("/", "_")
            key = {"cnn_dm": "cnn_dailymail", "cnndm": "cnn_dailymail", "dailymail": "cnn_dailymail"}.get(key, key)
            if key not in SUMMARIZATION_TASKS:
                raise ValueError(f"unknown summarization task {task!r}; choose one of {sorted(SUMMARIZATION_TASKS)} or give dataset/data_files")
            preset = SUMMARIZATION_TASKS[key]
        self.task = task
        if data_dir is not None and data_files is not None:
            raise ValueError("give data_dir or data_files, not both")
        splits = [s for s in (train_split, val_split, test_split) if s]
        self.data_files = local_data_files(data_dir, data_files, splits)
        self.dataset = dataset or preset.get("dataset")
        self.dataset_config = dataset_config if dataset is not None else (dataset_config or preset.get("dataset_config"))
        if self.data_files is None and self.dataset is None:
            raise ValueError("give a task (xsum, cnn_dailymail), a hub dataset, data_files or data_dir")
        self.document_field = document_field or preset.get("document_field", "document")
        self.summary_field = summary_field or preset.get("summary_field", "summary")
        self.source_prefix = source_prefix
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_train_samples, self.max_eval_samples, self.cache_dir = max_train_samples, max_eval_samples, cache_dir
        self._raw: Any = None
        self._tokenized: dict[str, Any] = {}
        self._references: dict[str, list[str]] = {}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        return self._tokenizer

    def _where(self, split: str) -> str:
        if self.data_files is not None and split in self.data_files:
            return f"split {split!r} ({self.data_files[split]})"
        return f"split {split!r} of {self.dataset}"

    def _load(self) -> None:
        if self._raw is not None:
            return
        datasets = require_extra("datasets", "tasks")

        if self.data_files is not None:
            first = Path(next(iter(self.data_files.values())))
            builder = LOCAL_FORMATS[data_suffix(first)]
            kwargs: dict[str, Any] = {"sep": "\t"} if data_suffix(first) == ".tsv" else {}
            if builder == "csv":
                kwargs["keep_default_na"] = False
            loaded = datasets.load_dataset(builder, data_files=self.data_files, cache_dir=self.cache_dir, **kwargs)
        else:
            loaded = datasets.load_dataset(self.dataset, self.dataset_config, cache_dir=self.cache_dir)
        wanted = [s for s in (self.train_split, self.val_split, self.test_split) if s]
        raw = {s: loaded[s] for s in wanted if s in loaded}
        if self.val_split not in raw:
            raise ValueError(f"no validation split {self.val_split!r} in {self.data_files or self.dataset} (have {sorted(loaded)})")
        for split, ds in raw.items():
            missing = [c for c in (self.document_field, self.summary_field) if c not in ds.column_names]
            if missing:
                raise ValueError(
                    f"{self._where(split)} has no column(s) {missing}; its columns are {ds.column_names} "
                    "(set document_field / summary_field)"
                )
            if len(ds) == 0:
                raise ValueError(f"{self._where(split)} has no rows")
            limit = self.max_train_samples if split == self.train_split else self.max_eval_samples
            if limit is not None and limit < len(ds):
                ds = ds.shuffle(seed=self.seed).select(range(limit))
            bad = [i for i, (d, s) in enumerate(zip(ds[self.document_field], ds[self.summary_field])) if not isinstance(d, str) or not isinstance(s, str)]
            if bad:
                raise ValueError(f"{self._where(split)}: row {bad[0]} has a missing or non-text {self.document_field!r} / {self.summary_field!r}")
            raw[split] = ds
        self._raw = raw

    def references(self, stage: str = "val") -> list[str]:
        """The reference summaries of the evaluated split, in row order (``idx`` points into this list)."""
        self._load()
        split = self.test_split if stage == "test" and self.test_split in self._raw else self.val_split
        if split not in self._references:
            self._references[split] = [str(s) for s in self._raw[split][self.summary_field]]
        return self._references[split]

    def _encode(self, split: str) -> Any:
        ds = self._raw[split]
        tok = self.tokenizer
        doc, summ, prefix = self.document_field, self.summary_field, self.source_prefix
        max_src, max_tgt = self.max_source_length, self.max_target_length

        def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
            out = dict(tok([prefix + d for d in batch[doc]], truncation=True, max_length=max_src))
            out.pop("token_type_ids", None)
            out["labels"] = tok(text_target=batch[summ], truncation=True, max_length=max_tgt)["input_ids"]
            out["idx"] = indices
            return out

        return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        self._load()
        wanted = {self.val_split}
        if stage in (None, "fit"):
            wanted.add(self.train_split)
        if stage in (None, "test") and self.test_split:
            wanted.add(self.test_split)
        for split in self._raw:
            if split in wanted and split not in self._tokenized:
                self._tokenized[split] = self._encode(split)

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [r.pop("labels") for r in rows]
        idx = [r.pop("idx") for r in rows]
        batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        width = max(len(x) for x in labels)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, x in enumerate(labels):
            lab[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        batch["labels"] = lab
        batch["idx"] = torch.tensor(idx, dtype=torch.long)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._tokenized:
            raise RuntimeError(f"split {split!r} is not tokenized: call setup() first (have {sorted(self._tokenized)})")
        batch_size = self.batch_size if shuffle else self.eval_batch_size
        return task_loader(self._tokenized[split], batch_size, shuffle, self._collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        split = self.test_split if self.test_split in self._tokenized else self.val_split
        return self._loader(split, shuffle=False)


__all__ = ["IGNORE_INDEX", "SUMMARIZATION_TASKS", "SummarizationDataModule"]
