"""RoCoFT as a Lightning callback: any LightningModule holding a transformer gets row/column fine-tuning.

Lightning runs ``Callback.setup`` after the datamodule's setup and before ``configure_model``, checkpoint
restore, strategy wrapping (DDP/FSDP) and ``configure_optimizers``, so the callback adapts the model there.
A backbone that only appears in ``configure_model`` is adapted right after that hook instead, still before
the strategy wraps it. Indices are persistent buffers, so resuming from a checkpoint restores them.

One class serves both Lightning namespaces: ``RoCoFT`` subclasses ``lightning.pytorch.Callback`` and, when the
standalone ``pytorch_lightning`` package is importable (lightning installs it), ``pytorch_lightning.Callback``
too, so either Trainer, and either ``LightningCLI`` (``class_path: rocoft_pl.RoCoFT``), accepts it. Nothing
here calls a namespace's own helpers on the user's module (``is_overridden`` refuses the other namespace's
modules with "Expected a parent").

Messages go to the ``rocoft_pl`` logger (info: the parameter summary and where the adapter went; debug: the
per-layer table, or info with ``print_layers=True``), from global rank 0 only.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning_utilities.core.overrides import is_overridden as _is_overridden_against

from .adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_metadata,
    adapter_state_dict,
    check_finite,
    check_replaceable,
    config_of,
    hf_model_in,
    load_adapter,
    write_adapter,
)
from .config import Mode, RoCoFTConfig, Selection
from .inject import RoCoFTReport, apply_rocoft, find_heads, find_targets, record_config, rocoft_layers
from .quantized import check_packed_storage, is_quantized, keep_trainable_layout
from .reselect import (
    CRITERIA,
    QUANTIZED_W0,
    RESELECT_MODES,
    Criterion,
    ProbeStats,
    attach_probe,
    consolidate,
    fold,
    folded_state,
    is_folded,
    pick,
    reselect_generator,
    scores_from_stats,
)

from .callback_base import CALLBACK_BASES, log

_LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning")


class RoCoFT(*CALLBACK_BASES):  # type: ignore[misc]
    """Apply RoCoFT to the LightningModule on setup.

    Args:
        mode: 'row', 'column', 'both' (r rows and r columns) or 'entries' (see RoCoFTConfig).
        rank: rows/columns trained per matrix (mode 'both': of each).
        p: entries mode: probability per entry.
        targets: None (every Linear/Conv1D in the transformer blocks), module-name suffixes, or a regex.
        selection: 'first', 'random', or Wanda 'max' / 'min' / 'mixed'.
        seed: seed for random selection.
        train_bias: also train the biases of the adapted layers.
        modules_to_save: modules trained fully (None: auto-detect the task head).
        calibration_batches: Wanda: how many training batches to score activations on.
        adapter_dir: save the adapter here when fit ends (rank 0 writes). Checked in setup, before training:
            it (or, when missing, its nearest existing parent) must be a writable directory.
        load_adapter_from: instead of selecting, load this adapter (for validate / test / predict): a
            directory with readable adapter_config.json and adapter_model.safetensors.
        adapter_only_checkpoint: Lightning checkpoints keep only the trained tensors and indices
            (KB to MB instead of the whole model); resuming needs the same base weights. Sharded strategies
            must write full checkpoints (ModelParallelStrategy: ``save_distributed_checkpoint=False``).
        print_layers: log the per-layer table (module, shape, rows/columns selected, trainable) at info
            level; by default only the summary lines are (the table goes to the ``rocoft_pl`` logger's
            debug level).
        reselect_every: re-selection (modes 'row' and 'column'; off by default, None): every K optimizer
            steps fold each delta into W0 and train the r rows (columns) ``reselect_by`` picks, with fresh
            optimizer state (see ``rocoft_pl.reselect``). The criterion sees the batches of the step before
            each round (a probe, all its micro-batches under gradient accumulation); no round after the run's
            last step. Under DDP every rank takes rank 0's choice; sharded strategies (FSDP, model
            parallel, DeepSpeed) are refused. When fit ends the folds are consolidated into one adapter
            exact against the original W0 over every row trained (rank R = the most rows a layer touched, up
            to r * (rounds + 1)), which ``adapter_dir`` receives. Lightning checkpoints written after a round
            hold a folded W0 without its original rows, so neither resuming nor evaluating from them is
            exact: loading such a checkpoint is refused; evaluate the saved adapter instead.
        reselect_by: the criterion: 'gradient' (largest norm of the full row's weight gradient on the probe),
            'wanda' (Wanda score of W0 + R with the probe's input norms) or 'random' (seeded per module and
            round).
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
        print_layers: bool = False,
        reselect_every: Optional[int] = None,
        reselect_by: Criterion = "gradient",
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
        if load_adapter_from is not None:
            if not Path(load_adapter_from).is_dir():
                raise FileNotFoundError(f"load_adapter_from: no adapter directory at {load_adapter_from}")
            _check_adapter_files(load_adapter_from, read=False)
        self.calibration_batches = calibration_batches
        self.adapter_dir = adapter_dir
        self.load_adapter_from = load_adapter_from
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.print_layers = print_layers
        self.report: Optional[RoCoFTReport] = None
        _check_reselect(self.config, reselect_every, reselect_by, load_adapter_from)
        self.reselect_every = reselect_every
        self.reselect_by = reselect_by
        self.reselect_rounds = 0  # rounds done in this fit
        self._probe: Optional[dict[str, ProbeStats]] = None
        self._probe_handles: list[Any] = []
        self._probe_mask: Optional[Any] = None
        self._step_before = 0

    # -- applying ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Paths first: a bad adapter_dir must fail now, not after training, when the adapter would be lost.
        if stage == "fit" and self.adapter_dir is not None:
            self._check_adapter_dir(trainer)
        if self.load_adapter_from is not None:
            _check_adapter_files(self.load_adapter_from, read=True)  # every rank reads it
        _refuse_fsdp1(trainer)
        if stage == "fit" and self.reselect_every is not None:
            _refuse_sharded_strategy(trainer)
        if rocoft_layers(pl_module) or getattr(pl_module, "_rocoft_deferred", False):
            return  # idempotent: setup runs again for validate / test / predict
        self._guard_checkpoint_loading(pl_module)
        if self._has_targets(pl_module) or not _overrides(pl_module, "configure_model"):
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
        _check_quantizing_plugin(trainer, pl_module, self.config, self.reselect_every)
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
            record_config(pl_module, self.config)  # the placeholder selection above is not what we trained
        if self.adapter_only_checkpoint:
            if stage == "fit":
                self._check_checkpoint_format(trainer)
            pl_module.strict_loading = False
        if trainer.is_global_zero:
            report, layers = self.report, len(self.report.modules)
            log.info("RoCoFT (%s) on %d layers:\n%s", self._describe(), layers, report.summary())
            log.log(logging.INFO if self.print_layers else logging.DEBUG, "%s", report.table())

    def _check_adapter_dir(self, trainer: pl.Trainer) -> None:
        """Rank 0 checks that the adapter can be written there (a writable place, and no files of the user's
        that replacing the directory would drop); every rank raises its verdict (a collective)."""
        error: Optional[Exception] = None
        if trainer.is_global_zero:
            try:
                check_writable_dir(self.adapter_dir)  # type: ignore[arg-type]
                check_replaceable(self.adapter_dir)  # type: ignore[arg-type]
            except (OSError, ValueError) as err:
                error = err
        if trainer.world_size > 1:
            error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise error

    def _describe(self) -> str:
        c = self.config
        size = f"p={c.p}" if c.mode == "entries" else f"r={c.rank}"
        return f"{c.mode}, {size}, selection={c.selection}"

    @staticmethod
    def _train_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if trainer.datamodule is not None and _overrides(trainer.datamodule, "train_dataloader"):
            return trainer.datamodule.train_dataloader()
        if _overrides(pl_module, "train_dataloader"):
            return pl_module.train_dataloader()
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            return source.dataloader()
        raise ValueError("Wanda selection (max/min/mixed) needs a training dataloader for calibration")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the strategy set the model up (a precision plugin may have made W0 quantized only now)."""
        keep_trainable_layout(pl_module)  # bitsandbytes' CPU inference layout has no backward (rocoft_pl.quantized)
        check_packed_storage(pl_module)
        if self.reselect_every is not None and any(is_quantized(layer.base) for layer in rocoft_layers(pl_module).values()):
            raise ValueError(f"RoCoFT reselect_every: {QUANTIZED_W0}")

    # -- re-selection ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.reselect_every is None:
            return
        self._step_before = trainer.global_step
        self._probe_mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if self._probe is None and self._round_due(trainer, trainer.global_step + 1):
            # Every batch of the step before a round (all micro-batches under accumulation) is the probe.
            self._probe, self._probe_handles = attach_probe(
                rocoft_layers(pl_module), self.reselect_by, lambda: self._probe_mask
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning calls this after the optimizer step; under gradient accumulation most batches do not step.
        if self.reselect_every is None or trainer.global_step == self._step_before:
            return
        step = trainer.global_step
        if step % self.reselect_every != 0:
            return
        if not self._round_due(trainer, step):
            self._detach_probe()
            return
        try:
            self._reselect(trainer, pl_module, step)
        finally:
            self._detach_probe()

    def _round_due(self, trainer: pl.Trainer, step: int) -> bool:
        """A round follows optimizer step ``step`` (1-based) unless it is the run's last one (max_steps, or
        the end of the last epoch under limit_train_batches / max_epochs): its new rows would never train."""
        # The modulo first: estimated_stepping_batches is recomputed on every access, and this runs every batch.
        return step % self.reselect_every == 0 and step < trainer.estimated_stepping_batches  # type: ignore[operator]

    def _detach_probe(self) -> None:
        for handle in self._probe_handles:
            handle.remove()
        self._probe, self._probe_handles, self._probe_mask = None, [], None

    def _reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """One round: scores, fold and new rows on every layer, rank 0's choice everywhere, fresh optimizer
        state for the deltas."""
        round_ = self.reselect_rounds + 1
        layers = rocoft_layers(pl_module)
        probe = self._probe or {}
        old = {name: layer.indices.cpu().clone() for name, layer in layers.items()}  # set_indices writes in place
        for name, layer in layers.items():
            stats = probe.get(name)
            seen = None if stats is None else stats.grad_sq if self.reselect_by == "gradient" else stats.input_sq
            if self.reselect_by == "random" or seen is not None:
                new = pick(layer, scores_from_stats(layer, self.reselect_by, stats, reselect_generator(self.config.seed, name, round_)))
            else:  # a layer the probe never reached (unused in that step) keeps its rows; its delta is folded
                new = old[name]
            fold(layer, new)
        _use_rank_zero_indices(trainer, pl_module)  # scores come from each rank's own batches
        changed = sum(int((~torch.isin(layer.indices.cpu(), old[n])).sum()) for n, layer in layers.items())
        deltas = [d for layer in layers.values() for d in layer.deltas.values()]
        for optimizer in trainer.optimizers:
            for delta in deltas:
                optimizer.state.pop(delta, None)
        for delta in deltas:
            delta.grad = None
        self.reselect_rounds = round_
        if trainer.is_global_zero:
            touched = sum(_touched(layer) for layer in layers.values())
            what = "rows" if self.config.mode == "row" else "columns"
            log.info(
                "RoCoFT re-selection round %d at step %d (%s): %d %s changed, %d touched so far in %d layers",
                round_, step, self.reselect_by, changed, what, touched, len(layers),
            )

    # -- saving -----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach_probe()
        if is_folded(pl_module):
            # Every rank (the same deterministic change): the model is then an ordinary RoCoFT model again.
            made = consolidate(pl_module)
            if trainer.is_global_zero:
                log.info(
                    "RoCoFT re-selection: %d rounds consolidated into one adapter of rank %d (r=%d trained at a "
                    "time; %d rows/columns touched in all), %d delta elements",
                    self.reselect_rounds, made.rank, self.config.rank, sum(made.touched.values()), made.elements,
                )
        if self.adapter_dir is None:
            return
        # Every rank gathers (FSDP2 shards are DTensors); only rank 0 writes.
        state = adapter_state_dict(pl_module)
        metadata = adapter_metadata(pl_module, config_of(pl_module))
        check_finite(state)  # on every rank (the state is gathered): a diverged run fails everywhere, no hang
        if trainer.is_global_zero:
            write_adapter(self.adapter_dir, state, metadata)
            log.info("RoCoFT adapter saved to %s", self.adapter_dir)
        trainer.strategy.barrier("rocoft_adapter_saved")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.adapter_only_checkpoint or "state_dict" not in checkpoint:
            return
        keep = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        keep |= {f"{n}.adapters.{k}" for n, layer in rocoft_layers(pl_module).items() for k in layer.adapters.state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @staticmethod
    def _check_checkpoint_format(trainer: pl.Trainer) -> None:
        """Refuse adapter-only checkpoints that could never be resumed: a distributed checkpoint (one file per
        rank, ModelParallelStrategy's ``save_distributed_checkpoint``) is loaded key by key into the whole
        model, and torch.distributed.checkpoint raises "Missing key" for every frozen weight it lacks. A full
        checkpoint (rank 0 writes one file of the trained tensors) loads partially and resumes exactly."""
        if getattr(trainer.strategy, "_save_distributed_checkpoint", False):
            raise ValueError(
                f"RoCoFT adapter_only_checkpoint: {type(trainer.strategy).__name__} writes distributed checkpoints, "
                "which cannot be resumed without the frozen weights. Set the strategy's save_distributed_checkpoint "
                "to false (the checkpoint holds only the trained tensors: rank 0 writes one small file), or "
                "adapter_only_checkpoint to false"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "reselect_rounds": self.reselect_rounds}

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
            rounds = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("reselect_rounds", 0)
            if rounds:
                raise ValueError(
                    f"checkpoint was written after {rounds} RoCoFT re-selection rounds: its W0 holds folded rows "
                    "whose original values it does not keep, so the run cannot be resumed (or its adapter saved) "
                    "exactly. Evaluate the adapter saved at the end of fit (adapter_dir) instead"
                )
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    @property
    def parameter_report(self) -> Optional[RoCoFTReport]:
        return self.report


def check_writable_dir(path: Union[str, os.PathLike]) -> None:
    """Raise an OSError naming ``path`` unless an adapter can be saved there: ``path`` (symlinks resolved, as
    write_adapter does) is a directory that it and its parent allow writing in (the adapter is written beside
    it and swapped in), or does not exist yet and its nearest existing parent is a writable directory. Probe
    directories are made and removed again; nothing is created or left behind."""
    given = Path(path)
    real = Path(os.path.realpath(given))
    target = real
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        what = "exists and is not a directory"
        if target != real:
            what = f"cannot be created: {target} is not a directory"
        raise NotADirectoryError(f"RoCoFT adapter_dir {given} {what}")
    for where in (target.parent, target) if target == real else (target,):
        try:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".rocoft-write-check-"))
        except OSError as err:
            raise type(err)(f"RoCoFT adapter_dir {given}: cannot write in {where} ({err.strerror or err})") from None


def _check_adapter_files(path: Union[str, os.PathLike], read: bool) -> None:
    """load_adapter_from must hold both adapter files; with ``read``, they must open (read 1 byte)."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        f = Path(path) / name
        if not f.is_file():
            raise FileNotFoundError(f"load_adapter_from: {path} has no {name} (not a saved RoCoFT adapter?)")
        if read:
            try:
                with open(f, "rb") as handle:
                    handle.read(1)
            except OSError as err:
                raise type(err)(f"load_adapter_from: cannot read {f} ({err.strerror or err})") from None


def _overrides(obj: Any, method: str) -> bool:
    """Whether ``obj`` (a LightningModule or LightningDataModule of either namespace) implements ``method``
    itself instead of inheriting Lightning's default. Lightning's ``is_overridden`` only knows its own
    namespace and raises "Expected a parent" for the other's modules."""
    parent = next(
        (
            k
            for k in type(obj).__mro__
            if k.__name__ in ("LightningModule", "LightningDataModule")
            and k.__module__.split(".")[0] in _LIGHTNING_PACKAGES
        ),
        None,
    )
    if parent is None:  # not a Lightning class: anything callable counts
        return callable(getattr(obj, method, None))
    return _is_overridden_against(method, obj, parent)


def _use_rank_zero_indices(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Wanda scores the batches each rank sees (with a DistributedSampler or per-rank data they differ), so
    ranks may choose different rows. DDP happens to broadcast buffers from rank 0; FSDP2 does not, and every
    rank would train other rows under one reduced gradient. Take rank 0's choice everywhere (a collective)."""
    if trainer.world_size <= 1:
        return
    layers = rocoft_layers(pl_module)
    chosen = trainer.strategy.broadcast({n: layer.cpu_indices() for n, layer in layers.items()}, src=0)
    for name, layer in layers.items():
        layer.set_indices(chosen[name])


def _touched(layer: Any) -> int:
    """Rows (columns) a layer has trained so far: folded ones and the current ones."""
    state = folded_state(layer)
    current = layer.indices.cpu()
    return int(current.numel() if state is None else torch.unique(torch.cat([state.touched.cpu(), current])).numel())


def _check_reselect(
    config: RoCoFTConfig, reselect_every: Optional[int], reselect_by: str, load_adapter_from: Optional[str]
) -> None:
    if reselect_by not in CRITERIA:
        raise ValueError(f"reselect_by must be one of {CRITERIA}, got {reselect_by!r}")
    if reselect_every is None:
        return
    if isinstance(reselect_every, bool) or not isinstance(reselect_every, int) or reselect_every < 1:
        raise ValueError(f"reselect_every must be None (off) or an int >= 1 (optimizer steps), got {reselect_every!r}")
    if config.mode not in RESELECT_MODES:
        raise ValueError(f"reselect_every: re-selection works in modes {RESELECT_MODES}, not mode {config.mode!r}")
    if load_adapter_from is not None:
        raise ValueError("reselect_every trains; it does not go with load_adapter_from (evaluation)")


_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def _refuse_sharded_strategy(trainer: pl.Trainer) -> None:
    """Folding writes W0 in place and reads whole rows: with W0 sharded across ranks it would not."""
    names = {k.__name__ for k in type(trainer.strategy).__mro__}
    if names & set(_SHARDED_STRATEGIES):
        raise ValueError(
            f"RoCoFT reselect_every is not supported under {type(trainer.strategy).__name__} (sharded weights); "
            "use a single device or DDP"
        )


def _check_quantizing_plugin(
    trainer: pl.Trainer, pl_module: pl.LightningModule, config: RoCoFTConfig, reselect_every: Optional[int]
) -> None:
    """Lightning's BitsandbytesPrecision replaces the model's nn.Linear layers by 4 / 8-bit ones in the strategy's
    setup, after this callback adapted the model (it reaches the Linears inside RoCoFT layers too, which then run
    the quantized kernel). It would also replace a trained head's Linears by frozen quantized ones and drop the
    trained biases (new frozen parameters, after which the optimizer is built without them): refuse those here,
    before anything changes, with the setting that avoids them."""
    plugin = getattr(trainer.strategy, "precision_plugin", None)
    if not any(k.__name__ == "BitsandbytesPrecision" for k in type(plugin).__mro__):
        return
    ignored = set(getattr(plugin, "ignore_modules", None) or ())
    heads = sorted(n for n in find_heads(pl_module, config) if not any(n.startswith(s) for s in ignored))
    if heads:
        keep = sorted(ignored | set(heads))
        raise ValueError(
            f"BitsandbytesPrecision would replace the trained head {heads} by a frozen quantized layer: pass "
            f"BitsandbytesPrecision(..., ignore_modules={set(keep)}) so it stays trainable"
        )
    if config.train_bias:
        raise ValueError(
            "RoCoFT train_bias does not work with BitsandbytesPrecision: the plugin swaps in new, frozen biases "
            "after RoCoFT set them to train. Load the model quantized instead (CausalLMModule(quantization=...), "
            "transformers' BitsAndBytesConfig), or set train_bias: false"
        )
    if reselect_every is not None:
        raise ValueError(f"RoCoFT reselect_every: {QUANTIZED_W0}")


def _refuse_fsdp1(trainer: pl.Trainer) -> None:
    """FSDP1 (Lightning's FSDPStrategy) flattens each wrapped block into one FlatParameter: the adapter read on
    rank 0 holds flattened, partly empty deltas under wrapper names (unusable), and a block mixing frozen W0
    with trained deltas gets gradient memory for all of it. FSDP2 shards per parameter and has neither."""
    if any(k.__name__ == "FSDPStrategy" for k in type(trainer.strategy).__mro__):
        raise ValueError(
            "RoCoFT does not support FSDPStrategy (FSDP1): its flat parameters make the saved adapter unusable "
            "and allocate gradients for the frozen weights. Use ModelParallelStrategy (FSDP2, per-parameter "
            "sharding): see configs/fsdp/*.yaml and README's LLM section"
        )


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
