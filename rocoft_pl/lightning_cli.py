"""The Lightning half of ``rocoft`` (rocoft_pl.cli): RoCoFTCLI, LightningCLI with RoCoFT's links, defaults and
preflight. Its own module so that ``rocoft --help`` and the error reporting in rocoft_pl.cli import no Lightning."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import preflight
from .batching import GlobalBatchSize, split_global_batch
from .cli import SUBCOMMANDS


def _resolve_pretrained(name: Any) -> Any:
    """``pkg:<module>`` as a directory; unchanged when that fails, so that the preflight reports it together
    with every other missing input (and the model's constructor raises it when the preflight is skipped)."""
    from .modules.classification import resolve_pretrained

    try:
        return resolve_pretrained(name) if isinstance(name, str) else name
    except ValueError:
        return name


def _parser_kwargs() -> dict[str, Any]:
    """A one-line usage per subcommand: argparse prints the usage before every error, and the generated one
    lists every option of the Trainer, model and data (50 lines above a one-line error). ``--help`` still
    lists them all."""
    kwargs: dict[str, Any] = {"default_env": False}
    for sub in SUBCOMMANDS:
        kwargs[sub] = {"default_env": False, "usage": f"rocoft {sub} [--config CONFIG] [--<key> VALUE ...] (see rocoft {sub} --help)"}
    return kwargs


class RoCoFTCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with RoCoFT's links and defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("parser_kwargs", _parser_kwargs())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "model.init_args.model_name_or_path",
            "data.init_args.tokenizer_name_or_path",
            compute_fn=_resolve_pretrained,
        )
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        # Rows per optimizer step over all devices (``global_batch: {size: N}`` / ``--global_batch.size N``):
        # a callback that LightningCLI adds to the Trainer; off unless a size is given.
        parser.add_lightning_class_args(GlobalBatchSize, "global_batch")

    def before_instantiate_classes(self) -> None:
        """The preflight: every problem with the model and the data in one ``PreflightError``, before the model
        class (whose constructor loads the weights) is built."""
        if preflight.skipped():
            return
        model_args = _init_args(self._get(self.config, "model"))
        problems, notes = preflight.collect([lambda: preflight.model_config_problems(model_args),
                                             _datamodule_check(self._get(self.config, "data")),
                                             lambda: _global_batch_check(self.config.get(str(self.subcommand), self.config))])
        if any("(offline)" in p for p in problems) and preflight.hub_offline():
            notes.append(preflight.offline_note())
        preflight.raise_if_problems(problems, notes)

    def predict(self, model: Any, datamodule: Any = None, **kwargs: Any) -> Any:
        predictions = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        writer = getattr(datamodule, "write_predictions", None)
        if predictions is not None and callable(writer):
            out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
            for path in writer(predictions, out_dir):
                print(f"predictions written to {path}")
        return predictions


def _init_args(config: Any) -> dict[str, Any]:
    """A class's parsed ``init_args`` as a plain dict (empty when the config gives none)."""
    args = config.get("init_args") if hasattr(config, "get") else None
    if args is None:
        return {}
    return args.as_dict() if hasattr(args, "as_dict") else dict(args)


def _global_batch_check(config: Any) -> None:
    """``global_batch.size`` against the devices the trainer config names (GlobalBatchSize checks again at setup,
    where the world size is known for sure: ``devices: auto`` is not checked here)."""
    size = config.get("global_batch", {}).get("size")
    trainer = config.get("trainer", {})
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    world = len(devices) if isinstance(devices, (list, tuple)) else devices
    if isinstance(world, str) and world.isdigit():  # the Trainer's devices type parses "8" as a string
        world = int(world)
    if size is None or isinstance(world, bool) or not isinstance(world, int) or world < 1 or not isinstance(nodes, int):
        return
    most = _init_args(config.get("data", {})).get("batch_size")
    split_global_batch(size, world * nodes, most if isinstance(most, int) and most > 0 else size)


def _datamodule_check(config: Any) -> Callable[[], Any]:
    """Build the configured datamodule and call its ``preflight()`` (duck typing: rocoft_pl imports no
    datamodule); nothing for a class without one."""
    class_path = config.get("class_path") if hasattr(config, "get") else None
    if not class_path:
        return lambda: None
    module, _, name = str(class_path).rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not callable(getattr(cls, "preflight", None)):
        return lambda: None
    return lambda: cls(**_init_args(config)).preflight()
