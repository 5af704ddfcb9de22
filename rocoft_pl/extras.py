"""Optional dependencies, grouped as the package's extras (pyproject.toml): ``pip install rocoft-pl`` is the core
(torch, lightning, transformers, safetensors, jsonargparse); the task DataModules and metrics, the benchmark, the
NTK plots and the quantized bases each import their packages on use, through ``require_extra``, so that a missing
one says which extra to install instead of a bare ``No module named ...``."""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "rocoft-pl"


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that brings it. A ModuleNotFoundError,
    so that code which already catches ImportError keeps working."""


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require_extra(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``; when it (or a package it needs) is not installed, a MissingExtraError
    naming ``extra``. Other import failures (a broken install) propagate unchanged."""
    try:
        return importlib.import_module(module)
    except MissingExtraError:
        raise
    except ModuleNotFoundError as err:
        missing = err.name or module
        raise MissingExtraError(
            f"{module.partition('.')[0]} is not installed (no module named {missing!r}); it comes with the "
            f"{extra!r} extra: {install_hint(extra)}",
            name=missing,
        ) from err
