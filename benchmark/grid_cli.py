"""`rocoft-bench run GRID.yaml` and `rocoft-bench table RESULTS`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    import sys

    from .cluster_cli import run_elsewhere
    from .grid import GridError, load_grid
    from .runner import run_grid

    elsewhere = run_elsewhere(args)  # --dry-run, --launcher slurm / submitit-local (benchmark/cluster.py)
    if elsewhere is not None:
        return elsewhere

    seeds = _seeds(args.seeds) if args.seeds else None
    try:
        records = run_grid(args.grid, jobs=args.jobs, results=args.results, seeds=seeds)
    except GridError as err:  # checked before any cell started
        print(f"rocoft-bench run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rocoft-bench run: interrupted; the running cells were killed, finished ones are recorded", file=sys.stderr)
        return 130
    failed = [r for r in records if r["status"] != "ok"]
    results = Path(args.results) if args.results else load_grid(args.grid).results
    print(f"{len(records) - len(failed)} cell(s) finished, {len(failed)} failed; results in {results}")
    outside = sorted(r["wall_s"] - r["fit_validate_s"] for r in records if r["status"] == "ok" and r.get("fit_validate_s"))
    if outside:
        print(
            f"per cell outside fit + validate (process start, imports, model and data set-up, result write): "
            f"median {outside[len(outside) // 2]:.1f} s, max {outside[-1]:.1f} s"
        )
    if args.table:
        _write_tables(results, results.parent, args.statistic)
    return 1 if failed and args.strict else 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {text!r}") from None


def _write_tables(results: Path, out: Path, statistic: str) -> dict[str, Path]:
    """The leaderboard, and the learning curves when cells recorded any; prints both summaries."""
    from .curves import write_curves
    from .leaderboard import write_tables

    paths = write_tables(results, out, statistic)
    print(paths["markdown"].read_text())
    curves = write_curves(results, out)
    if curves:
        print(curves["summary_md"].read_text())
    return {**paths, **curves}


def _table(args: argparse.Namespace) -> int:
    out = Path(args.output_dir) if args.output_dir else Path(args.results).parent
    paths = _write_tables(Path(args.results), out, args.statistic)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(subparsers: Any) -> None:
    from .cluster_cli import add_run_arguments

    run = subparsers.add_parser("run", help="run a grid of (model, task, method, seed) cells, resumably")
    run.add_argument("grid", help="grid YAML (see benchmark/grid.py and configs/bench/)")
    run.add_argument("--jobs", type=int, default=1, help="cells at once (on GPUs, each with its own trainer.devices GPUs)")
    run.add_argument("--results", help="results file (default: the grid's, runs/bench/<name>/results.jsonl)")
    run.add_argument("--seeds", help="comma-separated seeds instead of the grid's (finished cells are kept)")
    run.add_argument("--table", action="store_true", help="write and print the leaderboard afterwards")
    run.add_argument("--statistic", choices=("mean", "median"), default="mean")
    run.add_argument("--strict", action="store_true", help="exit 1 when a cell failed")
    add_run_arguments(run)
    run.set_defaults(func=_run)

    table = subparsers.add_parser(
        "table", help="leaderboard (Markdown, CSV, HTML), plots and learning curves from a results file (never writes it)"
    )
    table.add_argument("results", help="results JSONL written by `rocoft-bench run`")
    table.add_argument("--output-dir", help="default: the results file's folder")
    table.add_argument("--statistic", choices=("mean", "median"), default="mean")
    table.set_defaults(func=_table)
