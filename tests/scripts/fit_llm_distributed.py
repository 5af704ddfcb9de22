"""Instruction-tune a tiny Llama with CausalLMModule + ReasoningDataModule + RoCoFT: one process or 2-process
FSDP2 (ModelParallelStrategy, gloo, CPU), then evaluate by generation.

    python tests/scripts/fit_llm_distributed.py RUN[,RUN...] OUT_DIR

RUN: single | fsdp2 | fsdp2-meta (parameters on the meta device, RoCoFT applied, sharded, then rank 0 loads
the checkpoint in OUT_DIR/base and broadcasts); a ``-bf16`` suffix trains under ``bf16-true`` (W0 in bf16, the
deltas float32 masters), ``-mp`` under FSDP2 mixed precision (fp32 model, MixedPrecisionPolicy computing in bf16). Each run writes OUT_DIR/RUN/adapter (rank 0, by the RoCoFT
callback) and OUT_DIR/RUN/info.json (rank 0: world size, strategy, whether deltas were DTensors, validation
metrics). A run that raises writes OUT_DIR/RUN/error.rank<R>.txt and the next run goes ahead.

Comparable runs: the length-grouped sampler gives rank r the rows r, r+2, ... of each global batch of
2 x ``batch`` rows, the loss is the mean over the global batch's response tokens, no dropout, and a large
Adam epsilon (tiny gradients must not turn into sign-like updates that amplify fp noise).
"""

from __future__ import annotations

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tiny_causal_lm as tl  # noqa: E402
from rocoft_pl import RoCoFT, rocoft_layers  # noqa: E402
from rocoft_pl.modules.causal_lm import CausalLMModule  # noqa: E402
from tasks.reasoning import ReasoningDataModule  # noqa: E402

ROCOFT = dict(mode="row", rank=2, selection="random", seed=3)
TRAIN = ["commonsense_170k", "boolq", "piqa", "gsm8k", "math_10k"]  # 16 rows: 4 global batches of 4
EVAL = ["boolq", "gsm8k"]


def save_base(out: Path) -> Path:
    """The 'pretrained' checkpoint every run starts from (and fsdp2-meta loads)."""
    base = Path(out) / "base"
    if not (base / "config.json").exists():
        tl.tiny_llama().save_pretrained(base)
        tl.tiny_tokenizer().save_pretrained(base)
    return base


def datamodule(batch: int) -> ReasoningDataModule:
    dm = ReasoningDataModule("unused", train_datasets=TRAIN, eval_datasets=EVAL,
                             data_files={**tl.DATASET_FILES, **tl.MERGED_FILES}, batch_size=batch, eval_batch_size=1,
                             template="plain", max_length=160, max_eval_samples=2, mega_batch_factor=2, seed=5)
    dm.tokenizer = tl.tiny_tokenizer()
    return dm


class Probe(pl.Callback):
    def __init__(self) -> None:
        self.delta_was_dtensor = None
        self.dtypes: dict[str, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.delta_was_dtensor is None:
            from torch.distributed.tensor import DTensor

            layers = rocoft_layers(pl_module).values()
            self.delta_was_dtensor = all(isinstance(l.delta, DTensor) for l in layers)
            self.dtypes["delta"] = sorted({str(l.delta.dtype) for l in layers})
            self.dtypes["w0"] = sorted({str(l.base.weight.dtype) for l in layers})

    def on_train_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.dtypes["adam_state"] = sorted({str(v.dtype) for s in optimizer.state.values() for k, v in s.items() if k != "step"})


def fit(strategy: str, out: Path, base: Path, steps: int = 3, batch: int = 0, meta: bool = False,
        precision: str = "32-true", param_dtype: str | None = None) -> dict:
    """batch: rows per step per process (default: the same global batch of 4 for 1 or 2 processes)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    out = Path(out)
    batch = batch or (4 if strategy == "single" else 2)
    if strategy == "single":
        kwargs = dict(devices=1, strategy="auto")
    elif strategy == "fsdp2":
        kwargs = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    else:
        raise SystemExit(f"unknown strategy {strategy!r}")
    module = CausalLMModule(str(base), learning_rate=2e-2, warmup_steps=0, adam_epsilon=1e-3, max_new_tokens=3,
                            init_on_meta=meta, tokenizer=tl.tiny_tokenizer(), fsdp_param_dtype=param_dtype)
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=[RoCoFT(**ROCOFT, adapter_dir=str(out / "adapter")), probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=out, precision=precision, **kwargs,
    )
    trainer.fit(module, datamodule=datamodule(batch))
    metrics = trainer.validate(module, datamodule=datamodule(batch), verbose=False)[0]
    info = {
        "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__, "global_step": trainer.global_step,
        "delta_was_dtensor": probe.delta_was_dtensor, "dtypes": probe.dtypes,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    runs, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    base = save_base(out)
    for run in runs:
        strategy, *flags = run.split("-")
        try:
            fit(strategy, out / run, base, meta="meta" in flags, precision="bf16-true" if "bf16" in flags else "32-true",
                param_dtype="bfloat16" if "mp" in flags else None)
        except Exception as err:  # recorded per rank for the tests; later runs still go ahead
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            (out / run).mkdir(parents=True, exist_ok=True)
            (out / run / f"error.rank{rank}.txt").write_text(f"{type(err).__name__}: {err}\n")
            raise


if __name__ == "__main__":
    main()
