"""Text classification (and regression) for any dataset, from the Hugging Face hub or from local files.

One or two text fields (a sentence or a sentence pair), one label field. String labels are mapped to ids
(the mapping is kept in ``id2label``, saved with checkpoints and written to the run's log directory);
integer labels are taken as ids. A validation split can be carved from the training split (seeded).
Tokenisation goes through ``datasets.map`` (cached on disk for hub and file datasets); batches are padded
dynamically. ``write_predictions`` turns ``trainer.predict`` output into one TSV file per predict split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from rocoft_pl.extras import require_extra

from .loaders import task_loader
from .local_files import LOCAL_FORMATS, check_data_files, data_suffix

UNLABELLED = -1  # label id of rows without a label (GLUE test splits)


def _as_list(value: Union[str, list[str], tuple[str, ...], None]) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _carve_groups(ds: Any, group_field: str, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, validation): whole groups, shuffled by ``seed``, moved to validation until it holds at least
    ``fraction`` of the rows."""
    import random

    groups = ds[group_field]
    sizes: dict[Any, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=str)
    random.Random(seed).shuffle(order)
    chosen, rows = set(), 0
    for g in order:
        if rows >= fraction * len(ds):
            break
        chosen.add(g)
        rows += sizes[g]
    if len(chosen) == len(sizes):
        raise ValueError(f"val_group_field {group_field!r}: too few groups ({len(sizes)}) to carve {fraction:.0%} for validation")
    val = [i for i, g in enumerate(groups) if g in chosen]
    train = [i for i, g in enumerate(groups) if g not in chosen]
    return ds.select(train), ds.select(val)


class TextClassificationDataModule(pl.LightningDataModule):
    """Sentence or sentence-pair classification / regression.

    Args:
        tokenizer_name_or_path: the model's tokenizer (hub id or local directory). The ``rocoft`` CLI links
            it to ``model.model_name_or_path``.
        dataset: a hub dataset id (``load_dataset(dataset, dataset_config)``); or leave None and give
            ``data_files``.
        dataset_config: the hub dataset's configuration name.
        data_files: local files by split, e.g. ``{train: a.csv, validation: b.csv}`` (CSV, TSV, JSON,
            JSONL or parquet; one format for all splits).
        text_fields: one or two columns holding the text (two: a sentence pair).
        label_field: the label column.
        labels: the label values in id order (e.g. ``[negative, positive]``); None: the sorted distinct
            values of the training split. Integer labels are ids already.
        drop_labels: rows with these label values are removed first (e.g. ``[neutral]``).
        regression: float targets (one output) instead of classes.
        train_split / val_splits / predict_splits: split names; validation can be several (MNLI).
        val_names: the metric prefixes of the validation splits (default ``val``, or ``val_<split>``).
        val_fraction: carve this fraction of the training split out as validation (seeded, stratified
            for classes), for datasets that have no validation split.
        val_group_field: carve by this column instead (e.g. the movie of a review): every group lands whole
            on one side, so near-duplicate rows of one group cannot leak from training into validation.
        max_length: truncate to this many tokens.
        batch_size / eval_batch_size: per-device batch sizes (eval defaults to batch_size).
        num_workers: dataloader workers.
        seed: for the validation carve and ``max_*_samples``.
        encoding: text encoding of CSV files (e.g. ``latin-1``).
        id_field: a column of row ids kept for prediction files (created from the row number if absent).
        max_train_samples / max_eval_samples: keep a seeded sample of this many training / validation rows.
        cache_dir: the datasets cache directory (default: HF_DATASETS_CACHE).
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        data_files: Optional[dict[str, str]] = None,
        text_fields: Union[str, list[str]] = "text",
        label_field: str = "label",
        labels: Optional[list[Union[str, int]]] = None,
        drop_labels: Optional[list[Union[str, int]]] = None,
        regression: bool = False,
        train_split: str = "train",
        val_splits: Union[str, list[str]] = "validation",
        val_names: Optional[list[str]] = None,
        predict_splits: Union[str, list[str], None] = "test",
        val_fraction: Optional[float] = None,
        val_group_field: Optional[str] = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        encoding: Optional[str] = None,
        id_field: str = "idx",
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.text_fields = _as_list(text_fields)
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"text_fields must name one or two columns, got {self.text_fields}")
        if (dataset is None) == (data_files is None):
            raise ValueError("give exactly one of `dataset` (a hub id) and `data_files` (local files by split)")
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if val_group_field is not None and val_fraction is None:
            raise ValueError("val_group_field carves a validation split: give val_fraction too")
        self.val_splits = _as_list(val_splits)
        if val_names is None:
            val_names = ["val"] if len(self.val_splits) == 1 else [f"val_{s}" for s in self.val_splits]
        if len(val_names) != len(self.val_splits):
            raise ValueError(f"val_names {val_names} must match val_splits {self.val_splits}")
        self.val_names = list(val_names)
        self.predict_splits = _as_list(predict_splits)
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.dataset, self.dataset_config = dataset, dataset_config
        self.data_files = {k: str(v) for k, v in data_files.items()} if data_files is not None else None
        self.label_field, self.regression = label_field, regression
        self.drop_labels = list(drop_labels or [])
        self.train_split, self.val_fraction, self.val_group_field = train_split, val_fraction, val_group_field
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed, self.encoding, self.id_field = num_workers, seed, encoding, id_field
        self.max_train_samples, self.max_eval_samples, self.cache_dir = max_train_samples, max_eval_samples, cache_dir
        self.labels: Optional[list[Any]] = list(labels) if labels is not None else None
        self._raw: Any = None
        self._tokenized: Any = None
        self._tokenizer: Any = None
        if self.data_files is not None:
            self._check_files()

    # -- what the model needs to know ------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        if self.regression:
            return 1
        if self.labels is None:
            self._load()
        return len(self.labels or [])

    @property
    def id2label(self) -> dict[int, str]:
        if self.regression:
            return {0: "score"}
        self.num_labels  # noqa: B018  (loads the data when the labels are not given)
        return {i: str(v) for i, v in enumerate(self.labels or [])}

    @property
    def metrics(self) -> list[str]:
        return ["pearson", "spearman"] if self.regression else ["accuracy"]

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        return self._tokenizer

    # -- loading ---------------------------------------------------------------------------------------
    def _check_files(self) -> None:
        assert self.data_files is not None
        check_data_files(self.data_files)

    def _load_raw(self) -> Any:
        datasets = require_extra("datasets", "tasks")

        if self.data_files is not None:
            first = Path(next(iter(self.data_files.values())))
            builder = LOCAL_FORMATS[data_suffix(first)]
            kwargs: dict[str, Any] = {}
            if builder == "csv":
                if data_suffix(first) == ".tsv":
                    kwargs["sep"] = "\t"
                if self.encoding:
                    kwargs["encoding"] = self.encoding
            try:
                raw = datasets.load_dataset(builder, data_files=self.data_files, cache_dir=self.cache_dir, **kwargs)
            except ValueError as err:
                if "corresponds to no data" in str(err):  # datasets' message for a file without rows
                    split = str(err).split('"')[1] if '"' in str(err) else "?"
                    raise ValueError(f"{self._source(split)} has no rows") from err
                raise
        else:
            raw = datasets.load_dataset(self.dataset, self.dataset_config, cache_dir=self.cache_dir)
        return raw

    def _source(self, split: str) -> str:
        if self.data_files is not None and split in self.data_files:
            return f"split {split!r} ({self.data_files[split]})"
        return f"split {split!r} of {self.dataset or 'data_files'}"

    def _load(self) -> None:
        """Load, check columns, drop labels, carve validation, fix the label mapping (once)."""
        if self._raw is not None:
            return
        datasets = require_extra("datasets", "tasks")

        raw = self._load_raw()
        wanted = {self.train_split, *self.val_splits, *self.predict_splits}
        raw = datasets.DatasetDict({s: ds for s, ds in raw.items() if s in wanted})  # e.g. skip IMDB's "unsupervised"
        if not raw:
            raise ValueError(f"none of the splits {sorted(wanted)} found in {self.dataset or self.data_files}")
        if self.train_split not in raw and self.val_fraction is not None:
            raise ValueError(f"val_fraction needs a {self.train_split!r} split; have {sorted(raw)}")
        for split, ds in raw.items():
            missing = [c for c in self.text_fields if c not in ds.column_names]
            if self.val_group_field is not None and split == self.train_split and self.val_group_field not in ds.column_names:
                missing.append(self.val_group_field)
            labelled = split == self.train_split or split in self.val_splits
            if labelled and self.label_field not in ds.column_names:
                missing.append(self.label_field)
            if missing:
                raise ValueError(f"{self._source(split)} has no column(s) {missing}; its columns are {ds.column_names}")
            if len(ds) == 0:
                raise ValueError(f"{self._source(split)} has no rows")
        for split, ds in raw.items():  # row ids of the original file, kept through filtering and the carve
            if self.id_field not in ds.column_names:
                raw[split] = ds.add_column(self.id_field, list(range(len(ds))))
        if self.drop_labels:
            drop = set(self.drop_labels)
            raw = datasets.DatasetDict(
                {s: ds.filter(lambda b: [v not in drop for v in b[self.label_field]], batched=True) if self.label_field in ds.column_names else ds for s, ds in raw.items()}
            )
        if self.val_fraction is not None:
            train = raw[self.train_split]
            if self.val_group_field is not None:
                raw[self.train_split], raw[self.val_splits[0]] = _carve_groups(train, self.val_group_field, self.val_fraction, self.seed)
            else:
                stratify = self.label_field if not self.regression and isinstance(train.features[self.label_field], datasets.ClassLabel) else None
                parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed, stratify_by_column=stratify)
                raw[self.train_split], raw[self.val_splits[0]] = parts["train"], parts["test"]
        for split in self.val_splits:
            if split not in raw:
                raise ValueError(f"no validation split {split!r} (have {sorted(raw)}); give val_fraction to carve one from {self.train_split!r}")
        self._fix_labels(raw)
        self._raw = raw

    def _fix_labels(self, raw: Any) -> None:
        datasets = require_extra("datasets", "tasks")

        if self.regression:
            return
        train = raw[self.train_split] if self.train_split in raw else raw[self.val_splits[0]]
        feature = train.features[self.label_field]
        if self.labels is None:
            if isinstance(feature, datasets.ClassLabel):
                self.labels = list(feature.names)
            else:
                values = set(train.unique(self.label_field))
                self.labels = sorted(values, key=lambda v: (str(type(v)), v))
                if all(isinstance(v, int) for v in values):
                    self.labels = list(range(max(values) + 1))
        if len(self.labels) < 2:
            raise ValueError(f"a classification task needs at least 2 labels, found {self.labels} in {self._source(self.train_split)}")
        for split in {self.train_split, *self.val_splits} & set(raw):
            unknown = sorted({str(v) for v in raw[split].unique(self.label_field)} - {str(v) for v in self._valid_values(raw[split])})
            if unknown:
                raise ValueError(f"{self._source(split)} has unknown label(s) {unknown[:10]}; known labels: {self.labels}")

    def _valid_values(self, ds: Any) -> list[Any]:
        """Raw label values accepted in a split: ids for integer columns, the label values otherwise."""
        assert self.labels is not None
        if self._int_labels(ds):
            return list(range(len(self.labels)))
        return list(self.labels)

    def _int_labels(self, ds: Any) -> bool:
        datasets = require_extra("datasets", "tasks")

        feature = ds.features[self.label_field]
        return isinstance(feature, datasets.ClassLabel) or getattr(feature, "dtype", "").startswith("int")

    def _encode(self, split: str, ds: Any) -> Any:
        tok = self.tokenizer
        has_label = self.label_field in ds.column_names
        as_ids = has_label and not self.regression and self._int_labels(ds)
        label2id = {str(v): i for i, v in enumerate(self.labels or [])}
        # Only plain values in the closure, so that datasets can fingerprint it and cache the result.
        fields, label_field, id_field = self.text_fields, self.label_field, self.id_field
        max_length, regression = self.max_length, self.regression

        def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            texts = [[("" if t is None else str(t)) for t in batch[f]] for f in fields]
            out = dict(tok(*texts, truncation=True, max_length=max_length))
            if not has_label:
                out["labels"] = [UNLABELLED] * len(texts[0])
            elif regression:
                out["labels"] = [float(v) for v in batch[label_field]]
            elif as_ids:
                out["labels"] = [int(v) for v in batch[label_field]]
            else:
                out["labels"] = [label2id.get(str(v), UNLABELLED) for v in batch[label_field]]
            out["idx"] = batch[id_field]
            return out

        limit = self.max_train_samples if split == self.train_split else self.max_eval_samples if split in self.val_splits else None
        if limit is not None and limit < len(ds):
            ds = ds.shuffle(seed=self.seed).select(range(limit))
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")

    def prepare_data(self) -> None:
        self._load()  # downloads on one process; the other processes then read the datasets cache

    def setup(self, stage: Optional[str] = None) -> None:
        self._load()
        if self._tokenized is None:
            datasets = require_extra("datasets", "tasks")

            self._tokenized = datasets.DatasetDict({s: self._encode(s, ds) for s, ds in self._raw.items()})
        if stage == "fit":
            self._save_label_mapping()

    def _save_label_mapping(self) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero or trainer.log_dir is None:
            return
        path = Path(trainer.log_dir) / "label_mapping.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"label_field": self.label_field, "regression": self.regression, "id2label": self.id2label}, indent=2))

    def state_dict(self) -> dict[str, Any]:
        return {"id2label": self.id2label, "labels": self.labels}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("labels") is not None:
            self.labels = list(state_dict["labels"])

    # -- loaders ---------------------------------------------------------------------------------------
    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [r.pop("labels") for r in rows]
        batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        batch["labels"] = torch.tensor(labels, dtype=torch.float if self.regression else torch.long)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self._tokenized is None:
            raise RuntimeError("call setup() first")
        if split not in self._tokenized:
            raise ValueError(f"no split {split!r} in the dataset (have {sorted(self._tokenized)})")
        batch_size = self.batch_size if shuffle else self.eval_batch_size
        return task_loader(self._tokenized[split], batch_size, shuffle, self._collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        loaders = [self._loader(s, shuffle=False) for s in self.val_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        """The validation splits: test labels are often hidden (GLUE); ``predict`` covers the test split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        if not self.predict_splits:
            raise ValueError("no predict_splits configured")
        loaders = [self._loader(s, shuffle=False) for s in self.predict_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    # -- prediction files ------------------------------------------------------------------------------
    def prediction_file(self, split: str) -> str:
        return f"predictions_{split}.tsv"

    def format_prediction(self, value: Union[int, float]) -> str:
        if self.regression:
            return f"{float(value):.4f}"
        return self.id2label[int(value)]

    def write_predictions(self, predictions: list[Any], output_dir: Union[str, Path]) -> list[Path]:
        """Write ``trainer.predict`` output (dicts with ``idx`` and ``predictions``) as ``index\\tprediction``
        TSV files, one per predict split. Returns the paths written."""
        per_split = predictions if len(self.predict_splits) > 1 else [predictions]
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for split, batches in zip(self.predict_splits, per_split):
            rows = []
            for b in batches:
                rows += zip(b["idx"].tolist(), b["predictions"].tolist())
            path = out_dir / self.prediction_file(split)
            with path.open("w") as f:
                f.write("index\tprediction\n")
                for idx, value in sorted(rows):
                    f.write(f"{idx}\t{self.format_prediction(value)}\n")
            written.append(path)
        return written


__all__ = ["TextClassificationDataModule", "LOCAL_FORMATS", "UNLABELLED"]
