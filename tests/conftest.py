"""Offline by construction: the Hugging Face variables are set before anything imports transformers."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="rocoft-test-hf-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert(**overrides):
    """A 2-layer BERT classifier small enough to train in milliseconds."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def tiny_gpt2():
    """GPT-2 uses transformers' Conv1D, whose weight is stored (in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(config).eval()


def batch(n=4, seq=10, vocab=64, pad_last=3):
    """Token ids with the last ``pad_last`` positions of every other row padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::2, seq - pad_last:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 2}


def tiny_loader(n=16, bs=4):
    """Deterministic classification batches for tiny_bert."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1, 64, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % 2)}
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=bs)


def _tiny_classifier_class():
    import lightning.pytorch as pl

    class TinyClassifier(pl.LightningModule):
        """A plain LightningModule around tiny_bert, as a user would write one."""

        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def validation_step(self, batch, _):
            self.log("val_loss", self.model(**batch).loss)

        test_step = validation_step

        def predict_step(self, batch, _):
            return self.model(**batch).logits

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    return TinyClassifier


TinyClassifier = _tiny_classifier_class()


def assert_adapters_close(got: dict, ref: dict, tol: float = 1e-5) -> None:
    """Two saved adapters (safetensors dicts): the same keys, identical indices, tensors within ``tol``
    (relative, and absolute times the tensor's largest value)."""
    import torch

    assert got.keys() == ref.keys()
    for key in ref:
        if key.endswith(".indices"):
            assert torch.equal(got[key], ref[key]), key
        else:
            scale = ref[key].abs().max().item()
            torch.testing.assert_close(got[key], ref[key], rtol=tol, atol=tol * scale, msg=key)


def trained(model_fn=tiny_bert, **cfg):
    """A RoCoFT model (rank 2, random selection, biases trained) whose trainable tensors moved off zero."""
    from rocoft_pl import RoCoFTConfig, apply_rocoft

    model = model_fn()
    apply_rocoft(model, RoCoFTConfig(**{"rank": 2, "selection": "random", "seed": 3, "train_bias": True, **cfg}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model
