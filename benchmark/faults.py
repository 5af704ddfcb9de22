"""Fault injection: kill ``save_adapter``, grid cells and grid runners at random points, many times, and
check that nothing was lost, duplicated or silently wrong.

    python -m benchmark.faults --adapter-rounds 200 --cell-rounds 8 --runner-rounds 8 [--seed 0] [--json out.json]

* adapter: a forked child saves version k of an adapter over version k-1 and is SIGKILLed after a random
  delay (0 to 1.5x the time a whole save takes). Afterwards the directory must load and hold exactly
  version k or the last complete version (never a mix, never nothing), and after the next save no
  temporary sibling may remain.
* cell: ``rocoft-bench run`` on a 3-cell grid; one cell process is SIGKILLed at a random point of its run;
  the runner records the failure, a second run finishes the grid.
* runner: two ``rocoft-bench run`` on the same grid at once; one of them is SIGKILLed at a random point.
  Its cells must die with it (no orphan), the other runner must not run a claimed cell at the same time,
  and a rerun finishes the grid.

Every grid round must end with exactly one record per cell, each ``ok`` and with the metrics of an
uninterrupted reference run (the cells are deterministic), no claim file left and no cell process alive.
The grid uses the tiny BERT and tweets fixtures of ``tests/fixtures`` (run from a source checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "text_classification"


# -- adapters ---------------------------------------------------------------------------------------------
def _adapted_model(seed: int) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    from rocoft_pl import RoCoFTConfig, apply_rocoft

    import torch

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    model = BertForSequenceClassification(config)
    apply_rocoft(model, RoCoFTConfig(mode="row", rank=8))
    return model


def _set_version(model: Any, version: int) -> None:
    import torch

    from rocoft_pl import rocoft_layers

    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for layer in rocoft_layers(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g))


def _version_of(model: Any, candidates: list[int]) -> Optional[int]:
    """Which of ``candidates`` the model's deltas equal exactly (None: none of them, a mix)."""
    import torch

    from rocoft_pl import rocoft_layers

    layers = list(rocoft_layers(model).values())
    for v in candidates:
        g = torch.Generator().manual_seed(v)
        if all(torch.equal(layer.delta, torch.randn(layer.delta.shape, generator=g)) for layer in layers):
            return v
    return None


def _save_in_child(model: Any, path: Path) -> int:
    from rocoft_pl import save_adapter

    pid = os.fork()
    if pid == 0:  # the child: save and leave without running the parent's cleanup
        try:
            save_adapter(model, path)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - any failure is the child's exit code
            os._exit(1)
    return pid


def adapter_rounds(rounds: int, rng: random.Random, work: Path) -> dict[str, Any]:
    """Kill a saving child at random points; count what the directory held afterwards."""
    import torch

    from rocoft_pl import load_adapter, save_adapter

    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    writer, reader = _adapted_model(0), _adapted_model(0)
    path = work / "adapter"
    _set_version(writer, 0)
    save_adapter(writer, path)
    durations = []
    for _ in range(5):  # how long a whole save takes in a child, fork to exit
        start = time.perf_counter()
        os.waitpid(_save_in_child(writer, path), 0)
        durations.append(time.perf_counter() - start)
    save_s = sorted(durations)[len(durations) // 2]
    counts = {"rounds": rounds, "new": 0, "old": 0, "lost": 0, "mixed_or_wrong": 0, "killed_mid_save": 0, "left_temp": 0}
    committed = 0
    for k in range(1, rounds + 1):
        _set_version(writer, k)
        pid = _save_in_child(writer, path)
        time.sleep(rng.uniform(0, 1.5 * save_s))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            counts["killed_mid_save"] += 1
        counts["left_temp"] += any(p.name != "adapter" for p in work.iterdir())  # until the next save clears it
        try:
            load_adapter(reader, path)
        except (OSError, ValueError):
            counts["lost"] += 1
            continue
        seen = _version_of(reader, [k, committed])
        if seen == k:
            counts["new"] += 1
            committed = k
        elif seen == committed:
            counts["old"] += 1
        else:
            counts["mixed_or_wrong"] += 1
    save_adapter(writer, path)  # the next save clears what killed writers left
    leftovers = sorted(p.name for p in work.iterdir() if p.name != "adapter")
    modes = sorted({oct(p.stat().st_mode & 0o777) for p in path.iterdir()})
    counts.update(
        save_ms=round(1000 * save_s, 2), leftovers_after_next_save=leftovers, file_modes=modes,
    )
    counts["ok"] = counts["lost"] == 0 and counts["mixed_or_wrong"] == 0 and not leftovers and modes == ["0o644"]
    return counts


# -- grids ------------------------------------------------------------------------------------------------
# A tiny grid cell: the test fixtures' 2-layer BERT and 30 tweets, a few steps (also tests/test_bench_grid.py's).
TINY_BASE: dict[str, Any] = {
    "model": {
        "class_path": "rocoft_pl.modules.classification.SequenceClassificationModule",
        "init_args": {"model_name_or_path": str(FIXTURES / "tiny_bert"), "learning_rate": 1e-3, "warmup_steps": 0},
    },
    "data": {
        "class_path": "tasks.demo_data.TweetSentimentDataModule",
        "init_args": {"data_file": str(FIXTURES / "tweets.csv"), "val_fraction": 0.3, "batch_size": 4, "max_length": 16},
    },
    "trainer": {
        "accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
    },
}


def _write_grid(root: Path) -> Path:
    import yaml

    base = TINY_BASE
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {
        "name": "faults", "base_config": str(root / "base.yaml"), "seeds": [1], "timeout_s": 300,
        "models": {"tiny-bert": {}}, "tasks": {"tweets": {"primary_metrics": ["val/accuracy"]}},
        "methods": {
            "rocoft-row": {"method": "rocoft-row", "params": {"rank": 1}},
            "rocoft-column": {"method": "rocoft-column", "params": {"rank": 2, "selection": "random"}},
            "bitfit": {"method": "bitfit"},
        },
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _runner(grid: Path, results: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmark.cli", "run", str(grid), "--results", str(results)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _cells_running(results: Path) -> dict[int, str]:
    """pid -> cell directory of the cell processes working for ``results`` (their command line names it)."""
    marker = str(results.parent / "cells")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        text = [a.decode(errors="replace") for a in args]
        if "benchmark.cell" in text:
            spec = next((a for a in text if a.startswith(marker)), None)
            if spec is not None:
                found[int(entry)] = str(Path(spec).parent)
    return found


class _Watch:
    """Samples the cell processes of a results file every 20 ms: the most that ran one cell at once."""

    def __init__(self, results: Path) -> None:
        self.results, self.max_same_cell, self.stop = results, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            per_cell: dict[str, int] = {}
            for cell in _cells_running(self.results).values():
                per_cell[cell] = per_cell.get(cell, 0) + 1
            self.max_same_cell = max([self.max_same_cell, *per_cell.values()])
            time.sleep(0.02)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.max_same_cell


def _finish(grid: Path, results: Path, attempts: int = 3) -> None:
    from .results import read_results

    for _ in range(attempts):
        records = read_results(results)
        if len(records) == 3 and all(r["status"] == "ok" for r in records):
            return
        _runner(grid, results).wait()


def _check_round(results: Path, reference: dict[str, Any]) -> dict[str, Any]:
    from .results import read_results

    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ids = [r["cell_id"] for r in lines]
    got = {r["cell_id"]: r for r in lines}
    claims = list((results.parent / "cells").glob("*/claim.json"))
    return {
        "records": len(lines),
        "duplicated_records": len(ids) - len(set(ids)),
        "not_ok": sum(r["status"] != "ok" for r in lines),
        "wrong_metrics": sum(got.get(c, {}).get("metrics") != m for c, m in reference.items()),
        "claims_left": len(claims),
        "readable": len(read_results(results)) == len(lines),
    }


def _ok(check: dict[str, Any]) -> bool:
    return (
        check["records"] == 3 and check["duplicated_records"] == 0 and check["not_ok"] == 0
        and check["wrong_metrics"] == 0 and check["claims_left"] == 0 and check["readable"]
        and check.get("orphans", 0) == 0 and check.get("max_same_cell_at_once", 1) <= 1
    )


def grid_rounds(kind: str, rounds: int, rng: random.Random, work: Path, grid: Path, reference: dict[str, Any],
                cell_s: float) -> dict[str, Any]:
    """``kind`` 'cell': kill a cell; 'runner': two runners at once, kill one of them."""
    out: dict[str, Any] = {"rounds": rounds, "failed_rounds": 0, "details": []}
    for n in range(rounds):
        results = work / f"{kind}{n}" / "results.jsonl"
        results.parent.mkdir(parents=True)
        watch = _Watch(results)
        runners = [_runner(grid, results) for _ in range(1 if kind == "cell" else 2)]
        detail: dict[str, Any] = {"round": n}
        if kind == "cell":
            deadline = time.monotonic() + 120
            while not _cells_running(results) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, cell_s))
            victims = list(_cells_running(results))
            for pid in victims[:1]:
                os.kill(pid, signal.SIGKILL)
            detail["killed_cell"] = bool(victims)
            runners[0].wait()
        else:
            time.sleep(rng.uniform(1.0, 3 * cell_s))
            detail["cells_running_at_kill"] = len(_cells_running(results))
            victim = rng.randrange(2)
            runners[victim].kill()
            runners[victim].wait()
            time.sleep(3.0)  # a cell notices its runner's death within about a second
            mine = set(_cells_running(results))
            runners[1 - victim].wait()
            # what still runs after the survivor finished belongs to nobody: an orphan of the killed runner
            detail["orphans"] = len(mine & set(_cells_running(results)))
        _finish(grid, results)
        detail["max_same_cell_at_once"] = watch.close()
        detail.update(_check_round(results, reference))
        detail["ok"] = _ok(detail)
        out["failed_rounds"] += not detail["ok"]
        out["details"].append(detail)
    out["ok"] = out["failed_rounds"] == 0
    return out


def run(adapter: int, cells: int, runners: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    report: dict[str, Any] = {"seed": seed}
    with tempfile.TemporaryDirectory(prefix="rocoft-faults-") as tmp:
        root = Path(tmp)
        if adapter:
            (root / "adapter").mkdir()
            started = time.perf_counter()
            report["adapter"] = adapter_rounds(adapter, rng, root / "adapter")
            report["adapter"]["seconds"] = round(time.perf_counter() - started, 1)
        if cells or runners:
            grid = _write_grid(root)
            started = time.perf_counter()
            ref = root / "reference" / "results.jsonl"
            _runner(grid, ref).wait()
            from .results import read_results

            records = read_results(ref)
            if len(records) != 3 or any(r["status"] != "ok" for r in records):
                raise RuntimeError(f"the reference run failed: {records}")
            reference = {r["cell_id"]: r["metrics"] for r in records}
            cell_s = max(r["wall_s"] for r in records)
            report["reference"] = {"cells": 3, "seconds": round(time.perf_counter() - started, 1), "cell_s": round(cell_s, 1)}
            for kind, count in (("cell", cells), ("runner", runners)):
                if count:
                    started = time.perf_counter()
                    report[kind] = grid_rounds(kind, count, rng, root, grid, reference, cell_s)
                    report[kind]["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    return report


def _print(report: dict[str, Any]) -> None:
    if "adapter" in report:
        a = report["adapter"]
        print(
            f"adapter: {a['rounds']} saves killed at random points ({a['killed_mid_save']} mid-save; a save takes "
            f"{a['save_ms']} ms): new {a['new']}, old {a['old']}, lost {a['lost']}, mixed/wrong {a['mixed_or_wrong']}; "
            f"{a['left_temp']} kills left a temp directory, {len(a['leftovers_after_next_save'])} remained after the "
            f"next save; file modes {a['file_modes']} ({a['seconds']} s)"
        )
    for kind, what in (("cell", "a cell SIGKILLed"), ("runner", "two runners, one SIGKILLed")):
        if kind in report:
            r = report[kind]
            bad = [d for d in r["details"] if not d["ok"]]
            print(f"{kind}: {r['rounds']} rounds ({what}), {r['failed_rounds']} failed ({r['seconds']} s)")
            for d in bad:
                print(f"  round {d['round']}: {d}")
            if kind == "runner":
                print(f"  kills with cells running: {sum(d['cells_running_at_kill'] > 0 for d in r['details'])}; orphans: "
                      f"{sum(d['orphans'] for d in r['details'])}; most processes of one cell at once: "
                      f"{max(d['max_same_cell_at_once'] for d in r['details'])}")
    print("OK: nothing lost, duplicated or wrong" if report["ok"] else "FAILED: see above")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter-rounds", type=int, default=200, help="saves killed at random points")
    parser.add_argument("--cell-rounds", type=int, default=5, help="grid runs with one cell killed")
    parser.add_argument("--runner-rounds", type=int, default=5, help="grid runs by two runners, one killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        parser.error("needs Linux (fork, /proc)")
    report = run(args.adapter_rounds, args.cell_rounds, args.runner_rounds, args.seed)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    raise SystemExit(main())
