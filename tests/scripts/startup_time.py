"""Wall time of the CLIs' start (a measurement, not a test: it depends on the machine and its load).

    python tests/scripts/startup_time.py [--repeats 5]

Each command runs in a fresh interpreter ``--repeats`` times; the minimum and the median are printed. The goal
(issue 19): ``rocoft --help`` and ``rocoft-bench --help`` under 2 s. The other rows show what the lazy imports
save: the callback's import (Lightning) and a subcommand's own help.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "rocoft --help": ["-m", "rocoft_pl.cli", "--help"],
    "rocoft-bench --help": ["-m", "benchmark.cli", "--help"],
    "rocoft-bench table --help": ["-m", "benchmark.cli", "table", "--help"],
    "import rocoft_pl": ["-c", "import rocoft_pl"],
    "from rocoft_pl import RoCoFT": ["-c", "from rocoft_pl import RoCoFT"],
    "rocoft fit --help": ["-m", "rocoft_pl.cli", "fit", "--help"],
}


def wall_times(args: list[str], repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(COMMANDS), help="these commands only")
    args = parser.parse_args()
    print(f"{'command':<32} {'min s':>7} {'median s':>9}  ({args.repeats} runs; load average {os.getloadavg()[0]:.1f})")
    for name in args.only or COMMANDS:
        times = wall_times(COMMANDS[name], args.repeats)
        print(f"{name:<32} {min(times):>7.2f} {statistics.median(times):>9.2f}")


if __name__ == "__main__":
    main()
