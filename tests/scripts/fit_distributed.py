"""Fit a tiny Llama with the RoCoFT callback on CPU: one process, 2-process DDP, or 2-process FSDP2.

    python tests/scripts/fit_distributed.py RUN[,RUN...] OUT_DIR [--steps N] [--batch B]

RUN: single | ddp | fsdp2, optionally with '-lazy' (backbone built in configure_model) and/or '-wanda'
(selection='max', calibrated on the module's train_dataloader, which differs per rank). A run that raises
writes OUT_DIR/RUN/error.rank<R>.txt on each rank and the next run goes ahead. Every rank also writes
OUT_DIR/RUN/indices.rank<R>.json, the indices it trained.

Each run writes OUT_DIR/RUN/adapter (by the callback, rank 0) and OUT_DIR/RUN/info.json (rank 0: world size, strategy,
whether the deltas were FSDP2 DTensors during training, per-step losses).

The data and the optimizer make runs comparable: a fixed token set, no shuffling, no dropout, plain SGD and
a token-mean loss over equal-length rows. With 2 processes each rank takes ``batch`` rows per step (rank 0
the even, rank 1 the odd dataset rows, via an unshuffled DistributedSampler) and gradients are averaged,
so 2 x ``batch`` rows in one process give the same update.

Lightning's 'ddp' / ModelParallelStrategy launcher re-runs this file with LOCAL_RANK etc. set; run it with
those variables absent from the environment (the tests strip them).
"""

from __future__ import annotations

import argparse
import json
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
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for rocoft_pl without install

from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402

VOCAB, SEQ, ROWS = 64, 8, 16
LR = 0.5
# The callback's settings for every run (the tests rebuild the same settings for reference runs).
ROCOFT = dict(mode="row", rank=2, selection="random", seed=3, train_bias=True, modules_to_save=["lm_head"])


def tiny_llama():
    """2 decoder blocks, hidden 16, with biases (to exercise train_bias); no dropout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, attention_bias=True, mlp_bias=True,
        attention_dropout=0.0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def token_rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(1, VOCAB, (ROWS, SEQ), generator=g))


class TinyLM(pl.LightningModule):
    """A causal LM module as a user writes one. ``lazy``: the backbone is built in configure_model.
    ``shard``: configure_model applies FSDP2 (fully_shard per decoder block, then the HF model), as
    ModelParallelStrategy requires; RoCoFT has replaced the Linear layers before that (Callback.setup)."""

    def __init__(self, lazy: bool = False, shard: bool = False, batch: int = 2) -> None:
        super().__init__()
        self.batch = batch
        self.model = None if lazy else tiny_llama()
        self.shard = shard
        self.delta_was_dtensor = None
        self.losses: list[float] = []
        self.first_tokens: list[list[int]] = []  # which rows each step saw (rank 0)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama()
        if self.shard and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self._sharded = True

    def training_step(self, batch, _):
        if self.delta_was_dtensor is None:
            from torch.distributed.tensor import DTensor

            self.delta_was_dtensor = all(isinstance(l.delta, DTensor) for l in rocoft_layers(self).values())
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(float(loss.detach()))
        self.first_tokens.append(batch[:, 0].tolist())
        return loss

    def train_dataloader(self):
        # Lightning's own DistributedSampler always shuffles training data; an explicit unshuffled one gives
        # rank r the rows r, r + world, ... so step k covers rows [k*world*b, (k+1)*world*b) on all ranks.
        rows, sampler = token_rows(), None
        if self.trainer.world_size > 1:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(rows, batch_size=self.batch, shuffle=False, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def fit(strategy: str, out: Path, steps: int = 3, batch: int = 2, lazy: bool = False, wanda: bool = False) -> TinyLM:
    """Fit and return the module (on rank 0 of a distributed run, the callback has written the adapter)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    out = Path(out)
    if strategy == "single":
        kwargs = dict(devices=1, strategy="auto")
    elif strategy == "ddp":
        kwargs = dict(devices=2, strategy="ddp")
    elif strategy == "fsdp2":
        kwargs = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    else:
        raise SystemExit(f"unknown strategy {strategy!r}: single | ddp | fsdp2")
    module = TinyLM(lazy=lazy, shard=strategy == "fsdp2", batch=batch)
    settings = {**ROCOFT, "selection": "max", "calibration_batches": 2} if wanda else ROCOFT
    callback = RoCoFT(**settings, adapter_dir=str(out / "adapter"))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, **kwargs,
    )
    trainer.fit(module)
    out.mkdir(parents=True, exist_ok=True)
    indices = {n: l.indices.tolist() for n, l in rocoft_layers(module).items()}
    (out / f"indices.rank{trainer.global_rank}.json").write_text(json.dumps(indices))
    if trainer.is_global_zero:
        info = {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "delta_was_dtensor": module.delta_was_dtensor,
            "losses": module.losses,
            "first_tokens": module.first_tokens,
            "global_step": trainer.global_step,
        }
        (out / "info.json").write_text(json.dumps(info, indent=2))
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", help="comma-separated runs, each single | ddp | fsdp2 with optional suffixes -lazy, -wanda; "
        "every run writes OUT/<run>/ (the runs share one launch and process group)",
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="rows per step per process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs.split(","):
        strategy, *flags = run.split("-")
        if not set(flags) <= {"lazy", "wanda"}:
            raise SystemExit(f"unknown run {run!r}")
        try:
            lazy, wanda = "lazy" in flags, "wanda" in flags
            fit(strategy, args.out / run, steps=args.steps, batch=args.batch, lazy=lazy, wanda=wanda)
        except Exception as err:  # recorded per rank for the tests; later runs still go ahead
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            (args.out / run).mkdir(parents=True, exist_ok=True)
            (args.out / run / f"error.rank{rank}.txt").write_text(f"{type(err).__name__}: {err}\n")


if __name__ == "__main__":
    main()
