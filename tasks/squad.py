"""SQuAD v1.1 / v2.0 (extractive question answering) from the hub or from local files.

Sources:
- the hub: ``rajpurkar/squad`` (v1.1) or ``rajpurkar/squad_v2`` (v2.0), columns ``id, title, context,
  question, answers = {text: [...], answer_start: [...]}``;
- local files per split (``data_files`` or ``data_dir`` with ``train.<ext>`` / ``validation.<ext>``) in that
  schema as CSV / TSV / JSON / JSONL / parquet (in CSV, ``answers`` is a JSON string), or in the official
  SQuAD JSON format ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
  "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`` (e.g. ``train-v1.1.json``, ``dev-v2.0.json``).

Every answer must be the context's text at ``answer_start`` (the loader fails naming the example otherwise);
v1.1 questions must have an answer, v2.0 questions may have none (unanswerable).

Long contexts are split into windows of at most ``max_length`` tokens (question + context + special tokens);
consecutive windows of one context share ``doc_stride`` context tokens (the tokenizer's ``stride``). A fast tokenizer is required (character offsets).
Training windows are labelled with the answer's start/end tokens, or with the CLS token when the window
does not contain the whole answer (and for unanswerable questions). Validation windows keep
``offset_mapping`` (character offsets into the context, -1 elsewhere) and ``example_idx`` (the example in
``eval_examples(stage)``) so that ``rocoft_pl.modules.question_answering`` can cut answers from the text.
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
from .local_files import LOCAL_FORMATS, data_suffix, local_data_files

HUB_DATASETS = {"v1": "rajpurkar/squad", "v2": "rajpurkar/squad_v2"}
_VERSIONS = {"v1": "v1", "1": "v1", "1.1": "v1", "v1.1": "v1", "v2": "v2", "2": "v2", "2.0": "v2", "v2.0": "v2"}
COLUMNS = ("id", "context", "question", "answers")


def _is_official_json(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return False
    # JSON Lines starts with a record too: the official file is one object with a "data" list
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("data"), list)


def read_official_json(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Flatten an official SQuAD JSON file into hub-schema records (``answers`` as text/answer_start lists).
    ``{"data": [records in the hub schema]}`` is read as is."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: not the official SQuAD format (a JSON object with a 'data' list)")
    records = []
    for a, article in enumerate(data["data"]):
        if isinstance(article, dict) and "paragraphs" not in article and "context" in article:
            # {"data": [hub-schema records]} (a common export of the hub datasets)
            missing = [k for k in COLUMNS if k not in article]
            if missing:
                raise ValueError(f"{path}: data[{a}] has no {missing}")
            records.append({**article, "id": str(article["id"]), "answers": _parse_answers(article["answers"])})
            continue
        title = article.get("title", "")
        for p, para in enumerate(article.get("paragraphs", [])):
            if "context" not in para or "qas" not in para:
                raise ValueError(f"{path}: data[{a}].paragraphs[{p}] has no 'context' or 'qas'")
            for q, qa in enumerate(para["qas"]):
                missing = [k for k in ("id", "question", "answers") if k not in qa]
                if missing:
                    raise ValueError(f"{path}: data[{a}].paragraphs[{p}].qas[{q}] has no {missing}")
                answers = [] if qa.get("is_impossible") else qa["answers"]
                records.append(
                    {
                        "id": str(qa["id"]),
                        "title": title,
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": {"text": [x["text"] for x in answers], "answer_start": [int(x["answer_start"]) for x in answers]},
                    }
                )
    return records


def _parse_answers(value: Any) -> dict[str, list[Any]]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {"text": [], "answer_start": []}
    if isinstance(value, list):  # [{text, answer_start}, ...] (official style)
        value = {"text": [x["text"] for x in value], "answer_start": [x["answer_start"] for x in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ValueError(f"answers must be {{'text': [...], 'answer_start': [...]}}, got {value!r}")
    return {"text": [str(t) for t in value["text"]], "answer_start": [int(s) for s in value["answer_start"]]}


def check_example(example: dict[str, Any], version: str, where: str) -> None:
    """Raise ValueError naming the example when an answer is not the context's text at answer_start."""
    ans = example["answers"]
    if len(ans["text"]) != len(ans["answer_start"]):
        raise ValueError(f"{where}: example {example['id']!r}: {len(ans['text'])} answer texts but {len(ans['answer_start'])} answer_start values")
    if not ans["text"] and version == "v1":
        raise ValueError(f"{where}: example {example['id']!r} has no answer; SQuAD v1.1 questions all have one (use version v2 for unanswerable questions)")
    context = example["context"]
    for text, start in zip(ans["text"], ans["answer_start"]):
        if not text:
            raise ValueError(f"{where}: example {example['id']!r} has an empty answer text")
        if context[start : start + len(text)] != text:
            found = context.find(text)
            hint = f"; the text occurs at {found}" if found >= 0 else "; the text does not occur in the context"
            raise ValueError(
                f"{where}: example {example['id']!r}: answer {text!r} is not in the context at answer_start={start} "
                f"(context there: {context[max(start, 0) : max(start, 0) + len(text)]!r}){hint}"
            )


def _window_encoder(tok: Any, max_length: int, doc_stride: int, max_query_length: Optional[int], keep_offsets: bool) -> Any:
    """The ``datasets.map`` function that turns examples into windows (see the module docstring)."""
    pad_on_right = tok.padding_side == "right"
    context_index = 1 if pad_on_right else 0
    cls_id = tok.cls_token_id

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        questions = [q.lstrip() for q in batch["question"]]  # leading spaces waste window tokens (run_qa)
        if max_query_length is not None:
            cut = tok(questions, add_special_tokens=False, truncation=True, max_length=max_query_length, return_offsets_mapping=True)
            questions = [q[: offs[-1][1]] if offs else q for q, offs in zip(questions, cut["offset_mapping"])]
        first, second = (questions, batch["context"]) if pad_on_right else (batch["context"], questions)
        try:
            enc = tok(
                first, second, truncation="only_second" if pad_on_right else "only_first", max_length=max_length,
                stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
            )
        except Exception as err:  # e.g. a question that leaves no room for the context
            raise ValueError(f"cannot split into windows of {max_length} tokens with doc_stride {doc_stride}: {err}") from err
        mapping = enc["overflow_to_sample_mapping"]
        out: dict[str, Any] = {k: v for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
        starts, ends, offsets, example_idx = [], [], [], []
        for i, offs in enumerate(enc["offset_mapping"]):
            seq_ids = enc.sequence_ids(i)
            sample = mapping[i]
            ids = enc["input_ids"][i]
            cls = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            example_idx.append(indices[sample])
            if keep_offsets:
                offsets.append([list(o) if seq_ids[k] == context_index else [-1, -1] for k, o in enumerate(offs)])
            answers = batch["answers"][sample]
            ctx = [k for k, s in enumerate(seq_ids) if s == context_index]
            if not answers["answer_start"] or not ctx:
                starts.append(cls)
                ends.append(cls)
                continue
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first_tok, last_tok = ctx[0], ctx[-1]
            if not (offs[first_tok][0] <= start_char and offs[last_tok][1] >= end_char):
                starts.append(cls)  # the answer is not (wholly) inside this window
                ends.append(cls)
                continue
            s = first_tok
            while s <= last_tok and offs[s][0] <= start_char:
                s += 1
            e = last_tok
            while e >= first_tok and offs[e][1] >= end_char:
                e -= 1
            starts.append(s - 1)
            ends.append(e + 1)
        out["start_positions"], out["end_positions"], out["example_idx"] = starts, ends, example_idx
        if keep_offsets:
            out["offset_mapping"] = offsets
        return out

    return encode


class SquadDataModule(pl.LightningDataModule):
    """SQuAD-style extractive QA.

    Args:
        tokenizer_name_or_path: the model's (fast) tokenizer; the CLI links it to ``model.model_name_or_path``.
        version: ``v1`` (SQuAD v1.1) or ``v2`` (v2.0, with unanswerable questions).
        dataset: a hub dataset id (default by version: rajpurkar/squad, rajpurkar/squad_v2); ignored with
            local files.
        data_dir: a directory with ``train.<ext>`` and ``validation.<ext>`` (``.json`` may be official format).
        data_files: local files by split, e.g. ``{train: train-v1.1.json, validation: dev-v1.1.json}``.
        train_split, val_split: split names.
        max_length: tokens per window (question + context + special tokens).
        doc_stride: tokens shared by consecutive windows of one context.
        max_query_length: questions are cut to this many tokens (None: no limit).
        batch_size / eval_batch_size, num_workers, seed, max_train_samples, max_eval_samples (examples,
        seeded sample), cache_dir: as TextClassificationDataModule.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        version: str = "v1",
        dataset: Optional[str] = None,
        data_dir: Optional[str] = None,
        data_files: Optional[dict[str, str]] = None,
        train_split: str = "train",
        val_split: str = "validation",
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: Optional[int] = 64,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        key = str(version).lower()
        if key not in _VERSIONS:
            raise ValueError(f"version must be v1 (SQuAD v1.1) or v2 (SQuAD v2.0), got {version!r}")
        self.version = _VERSIONS[key]
        if data_dir is not None and data_files is not None:
            raise ValueError("give data_dir or data_files, not both")
        if doc_stride < 0 or doc_stride >= max_length:
            raise ValueError(f"doc_stride must be in [0, max_length), got {doc_stride} with max_length={max_length}")
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.dataset = dataset or HUB_DATASETS[self.version]
        self.data_files = local_data_files(data_dir, data_files, [train_split, val_split], one_format=False)
        self.train_split, self.val_split = train_split, val_split
        self.max_length, self.doc_stride, self.max_query_length = max_length, doc_stride, max_query_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_train_samples, self.max_eval_samples, self.cache_dir = max_train_samples, max_eval_samples, cache_dir
        self._raw: Any = None
        self._features: dict[str, Any] = {}
        self._tokenizer: Any = None

    @property
    def version_2_with_negative(self) -> bool:
        return self.version == "v2"

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
            if not getattr(tok, "is_fast", False):
                raise ValueError(f"{self.tokenizer_name_or_path}: SQuAD windows need a fast tokenizer (character offsets)")
            self._tokenizer = tok
        return self._tokenizer

    # -- loading ---------------------------------------------------------------------------------------
    def _where(self, split: str) -> str:
        if self.data_files is not None and split in self.data_files:
            return f"split {split!r} ({self.data_files[split]})"
        return f"split {split!r} of {self.dataset}"

    def _load_split(self, split: str, path: Optional[str]) -> Any:
        datasets = require_extra("datasets", "tasks")

        if path is None:
            return None
        p = Path(path)
        if _is_official_json(p):
            return datasets.Dataset.from_list(read_official_json(p))
        builder = LOCAL_FORMATS[data_suffix(p)]
        kwargs = {"sep": "\t"} if data_suffix(p) == ".tsv" else {}
        if builder == "csv":
            kwargs["keep_default_na"] = False  # an empty cell is text, not NaN
        return datasets.load_dataset(builder, data_files={split: str(p)}, split=split, cache_dir=self.cache_dir, **kwargs)

    def _load(self) -> None:
        if self._raw is not None:
            return
        datasets = require_extra("datasets", "tasks")

        if self.data_files is not None:
            raw = {s: self._load_split(s, self.data_files.get(s)) for s in (self.train_split, self.val_split)}
            raw = {s: d for s, d in raw.items() if d is not None}
        else:
            loaded = datasets.load_dataset(self.dataset, cache_dir=self.cache_dir)
            raw = {s: loaded[s] for s in (self.train_split, self.val_split) if s in loaded}
        if self.val_split not in raw:
            raise ValueError(f"no validation split {self.val_split!r} in {self.data_files or self.dataset} (have {sorted(raw)})")
        for split, ds in raw.items():
            missing = [c for c in COLUMNS if c not in ds.column_names]
            if missing:
                raise ValueError(f"{self._where(split)} has no column(s) {missing}; its columns are {ds.column_names} (SQuAD schema: {list(COLUMNS)})")
            if len(ds) == 0:
                raise ValueError(f"{self._where(split)} has no rows")
            limit = self.max_train_samples if split == self.train_split else self.max_eval_samples
            if limit is not None and limit < len(ds):
                ds = ds.shuffle(seed=self.seed).select(range(limit))
            if not isinstance(ds.features["answers"], dict) or "text" not in ds.features["answers"]:  # CSV: JSON strings
                ds = ds.map(lambda b: {"answers": [_parse_answers(v) for v in b["answers"]]}, batched=True, desc=f"parsing answers {split}")
            where = self._where(split)
            for ex in ds.select_columns(["id", "context", "answers"]):
                check_example(ex, self.version, where)
            raw[split] = ds
        self._raw = raw

    def eval_examples(self, stage: str = "val") -> list[dict[str, Any]]:
        """The validation examples (``id``, ``context``, ``question``, ``answers``) that ``example_idx`` points into."""
        self._load()
        if not hasattr(self, "_eval_examples"):
            ds = self._raw[self.val_split].select_columns(["id", "context", "question", "answers"])
            self._eval_examples = ds.to_list()
        return self._eval_examples

    # -- windows ---------------------------------------------------------------------------------------
    def _features_for(self, split: str, train: bool) -> Any:
        ds = self._raw[split]
        # Only plain values in the closure, so that datasets can fingerprint it and cache the result.
        encode = _window_encoder(self.tokenizer, self.max_length, self.doc_stride, self.max_query_length, keep_offsets=not train)
        return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"windows {split}")

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        self._load()
        if stage in (None, "fit") and self.train_split in self._raw and self.train_split not in self._features:
            self._features[self.train_split] = self._features_for(self.train_split, train=True)
        if self.val_split not in self._features:
            self._features[self.val_split] = self._features_for(self.val_split, train=False)

    # -- loaders ---------------------------------------------------------------------------------------
    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        offsets = [r.pop("offset_mapping") for r in rows] if "offset_mapping" in rows[0] else None
        extra = {k: torch.tensor([r.pop(k) for r in rows]) for k in ("start_positions", "end_positions", "example_idx")}
        batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
        batch.update(extra)
        if offsets is not None:
            width = batch["input_ids"].shape[1]
            off = torch.full((len(rows), width, 2), -1, dtype=torch.long)
            left = self.tokenizer.padding_side == "left"
            for i, o in enumerate(offsets):
                t = torch.tensor(o, dtype=torch.long).reshape(-1, 2)
                if left:
                    off[i, width - len(t):] = t
                else:
                    off[i, : len(t)] = t
            batch["offset_mapping"] = off
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._features:
            raise RuntimeError(f"no windows for split {split!r}: call setup() first (have {sorted(self._features)})")
        batch_size = self.batch_size if shuffle else self.eval_batch_size
        return task_loader(self._features[split], batch_size, shuffle, self._collate, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self.train_split not in self._raw:
            raise ValueError(f"no training split {self.train_split!r} in {self.data_files or self.dataset}")
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation split (SQuAD's test set is hidden)."""
        return self.val_dataloader()


SQuADDataModule = SquadDataModule

__all__ = ["COLUMNS", "HUB_DATASETS", "SQuADDataModule", "SquadDataModule", "check_example", "read_official_json"]
