"""`rocoft-bench`: the benchmark's command line. Each subcommand lives in its own module, which exposes
``add_parser(subparsers)``; the parser it returns carries ``func`` (args -> exit code) as a default.
To add a subcommand, add its command(s) to COMMANDS (tests/test_light_core.py checks COMMANDS against the
parsers the modules register)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Optional, Sequence

from rocoft_pl.extras import MissingExtraError

# Command -> (its module, its one-line help): the one registry. `rocoft-bench --help` lists these without
# importing the modules (efficiency and memory import torch: a second or more), and `rocoft-bench CMD` imports
# CMD's module only.
COMMANDS: dict[str, tuple[str, str]] = {
    "efficiency": ("benchmark.efficiency",
                   "step time, memory, adapter size and merged latency of RoCoFT vs full FT, LoRA, Algorithm 1"),
    "run": ("benchmark.grid_cli", "run a grid of (model, task, method, seed) cells, resumably"),
    "table": ("benchmark.grid_cli",
              "leaderboard (Markdown, CSV, HTML), plots and learning curves from a results file (never writes it)"),
    "ntk": ("benchmark.ntk_cli", "empirical NTK of full / row / column / LoRA parameters + kernel logistic regression"),
    "lm-eval": ("benchmark.lm_eval", "score a (RoCoFT) causal LM with lm-evaluation-harness (log-likelihood)"),
    "memory": ("benchmark.memory", "estimated GPU memory per device for the paper's LLMs under FSDP"),
    "adapter-diff": ("benchmark.adapter_diff",
                     "compare two saved RoCoFT adapters (same indices, how close the deltas are)"),
    "adapters": ("benchmark.adapters_bench",
                 "adapter swap time (merged, unmerged, reload, PEFT hot swap) and mixed-batch throughput vs PEFT LoRA"),
    "peak-rss": ("benchmark.peak_rss",
                 "CPU peak RSS of RoCoFT training per W0 storage (fp32, bf16, int8, NF4), one process each"),
    "collect": ("benchmark.cluster_cli", "rebuild a grid's results.jsonl from its cell record files (cluster launchers)"),
    "status": ("benchmark.cluster_cli", "pending / running / done / failed per cell of a grid run by a cluster launcher"),
}
SUBCOMMANDS = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


def _new_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(prog="rocoft-bench", description="RoCoFT benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, subparsers


def build_parser(modules: Sequence[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The real parsers of ``modules`` (all of them by default)."""
    parser, subparsers = _new_parser()
    for name in modules:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def listing_parser() -> argparse.ArgumentParser:
    """For ``--help``, a missing or an unknown command: COMMANDS as one-line entries."""
    parser, subparsers = _new_parser()
    for command, (_, text) in COMMANDS.items():
        subparsers.add_parser(command, help=text)
    return parser


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser that ``argv`` needs: only the named command's module when COMMANDS knows it."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no other options
    if command in COMMANDS:
        return build_parser([COMMANDS[command][0]])
    return listing_parser()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser_for(argv).parse_args(argv)
        return int(args.func(args) or 0)
    except MissingExtraError as err:  # an optional package: one line that names the extra to install
        print(f"rocoft-bench: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
