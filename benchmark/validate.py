"""Check every cell of a grid before `rocoft-bench run` starts any, so a bad grid costs seconds.

``validate_grid`` raises one ValueError listing every problem, each naming its cell (or the cells that
share a config) and the key:

* method params: the method's callback is built from them (RoCoFT's __init__ checks names and values;
  MethodCallback checks the params peft_config reads), which needs no model;
* overrides: each distinct config is parsed by the parser of the LightningCLI class the cell uses
  (``benchmark.cell.cli_class()``), without instantiating a class, so a misspelt key such as
  ``model.init_args.learnig_rate`` or a value of the wrong type is caught. Configs that differ only in
  ``seed_everything`` are parsed once;
* learning rates: every value under a key ``learning_rate``, ``lr``, ``*_lr`` or ``*_learning_rate`` (in the
  config, lists included, and in method params) must be a number > 0 or "auto" (null means unset and is left to the
  parser).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Iterator, Optional

from .grid import Cell, Grid
from .methods import method_callback


def _is_lr_key(key: Any) -> bool:
    key = str(key)
    return key in ("learning_rate", "lr") or key.endswith(("_lr", "_learning_rate"))


def _lr_values(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if _is_lr_key(key) and not isinstance(value, (dict, list)):
                yield path, value
            else:
                yield from _lr_values(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _lr_values(value, f"{where}[{i}]")


def _bad_lr(value: Any) -> Optional[str]:
    if value is None or value == "auto":  # "auto": rocoft_pl.recipe's rule, resolved when the optimizer is built
        return None
    if isinstance(value, bool):
        return f"must be a number > 0, got {value!r}"
    try:
        number = float(value)  # the parser reads "1e-4" (a YAML string) as a float too
    except (TypeError, ValueError):
        return f"must be a number > 0, got {value!r}"
    if not math.isfinite(number) or number <= 0:
        return f"must be a number > 0, got {value!r}"
    return None


def learning_rate_problems(cell: Cell) -> list[str]:
    problems = []
    for source, node in (("config", cell.config), ("method param", cell.method_params)):
        for key, value in _lr_values(node, ""):
            message = _bad_lr(value)
            if message:
                problems.append(f"{source} {key} {message}")
    return problems


def method_problems(cell: Cell) -> Optional[str]:
    try:
        method_callback(cell.method, **copy.deepcopy(cell.method_params))
    except Exception as err:  # TypeError for an unknown param, ValueError for a bad value
        return f"method {cell.method_label!r} ({cell.method}) params {cell.method_params}: {err}"
    return None


def _parse_only_parser() -> Any:
    """The argument parser the cell's LightningCLI builds, with nothing parsed, seeded or instantiated."""
    from .cell import cli_class

    class ParseOnly(cli_class()):  # type: ignore[misc, valid-type]
        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.config = None

        def _parse_ckpt_path(self) -> None:
            pass

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass  # no preflight: nothing is built or loaded here

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    parser = ParseOnly(args={}, run=False, save_config_callback=None).parser
    parser.exit_on_error = False  # an error raises (and is collected) instead of exiting
    return parser


_NOISE = ("Given value", "Subtypes:", "Does not validate against any of the Union subtypes", "Errors:",
          "- Expected a <class 'NoneType'>")


def _short(err: BaseException) -> str:
    """jsonargparse's message without the echo of the given value and the Union boilerplate."""
    lines = [line.rstrip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    return "\n    ".join(lines)


def _group(cells: list[Cell], with_method: bool) -> list[list[Cell]]:
    """Cells whose config (seed aside) and, with_method, method are the same: checked once."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        key: list[Any] = [{k: v for k, v in cell.config.items() if k != "seed_everything"}]
        if with_method:
            key += [cell.method_label, cell.method, cell.method_params]
        groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(cell)
    return list(groups.values())


def _name(group: list[Cell]) -> str:
    more = f" (and {len(group) - 1} more cell(s) like it)" if len(group) > 1 else ""
    return group[0].cell_id + more


def config_problems(cells: list[Cell], parser: Any = None) -> list[str]:
    """Parse each distinct config once; a problem names the cells that share the bad config."""
    groups = _group(cells, with_method=False)
    if not groups:
        return []
    parser = parser or _parse_only_parser()
    problems = []
    for group in groups:
        try:
            parser.parse_object(copy.deepcopy(group[0].config))
        except Exception as err:  # jsonargparse's ArgumentError, or what a link's compute_fn raises
            problems.append(f"{_name(group)}: config: {_short(err)}")
    return problems


def validate_grid(grid: Grid, parser: Any = None) -> None:
    """Raise one ValueError listing every problem of every cell (nothing is run or instantiated)."""
    problems: list[str] = []
    for group in _group(grid.cells, with_method=True):
        problems += [f"{_name(group)}: {p}" for p in learning_rate_problems(group[0])]
        problem = method_problems(group[0])
        if problem:
            problems.append(f"{_name(group)}: {problem}")
    problems += config_problems(grid.cells, parser)
    if problems:
        raise ValueError(
            f"grid {grid.name}: {len(problems)} problem(s), no cell was started:\n- " + "\n- ".join(problems)
        )
