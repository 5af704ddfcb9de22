"""How `rocoft-bench run` launches cells: the launcher and its options, from the grid YAML's ``launcher:``
mapping and the command line (the command line wins).

    launcher:                      # in a grid YAML; every key optional
      kind: slurm                  # local (default) | slurm | submitit-local
      partition: gpu
      account: my-project
      time_min: 120                # per cell; default: the cell's timeout_s
      cpus_per_task: 8
      mem: 64GB
      max_parallel: 32             # cells at once (the job array's %N)
      extra_sbatch: ["--constraint=a100"]
      setup: ["source .venv/bin/activate"]

Each field below is one option; its ``help`` is the command line's help text, its name with dashes the flag
(``--time-min``) and as it is the YAML key.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class LauncherOptions:
    kind: str = field(default="local", metadata={"help": f"where cells run: {' | '.join(LAUNCHERS)} (default local)"})
    partition: Optional[str] = field(default=None, metadata={"help": "SLURM partition"})
    account: Optional[str] = field(default=None, metadata={"help": "SLURM account"})
    qos: Optional[str] = field(default=None, metadata={"help": "SLURM quality of service"})
    time_min: Optional[int] = field(
        default=None, metadata={"help": "time limit per cell in minutes (default: the cell's timeout_s)"})
    gpus_per_cell: int = field(
        default=1, metadata={"help": "GPUs for a cell that asks for every GPU (trainer.devices -1 or auto); other "
                             "cells get what their trainer.devices asks for (unset: 1)"})
    cpus_per_task: Optional[int] = field(default=None, metadata={"help": "CPUs per task (one task per GPU)"})
    mem: Optional[str] = field(default=None, metadata={"help": "memory per node, e.g. 64GB (SLURM --mem)"})
    max_parallel: int = field(default=256, metadata={"help": "cells running at once: per job array on SLURM (its %%N), in all with submitit-local"})
    max_retries: int = field(
        default=1, metadata={"help": "times a cell that failed with an error is submitted again (not preemptions)"})
    max_requeues: int = field(
        default=3, metadata={"help": "times a cell that hits its time limit is requeued (preemptions do not count)"})
    signal_delay_s: int = field(
        default=120, metadata={"help": "seconds between the warning signal (USR2) and the time limit"})
    extra_sbatch: tuple[str, ...] = field(
        default=(), metadata={"help": "an extra sbatch option, e.g. constraint=a100 or exclusive (repeatable)"})
    setup: tuple[str, ...] = field(
        default=(), metadata={"help": "a shell line run in the batch script before the cell, e.g. 'module load cuda' (repeatable)"})

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"launcher kind must be one of {LAUNCHERS}, got {self.kind!r}")
        for name in ("max_parallel", "gpus_per_cell"):
            if getattr(self, name) < 1:
                raise ValueError(f"launcher {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_retries", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"launcher {name} must be >= 0, got {getattr(self, name)}")


_LISTS = {"extra_sbatch", "setup"}


def _flag(name: str) -> str:
    return "--launcher" if name == "kind" else "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; unset flags stay None, so the YAML's values (or the defaults) apply."""
    group = parser.add_argument_group("launcher (also settable under `launcher:` in the grid YAML)")
    for f in fields(LauncherOptions):
        kwargs: dict[str, Any] = {"dest": f"launcher_{f.name}", "default": None, "help": f.metadata["help"]}
        if f.name == "kind":
            kwargs["choices"] = LAUNCHERS
        else:
            kwargs["metavar"] = f.name.upper()  # in lower case, its key under `launcher:`
        if f.name in _LISTS:
            kwargs["action"] = "append"
        elif f.type in ("Optional[int]", "int"):
            kwargs["type"] = int
        group.add_argument(_flag(f.name), **kwargs)


def from_mapping(spec: Any, where: str = "launcher") -> LauncherOptions:
    """Options from a grid's ``launcher:`` mapping; unknown keys are errors naming them."""
    if spec is None:
        return LauncherOptions()
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping of launcher options, got {spec!r}")
    known = {f.name for f in fields(LauncherOptions)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if k in _LISTS else v for k, v in spec.items()}
    return LauncherOptions(**values)


def with_arguments(options: LauncherOptions, args: argparse.Namespace) -> LauncherOptions:
    """``options`` with every flag given on the command line replacing its value."""
    given = {f.name: getattr(args, f"launcher_{f.name}", None) for f in fields(LauncherOptions)}
    given = {k: tuple(v) if k in _LISTS else v for k, v in given.items() if v is not None}
    return replace(options, **given)
