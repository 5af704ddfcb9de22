"""``rocoft``: Lightning's CLI with any LightningModule / LightningDataModule chosen by ``class_path``.

    rocoft fit --config configs/glue/rte.yaml
    rocoft validate --config configs/glue/rte.yaml --ckpt_path ...
    rocoft predict --config configs/glue/rte.yaml --ckpt_path ...   # GLUE submission TSVs
    rocoft export-lora ADAPTER_DIR OUT_DIR                          # the adapter as a PEFT LoRA (rocoft_pl.export)

RoCoFT is a callback (``trainer.callbacks: [{class_path: rocoft_pl.RoCoFT, ...}]``). Links: the model's
``model_name_or_path`` is the datamodule's ``tokenizer_name_or_path`` (``pkg:<module>`` resolved), and the
datamodule's ``num_labels`` is the model's, so the classes chosen must have these arguments (any module of
yours works with the RoCoFT callback; use Lightning's own LightningCLI for one without them). After ``predict``, a
datamodule with ``write_predictions(predictions, output_dir)`` writes its files into the run's log dir.
Runs are seeded (``seed_everything: 42`` unless the config says otherwise).

Preflight: after parsing and before any class is built (so before weights or data load), the model
(``model_name_or_path``: local directory, ``pkg:<module>``, Hugging Face cache, or the hub when online) and the
datamodule, when it has a ``preflight()`` method, are checked, and every input that cannot be reached is
reported in one error with how to point it at a local copy (``rocoft_pl.preflight``). ``ROCOFT_NO_PREFLIGHT=1``
skips it. A datamodule with ``preflight()`` is built once more for the check: its constructor must load nothing.

A bad input (a missing data file, a value a class refuses) ends with one line, ``rocoft: error: <cause>``,
exit status 1, and the path of a file holding the full traceback; ``ROCOFT_VERBOSE=1`` (or ``rocoft --verbose
fit ...``, before the subcommand) prints the traceback instead. jsonargparse's usage errors (unknown keys,
values of the wrong type) keep their own short message and status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import preflight
from .batching import GlobalBatchSize, split_global_batch


def _resolve_pretrained(name: Any) -> Any:
    """``pkg:<module>`` as a directory; unchanged when that fails, so that the preflight reports it together
    with every other missing input (and the model's constructor raises it when the preflight is skipped)."""
    from .modules.classification import resolve_pretrained

    try:
        return resolve_pretrained(name) if isinstance(name, str) else name
    except ValueError:
        return name


SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


VERBOSE_ENV = "ROCOFT_VERBOSE"
EXPORT_LORA = "export-lora"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a bad config, path or value raises: reported in one line. Anything else is a bug: full traceback."""
    errors: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError]
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _take_verbose_flag(args: Any) -> tuple[Any, bool]:
    """Remove ``--verbose`` when it comes before the subcommand (after it, it is ``validate``'s own flag)."""
    if args is not None and not isinstance(args, (list, tuple)):  # a dict or Namespace of arguments
        return args, False
    argv = list(sys.argv[1:] if args is None else args)
    for i, arg in enumerate(argv):
        if arg in SUBCOMMANDS:
            break
        if arg == "--verbose":
            return argv[:i] + argv[i + 1:], True
    return args, False


def root_cause(err: BaseException) -> BaseException:
    """The innermost explicitly chained cause (``raise ... from``) that still says something: jsonargparse wraps
    a class's own error in "Does not validate against any of the Union subtypes", Lightning may wrap too."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen and str(err.__cause__):
        err = err.__cause__
        seen.add(id(err))
    return err


def error_message(err: BaseException, max_lines: int = 6) -> str:
    """The root cause's message, short: a DataLoader worker's embedded traceback is cut to its last line."""
    cause = root_cause(err)
    message = str(cause).strip()
    if not isinstance(cause, (OSError, ValueError, TypeError)) or not message:
        message = f"{type(cause).__name__}: {message}".rstrip(": ")
    if "Original Traceback" in message:  # torch re-raises a worker's error with the worker's traceback inside
        head, _, tail = message.partition("Original Traceback")
        message = f"{head.strip()} {tail.strip().splitlines()[-1]}"
    lines = message.splitlines()
    if len(lines) > max_lines and not isinstance(cause, preflight.PreflightError):  # its lines are the point
        message = "\n".join(lines[:max_lines] + ["  (...)"])
    return message


def _write_traceback(err: BaseException, args: Any) -> Optional[str]:
    """The full traceback, in a temporary file (the run's log dir may not exist yet); its path, or None."""
    argv = sys.argv[1:] if args is None else args
    try:
        fd, path = tempfile.mkstemp(prefix="rocoft-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"rocoft {' '.join(map(str, argv)) if isinstance(argv, (list, tuple)) else argv}\n\n")
            f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        return path
    except OSError:
        return None


def main(args: Any = None) -> None:
    args, verbose = _take_verbose_flag(args)
    verbose = verbose or os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")
    try:
        argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else []
        if argv[:1] == [EXPORT_LORA]:  # not a Lightning subcommand: its own argparse parser
            from .export import main as export_lora_main

            export_lora_main(argv[1:])
        else:
            RoCoFTCLI(args=args)
    except _user_errors() as err:
        if verbose:
            raise
        log = _write_traceback(err, args)
        where = f"full traceback in {log}; " if log else ""
        print(f"rocoft: error: {error_message(err)}", file=sys.stderr)
        print(f"({where}rerun with {VERBOSE_ENV}=1 or `rocoft --verbose ...` to print it)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
