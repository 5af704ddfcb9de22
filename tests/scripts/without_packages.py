"""Run Python code as if some packages were not installed:

    python tests/scripts/without_packages.py datasets,pandas -c "import rocoft_pl; ..."
    python tests/scripts/without_packages.py pandas -m benchmark.cli table results.jsonl

A meta-path finder makes ``import X`` (and its submodules) raise ModuleNotFoundError, ``importlib.util.find_spec``
returns None and ``importlib.metadata`` reports no distribution, which is what Lightning's and transformers'
availability checks read: the process sees what an install without that extra would see (tests/test_light_core.py).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for rocoft_pl without install


def _normal(name: str) -> str:
    """A module or distribution name as its top-level module: ``rouge-score`` -> ``rouge_score``."""
    return name.partition(".")[0].replace("-", "_").lower()


def block(names: Sequence[str]) -> None:
    blocked = {_normal(n) for n in names}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if _normal(name) in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by {__file__})", name=name)
            return None

    find_spec = importlib.util.find_spec
    from_name = importlib.metadata.Distribution.from_name.__func__  # type: ignore[attr-defined]

    def find_spec_unless_blocked(name: str, package: Optional[str] = None) -> Any:
        return None if _normal(name) in blocked else find_spec(name, package)

    def from_name_unless_blocked(cls: type, name: str) -> Any:
        if _normal(name) in blocked:
            raise importlib.metadata.PackageNotFoundError(name)
        return from_name(cls, name)

    sys.meta_path.insert(0, Blocker())
    importlib.util.find_spec = find_spec_unless_blocked
    importlib.metadata.Distribution.from_name = classmethod(from_name_unless_blocked)  # type: ignore[method-assign]


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3 or argv[1] not in ("-c", "-m"):
        raise SystemExit(__doc__)
    block([n for n in argv[0].split(",") if n])
    if argv[1] == "-c":
        sys.argv = ["-c", *argv[3:]]
        exec(compile(argv[2], "<without_packages -c>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
