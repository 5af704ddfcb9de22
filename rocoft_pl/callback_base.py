"""What every Lightning callback of rocoft_pl shares: its base classes and its logger.

A callback subclasses ``lightning.pytorch.Callback`` and, when the standalone ``pytorch_lightning`` package is
importable (lightning installs it), ``pytorch_lightning.Callback`` too, so either Trainer, and either
``LightningCLI``, accepts it.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

try:  # the standalone package of the same code (lightning depends on it); ~0.07 s once lightning is imported
    import pytorch_lightning as _ptl

    CALLBACK_BASES: tuple[type, ...] = (pl.Callback, _ptl.Callback)
except ImportError:  # pragma: no cover - lightning installs pytorch_lightning
    CALLBACK_BASES = (pl.Callback,)

# Like Lightning's own logger: info level, and a stderr handler unless the application configured logging.
log = logging.getLogger("rocoft_pl")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False
