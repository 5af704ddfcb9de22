"""`rocoft-bench`: the benchmark's command line. Each subcommand lives in its own module, which exposes
``add_parser(subparsers)``; the parser it returns carries ``func`` (args -> exit code) as a default.
To add a subcommand, add its module to SUBCOMMANDS."""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

SUBCOMMANDS = (
    "benchmark.efficiency", "benchmark.grid_cli", "benchmark.ntk_cli", "benchmark.lm_eval", "benchmark.memory",
    "benchmark.adapter_diff", "benchmark.adapters_bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocoft-bench", description="RoCoFT benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
