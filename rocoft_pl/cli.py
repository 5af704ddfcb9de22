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
values of the wrong type) keep their own short message and status 2. A missing optional package is such a line
too, naming the extra to install (``rocoft_pl.extras``).

This module imports no Lightning: ``rocoft --help`` is printed from ``top_level_parser`` at once, and the
LightningCLI subclass lives in ``rocoft_pl.lightning_cli``, imported when a subcommand runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from typing import Any, Optional, Sequence

from . import preflight
from .extras import MissingExtraError

# What LightningCLI's top-level help lists, and our export-lora: ``rocoft --help`` prints it without importing
# Lightning (seconds); ``rocoft SUBCOMMAND --help`` is LightningCLI's own. tests/test_light_core.py checks that it
# names every option and subcommand of LightningCLI's.
SUBCOMMAND_HELP = {
    "fit": "Runs the full optimization routine.",
    "validate": "Perform one evaluation epoch over the validation set.",
    "test": "Perform one evaluation epoch over the test set.",
    "predict": "Run inference on the data (a datamodule with write_predictions() writes files into the log dir).",
    "export-lora": "Write a saved RoCoFT adapter as a PEFT LoRA adapter (rocoft_pl.export).",
}


def __getattr__(name: str) -> Any:
    """``from rocoft_pl.cli import RoCoFTCLI`` as before the split (rocoft_pl.lightning_cli)."""
    if name == "RoCoFTCLI":
        from .lightning_cli import RoCoFTCLI

        return RoCoFTCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


VERBOSE_ENV = "ROCOFT_VERBOSE"
EXPORT_LORA = "export-lora"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a bad config, path or value raises: reported in one line. Anything else is a bug: full traceback."""
    errors: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError, MissingExtraError]
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
    while not isinstance(err, MissingExtraError) and err.__cause__ is not None and id(err.__cause__) not in seen and str(err.__cause__):
        err = err.__cause__
        seen.add(id(err))
    return err


def error_message(err: BaseException, max_lines: int = 6) -> str:
    """The root cause's message, short: a DataLoader worker's embedded traceback is cut to its last line."""
    cause = root_cause(err)
    message = str(cause).strip()
    if not isinstance(cause, (OSError, ValueError, TypeError, MissingExtraError)) or not message:
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


def wants_top_level_help(argv: Sequence[str]) -> bool:
    """``-h``/``--help`` before any subcommand (where argparse, too, prints the top-level help)."""
    for arg in argv:
        if arg in SUBCOMMAND_HELP:
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def top_level_parser() -> argparse.ArgumentParser:
    """LightningCLI's top-level options and subcommands plus ours, for ``rocoft --help`` only."""
    parser = argparse.ArgumentParser(
        prog="rocoft",
        description="RoCoFT fine-tuning: Lightning's CLI with any LightningModule / LightningDataModule chosen by "
        "class_path, the RoCoFT callback (trainer.callbacks), a preflight of the model and data, and export-lora.",
        epilog="`rocoft SUBCOMMAND --help` lists a subcommand's options (the Trainer's, the model's, the data's).",
    )
    parser.add_argument("--verbose", action="store_true",
                        help=f"on an error, print the full traceback (or {VERBOSE_ENV}=1); before the subcommand")
    parser.add_argument("-c", "--config", help="Path to a configuration file in json or yaml format.")
    parser.add_argument("--print_config", nargs="?", metavar="=flags",
                        help="Print the configuration after applying all other arguments and exit.")
    subcommands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, text in SUBCOMMAND_HELP.items():
        subcommands.add_parser(name, help=text)
    return parser


def main(args: Any = None) -> None:
    args, verbose = _take_verbose_flag(args)
    verbose = verbose or os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")
    argv = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else []
    if wants_top_level_help(argv):  # before the try: its except clause would import Lightning
        top_level_parser().print_help()
        raise SystemExit(0)
    try:
        if argv[:1] == [EXPORT_LORA]:  # not a Lightning subcommand: its own argparse parser
            from .export import main as export_lora_main

            export_lora_main(argv[1:])
        else:
            from .lightning_cli import RoCoFTCLI

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
