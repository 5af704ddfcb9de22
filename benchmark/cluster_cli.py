"""`rocoft-bench collect GRID.yaml`, `rocoft-bench status GRID.yaml`, and what `rocoft-bench run` adds for
the cluster launchers: ``--launcher`` and its options, ``--dry-run``, ``--no-wait`` (benchmark/cluster.py).
Nothing here imports submitit unless a cluster launcher is used."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional


def _grid(args: argparse.Namespace) -> Any:
    from .grid import load_grid

    grid = load_grid(args.grid, _seeds(args))
    if getattr(args, "results", None):
        grid.results = Path(args.results)
    return grid


def _seeds(args: argparse.Namespace) -> Optional[list[int]]:
    text = getattr(args, "seeds", None)
    return [int(s) for s in text.split(",") if s.strip()] if text else None


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The cluster flags of `rocoft-bench run`."""
    from .launcher_options import add_arguments

    run.add_argument("--dry-run", action="store_true",
                     help="list the cells to run with their resources and the totals (jobs, GPU hours); run nothing")
    run.add_argument("--no-wait", action="store_true",
                     help="cluster launchers: submit and exit (`rocoft-bench status` / `collect` later)")
    add_arguments(run)


def run_elsewhere(args: argparse.Namespace) -> Optional[int]:
    """`rocoft-bench run` for --dry-run and the cluster launchers (an exit code); None: the local runner's job."""
    from .grid import GridError
    from .launcher_options import from_mapping, with_arguments

    try:
        grid = _grid(args)
        options = with_arguments(from_mapping(grid.launcher), args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rocoft-bench run: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(grid, options)
    if options.kind == "local":
        return None
    from .cluster import run_cluster
    from .runner import prepare

    try:
        grid = prepare(args.grid, args.results, _seeds(args))  # every cell checked before any is submitted
        records = run_cluster(grid, options, wait=not args.no_wait)
    except GridError as err:
        print(f"rocoft-bench run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    failed = [r for r in records if r["status"] != "ok"]
    if not args.no_wait:
        print(f"{len(records) - len(failed)} cell(s) finished, {len(failed)} failed; results in {grid.results}")
        if args.table:
            from .grid_cli import _write_tables

            _write_tables(grid.results, grid.results.parent, args.statistic)
    return 1 if failed and args.strict else 0


def _dry_run(grid: Any, options: Any) -> int:
    from .cell_store import finished_hashes
    from .cluster_resources import plan_text

    done = finished_hashes(grid)
    todo = [c for c in grid.cells if c.config_hash not in done]
    try:
        print(plan_text(grid.name, todo, len(grid.cells) - len(todo), options))
    except ValueError as err:
        print(f"rocoft-bench run: error: {err}", file=sys.stderr)
        return 2
    return 0


def _collect(args: argparse.Namespace) -> int:
    from .cell_store import collect

    path, found = collect(_grid(args))
    print(f"{found} cell record(s) merged into {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .cluster_status import cell_states, format_states

    grid = _grid(args)
    states = cell_states(grid, args.tail)
    print(format_states(grid, states))
    return 0


def add_parser(subparsers: Any) -> None:
    collect = subparsers.add_parser(
        "collect", help="rebuild a grid's results.jsonl from its cell record files (cluster launchers)")
    collect.add_argument("grid", help="grid YAML")
    collect.add_argument("--results", help="results file (default: the grid's)")
    collect.add_argument("--seeds", help="comma-separated seeds instead of the grid's")
    collect.set_defaults(func=_collect)

    status = subparsers.add_parser(
        "status", help="pending / running / done / failed per cell of a grid run by a cluster launcher")
    status.add_argument("grid", help="grid YAML")
    status.add_argument("--results", help="results file (default: the grid's)")
    status.add_argument("--seeds", help="comma-separated seeds instead of the grid's")
    status.add_argument("--tail", type=int, default=15, help="log lines shown per failed cell")
    status.set_defaults(func=_status)
