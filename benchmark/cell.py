"""One grid cell in its own process: `python -m benchmark.cell CELL.json RESULT.json [--resume]`.

Builds the LightningModule, DataModule and Trainer from the cell's LightningCLI config, adds the method's
callback, fits, validates, and writes the result record (metrics, parameter counts, time, memory,
adapter size). The runner records failures from the exit code and the log, so this file only succeeds.
Started by a runner, the cell first arranges to die with it (benchmark/orphans.py), before the slow imports.
``--resume`` (a cluster job requeued after a preemption or its time limit, benchmark/cluster_job.py) goes on
from the newest Lightning checkpoint in the cell's directory, if its trainer wrote one there.
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmark.orphans import die_with_runner

    die_with_runner()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from .methods import counts_of, method_callback  # noqa: E402


class Meter(pl.Callback):
    """Training wall time without validation, batches seen, peak memory, and the learning curve: one point
    per validation during fit (``trainer.val_check_interval``) with the training seconds spent so far."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.batches = 0
        self.curve: list[dict[str, Any]] = []
        self._epoch_start = 0.0
        self._val_s = 0.0
        self._val_start = 0.0
        self._train_s_at_val = 0.0
        self.start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step  # > 0 when fit resumed from a checkpoint

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start, self._val_s = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()
        self._train_s_at_val = self.train_s + self._val_start - self._epoch_start - self._val_s

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_s += time.perf_counter() - self._val_start
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = {k.split("/dataloader_idx")[0]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            self.curve.append({"step": trainer.global_step, "train_s": self._train_s_at_val, "metrics": metrics})

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_s += time.perf_counter() - self._epoch_start - self._val_s

    @staticmethod
    def peak_memory() -> tuple[int, str]:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def cli_class() -> type:
    """The project's LightningCLI (with its argument links) when present, else Lightning's."""
    try:
        from rocoft_pl.cli import RoCoFTCLI

        return RoCoFTCLI
    except ImportError:
        from lightning.pytorch.cli import LightningCLI

        return LightningCLI


def _adapter_bytes(callback: pl.Callback, pl_module: pl.LightningModule, out_dir: Path, writer: bool) -> int:
    """Bytes of the saved adapter. Every rank of a multi-GPU cell gathers (FSDP2 shards are DTensors: a
    collective); only the ``writer`` (global rank 0) writes it."""
    from rocoft_pl import RoCoFT
    from rocoft_pl.adapter import adapter_metadata, adapter_state_dict, config_of, write_adapter

    if isinstance(callback, RoCoFT):
        state = adapter_state_dict(pl_module)
        if not writer:
            return 0
        path = write_adapter(out_dir / "adapter", state, adapter_metadata(pl_module, config_of(pl_module)))
        return sum(f.stat().st_size for f in path.iterdir())
    # Other methods: the bytes of their trainable tensors (what a PEFT-style adapter file holds).
    return sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("rocoft-pl", "torch", "lightning", "transformers", "peft", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest ``*.ckpt`` under the cell's directory (its trainer's default_root_dir), if any."""
    found = [p for p in out_dir.rglob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_cell(cell: dict[str, Any], out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Fit and validate the cell; the record (``global_rank``: of this process; a multi-GPU cell runs here
    once per GPU, and only rank 0's record is written). ``resume``: from the newest checkpoint in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out_dir) if resume else None
    method = method_callback(cell["method"], **cell["method_params"])
    meter = Meter()
    cli = cli_class()(
        args=cell["config"],
        run=False,
        trainer_defaults={"callbacks": [method, meter], "default_root_dir": str(out_dir)},
        save_config_callback=None,
    )
    trainer, module = cli.trainer, cli.model
    started = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt else None)
    metrics: dict[str, float] = {}
    for d in trainer.validate(module, datamodule=cli.datamodule, verbose=False):
        metrics.update({k.split("/dataloader_idx")[0]: float(v) for k, v in d.items()})
    counts = counts_of(method, module)
    batches_per_epoch = trainer.num_training_batches
    per_epoch = meter.train_s * batches_per_epoch / meter.batches if meter.batches and batches_per_epoch not in (0, float("inf")) else None
    memory, memory_kind = meter.peak_memory()
    return {
        **{k: cell[k] for k in ("cell_id", "model", "task", "method", "method_label", "method_params", "seed", "config_hash", "primary_metrics")},
        "status": "ok",
        "error": None,
        "metrics": metrics,
        "adapter_params": counts.adapter_params,
        "head_params": counts.head_params,
        "trainable_params": counts.trainable_params,
        "total_params": counts.total_params,
        "train_time_s": meter.train_s,
        "train_batches": meter.batches,
        "train_time_per_epoch_s": per_epoch,
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
        "adapter_bytes": _adapter_bytes(method, module, out_dir, trainer.is_global_zero),
        "world_size": trainer.world_size,
        "global_rank": trainer.global_rank,
        "curve": meter.curve,
        **({"resumed_from": str(ckpt), "resumed_from_step": meter.start_step} if ckpt else {}),
        "fit_validate_s": time.perf_counter() - started,
        "versions": _versions(),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmark.cell CELL.json RESULT.json [--resume]")
    cell_path, result_path = Path(argv[0]), Path(argv[1])
    cell = json.loads(cell_path.read_text())
    record = run_cell(cell, result_path.parent, resume)
    if record.pop("global_rank"):
        return  # rank 0 writes the cell's one result
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(result_path)


if __name__ == "__main__":
    main()
