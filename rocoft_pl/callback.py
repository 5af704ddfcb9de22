"""RoCoFT as a Lightning callback: any LightningModule holding a transformer gets row/column fine-tuning.

Lightning runs ``Callback.setup`` after the datamodule's setup and before ``configure_model``, checkpoint
restore, strategy wrapping (DDP/FSDP) and ``configure_optimizers``, so the callback adapts the model there.
A backbone that only appears in ``configure_model`` is adapted right after that hook instead, still before
the strategy wraps it. Indices are persistent buffers, so resuming from a checkpoint restores them.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from .adapter import adapter_metadata, adapter_state_dict, config_of, hf_model_in, load_adapter, write_adapter
from .config import Mode, RoCoFTConfig, Selection
from .inject import RoCoFTReport, apply_rocoft, find_heads, find_targets, rocoft_layers


class RoCoFT(pl.Callback):
    """Apply RoCoFT to the LightningModule on setup.

    Args:
        mode: 'row', 'column' or 'entries' (see RoCoFTConfig).
        rank: rows/columns trained per matrix.
        p: entries mode: probability per entry.
        targets: None (every Linear/Conv1D in the transformer blocks), module-name suffixes, or a regex.
        selection: 'first', 'random', or Wanda 'max' / 'min' / 'mixed'.
        seed: seed for random selection.
        train_bias: also train the biases of the adapted layers.
        modules_to_save: modules trained fully (None: auto-detect the task head).
        calibration_batches: Wanda: how many training batches to score activations on.
        adapter_dir: save the adapter here when fit ends (rank 0 writes).
        load_adapter_from: instead of selecting, load this adapter (for validate / test / predict).
        adapter_only_checkpoint: Lightning checkpoints keep only the trained tensors and indices
            (KB to MB instead of the whole model); resuming needs the same base weights.
    """

    def __init__(
        self,
        mode: Mode = "row",
        rank: int = 3,
        p: float = 0.1,
        targets: Optional[Union[list[str], str]] = None,
        selection: Selection = "first",
        seed: int = 0,
        train_bias: bool = False,
        modules_to_save: Optional[list[str]] = None,
        calibration_batches: int = 8,
        adapter_dir: Optional[str] = None,
        load_adapter_from: Optional[str] = None,
        adapter_only_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.config = RoCoFTConfig(
            mode=mode,  # type: ignore[arg-type]
            rank=rank,
            p=p,
            targets=targets,
            selection=selection,  # type: ignore[arg-type]
            seed=seed,
            train_bias=train_bias,
            modules_to_save=modules_to_save,
        )
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if load_adapter_from is not None and not Path(load_adapter_from).is_dir():
            raise FileNotFoundError(f"load_adapter_from: no adapter directory at {load_adapter_from}")
        self.calibration_batches = calibration_batches
        self.adapter_dir = adapter_dir
        self.load_adapter_from = load_adapter_from
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.report: Optional[RoCoFTReport] = None

    # -- applying ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if rocoft_layers(pl_module) or getattr(pl_module, "_rocoft_deferred", False):
            return  # idempotent: setup runs again for validate / test / predict
        self._guard_checkpoint_loading(pl_module)
        if self._has_targets(pl_module) or not is_overridden("configure_model", pl_module):
            self._apply(trainer, pl_module, stage)
            return
        # The backbone is built lazily: adapt it right after the module's own configure_model.
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_model_then_rocoft() -> None:
            original()
            if not rocoft_layers(pl_module):
                self._apply(trainer, pl_module, stage)

        pl_module.configure_model = configure_model_then_rocoft  # type: ignore[method-assign]
        pl_module._rocoft_deferred = True

    def _has_targets(self, pl_module: pl.LightningModule) -> bool:
        try:
            find_targets(pl_module, self.config, find_heads(pl_module, self.config))
        except ValueError:
            return False
        return True

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _refuse_sharded(pl_module)
        if self.load_adapter_from is not None:
            self.report = load_adapter(pl_module, self.load_adapter_from)
        else:
            config, calibration, forward = self.config, None, None
            if config.needs_calibration:
                if stage != "fit":
                    # Evaluation only: indices come from a checkpoint, or the delta is zero and they do not
                    # matter. Skip scoring (there may be no training data) and use placeholders.
                    config = RoCoFTConfig(**{**config.to_dict(), "selection": "first"})
                else:
                    loader = self._train_dataloader(trainer, pl_module)
                    calibration = itertools.islice(loader, self.calibration_batches)
                    forward = hf_model_in(pl_module)
            self.report = apply_rocoft(pl_module, config, calibration, forward=forward)
            if calibration is not None:
                _use_rank_zero_indices(trainer, pl_module)
            pl_module._rocoft_config = self.config  # the placeholder selection above is not what we trained
        if self.adapter_only_checkpoint:
            pl_module.strict_loading = False
        rank_zero_info(f"RoCoFT ({self._describe()}):\n{self.report}")

    def _describe(self) -> str:
        c = self.config
        size = f"p={c.p}" if c.mode == "entries" else f"r={c.rank}"
        return f"{c.mode}, {size}, selection={c.selection}"

    @staticmethod
    def _train_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if trainer.datamodule is not None and is_overridden("train_dataloader", trainer.datamodule):
            return trainer.datamodule.train_dataloader()
        if is_overridden("train_dataloader", pl_module):
            return pl_module.train_dataloader()
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            return source.dataloader()
        raise ValueError("Wanda selection (max/min/mixed) needs a training dataloader for calibration")

    # -- saving -----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_dir is None:
            return
        # Every rank gathers (FSDP2 shards are DTensors); only rank 0 writes.
        state = adapter_state_dict(pl_module)
        metadata = adapter_metadata(pl_module, config_of(pl_module))
        if trainer.is_global_zero:
            write_adapter(self.adapter_dir, state, metadata)
            rank_zero_info(f"RoCoFT adapter saved to {self.adapter_dir}")
        trainer.strategy.barrier("rocoft_adapter_saved")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.adapter_only_checkpoint or "state_dict" not in checkpoint:
            return
        keep = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        keep |= {f"{n}.indices" for n in rocoft_layers(pl_module)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def _guard_checkpoint_loading(self, pl_module: pl.LightningModule) -> None:
        """Refuse a checkpoint trained with another RoCoFT config. Lightning calls the module's
        on_load_checkpoint before loading weights but restores callback state only after, so hook there."""
        original = pl_module.on_load_checkpoint

        @functools.wraps(original)
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            saved = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("config")
            current = self.config.to_dict()
            if saved is not None and saved != current:
                changed = sorted(k for k in saved if saved[k] != current.get(k))
                raise ValueError(f"checkpoint was trained with another RoCoFT config; fields differ: {changed}")
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    @property
    def parameter_report(self) -> Optional[RoCoFTReport]:
        return self.report


def _use_rank_zero_indices(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wanda scores the batches each rank sees (with a DistributedSampler or per-rank data they differ), so
    ranks may choose different rows. DDP happens to broadcast buffers from rank 0; FSDP2 does not, and every
    rank would train other rows under one reduced gradient. Take rank 0's choice everywhere (a collective)."""
    if trainer.world_size <= 1:
        return
    layers = rocoft_layers(pl_module)
    chosen = trainer.strategy.broadcast({n: layer.indices.cpu() for n, layer in layers.items()}, src=0)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.indices.copy_(chosen[name].to(layer.indices.device))
            layer._indices_cpu = chosen[name].clone()


def _refuse_sharded(pl_module: pl.LightningModule) -> None:
    """RoCoFT must replace the Linear layers before FSDP2 / tensor parallelism shards them. Adapting already
    sharded layers would give every rank its own unsynchronised plain-tensor delta: training "works" but
    the ranks silently diverge. This happens when configure_model both builds and shards the backbone."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return
    if any(isinstance(p, DTensor) for p in pl_module.parameters()):
        raise RuntimeError(
            "RoCoFT: the model's parameters are already sharded (DTensor, e.g. fully_shard in configure_model) "
            "before RoCoFT could adapt them. Build the backbone in the LightningModule's __init__ so the RoCoFT "
            "callback adapts it in setup(), before configure_model shards it; or call rocoft_pl.apply_rocoft "
            "in configure_model before fully_shard."
        )


__all__ = ["RoCoFT"]
