"""A project written against the standalone ``pytorch_lightning`` package (as the official Lightning tutorials
are), not ``lightning.pytorch``: `python tests/scripts/ptl_fit.py fit --config CONFIG.yaml` runs
``pytorch_lightning.cli.LightningCLI``; the classes serve the in-process tests too (tests/test_pytorch_lightning.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "rocoft-test-hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402  (deliberately not lightning.pytorch)
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for rocoft_pl without install


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1, 64, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long),
         "labels": torch.tensor(i % 2)}
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=batch_size)


class TinyClassifier(pl.LightningModule):
    """A 2-block BERT classifier; counts its training steps."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_bert()
        self.steps_run = 0

    def training_step(self, batch, _):
        self.steps_run += 1
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TinyClassifierWithData(TinyClassifier):
    """Brings its own training data (train_dataloader on the module)."""

    def train_dataloader(self):
        return tiny_loader()


class LazyClassifier(TinyClassifier):
    """Builds its backbone in configure_model, after Callback.setup."""

    def __init__(self, lr: float = 1e-2) -> None:
        pl.LightningModule.__init__(self)
        self.lr = lr
        self.model = None
        self.steps_run = 0

    def configure_model(self):
        if self.model is None:
            self.model = tiny_bert()


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return tiny_loader()


def main(args=None):
    from pytorch_lightning.cli import LightningCLI

    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
