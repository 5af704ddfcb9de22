"""LightningCLI entry point for tests: `python tests/scripts/cli_fit.py fit --config CONFIG.yaml`.

Any LightningModule can be named by class_path (e.g. cli_fit.TinyClassifier, with tests/scripts on
PYTHONPATH); callbacks such as rocoft_pl.RoCoFT go under trainer.callbacks in the YAML.
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

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for rocoft_pl without install


class TinyClassifier(pl.LightningModule):
    """A 2-block BERT classifier built from a config (no download), with its own deterministic data."""

    def __init__(self, lr: float = 1e-2, batch_size: int = 4) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.save_hyperparameters()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.model = BertForSequenceClassification(config)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        rows = [
            {"input_ids": torch.randint(1, 64, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": torch.tensor(i % 2)}
            for i in range(16)
        ]
        return DataLoader(rows, batch_size=self.hparams.batch_size)

    def training_step(self, batch, _):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def main(args=None):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
