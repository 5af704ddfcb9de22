"""Grid specs: models x tasks x methods x seeds, each cell a complete LightningCLI config.

A grid YAML:

    name: demo
    base_config: configs/demo/base.yaml     # a LightningCLI config (model, data, trainer), no method
    seeds: [0, 1]
    seed_keys: [data.init_args.seed]        # more keys that get the cell's seed (seed_everything always does)
    overrides: {trainer.max_steps: 200}     # dotted keys into the config, for every cell
    models:  {minilm: {overrides: {}}}
    tasks:
      tweets:
        overrides: {}
        primary_metrics: [val/accuracy]
        method_params: {rocoft-row: {selection: max}}   # per task and method kind (paper Table 10);
                                                        # a method's own params win
    methods:
      full:          {method: full, overrides: {model.init_args.learning_rate: 1.0e-4}}
      rocoft-row-r3: {method: rocoft-row, params: {rank: 3}, label: RoCoFT 3-Row}
      lora-r8:       {method: lora, params: {r: 8}, seeds: [0]}   # a method may narrow the seeds
    timeout_s: 1800                         # per cell
    launcher: {kind: slurm, partition: gpu}  # how cells are launched (benchmark/launcher_options.py)

Relative paths (base_config, results) are relative to the grid file's directory's project root, i.e.
the current working directory.

Loading checks the spec itself: a key given twice in one mapping (of the grid or its base_config), a seed
given twice (in ``seeds``, a method's ``seeds`` or ``--seeds``) and two methods with the same label are
errors naming the file, line or field. Whether each cell's config and method params are valid is checked
by benchmark/validate.py before `rocoft-bench run` starts any cell.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .launcher_options import from_mapping
from .methods import METHODS

GRID_KEYS = {
    "name", "base_config", "results", "seeds", "seed_keys", "overrides", "models", "tasks", "methods", "timeout_s", "launcher",
}


class GridError(ValueError):
    """A grid that cannot run as given: its message lists what to fix (file, field, cell)."""


@dataclass
class Cell:
    """One run: its id, the full LightningCLI config, and what the results store needs to know."""

    cell_id: str
    model: str
    task: str
    method: str
    method_label: str
    method_params: dict[str, Any]
    seed: int
    config: dict[str, Any]
    primary_metrics: list[str] = field(default_factory=list)
    timeout_s: float = 3600.0

    @property
    def config_hash(self) -> str:
        payload = json.dumps([self.config, self.method, self.method_params], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "config_hash": self.config_hash}


@dataclass
class Grid:
    name: str
    results: Path
    cells: list[Cell]
    launcher: dict[str, Any] = field(default_factory=dict)  # the YAML's `launcher:` mapping, checked


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """config['a']['b']['c'] = value for key 'a.b.c', creating dicts on the way."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)  # cells must not share a dict given as one override value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (file and line), not
    silently the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by own keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A YAML file, refusing duplicate keys; errors name the file (and line)."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None


def _unique_seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{where} must be a non-empty list of integers, got {seeds!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"{where} gives seed(s) {twice} more than once: {seeds}")
    return list(seeds)


def _seed_keys(value: Any, where: str) -> list[str]:
    """Dotted config keys set to the cell's seed besides ``seed_everything``: seeds a component keeps apart from
    the global RNG (a DataModule's sampling and shuffling seed), without which two seeds could run identically."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(k, str) and k and not k.startswith(".") for k in value):
        raise ValueError(f"{where} must be a list of dotted config keys (e.g. data.init_args.seed), got {value!r}")
    return list(value)


def _section(spec: dict[str, Any], key: str, where: str) -> dict[str, dict[str, Any]]:
    value = spec.get(key)
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty mapping of name -> settings")
    return {str(k): (v or {}) for k, v in value.items()}


def load_grid(path: Union[str, Path], seeds: Optional[list[int]] = None) -> Grid:
    """Parse and validate a grid YAML into cells; every error names the file and the field. ``seeds``
    replaces the grid's seeds (and any method's own), e.g. to add seeds to a finished grid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    spec = load_yaml(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a grid is a mapping, see benchmark/grid.py")
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    name = str(spec.get("name") or path.stem)
    base_path = spec.get("base_config")
    base: dict[str, Any] = {}
    if base_path:
        if not Path(base_path).is_file():
            raise FileNotFoundError(f"{path}: base_config {base_path} not found")
        base = load_yaml(Path(base_path)) or {}
    override = seeds is not None
    seeds = _unique_seeds(list(seeds) if override else spec.get("seeds", [0]), "--seeds" if override else f"{path}: 'seeds'")
    seed_keys = _seed_keys(spec.get("seed_keys"), f"{path}: 'seed_keys'")
    models = _section(spec, "models", str(path))
    tasks = _section(spec, "tasks", str(path))
    methods = _section(spec, "methods", str(path))
    for label, m in methods.items():
        if m.get("method") not in METHODS:
            raise ValueError(f"{path}: methods.{label}.method must be one of {METHODS}, got {m.get('method')!r}")
        if not override and "seeds" in m:
            _unique_seeds(m["seeds"], f"{path}: methods.{label}.seeds")
    labels: dict[str, str] = {}
    for key, m in methods.items():
        label = str(m.get("label", key))
        if label in labels:
            raise ValueError(
                f"{path}: methods.{labels[label]} and methods.{key} have the same label {label!r}; "
                "their cells would share one leaderboard row"
            )
        labels[label] = key
    timeout = float(spec.get("timeout_s", 3600))

    cells = []
    for model_name, model_spec in models.items():
        for task_name, task_spec in tasks.items():
            task_params = task_spec.get("method_params") or {}
            if not isinstance(task_params, dict) or set(task_params) - set(METHODS):
                raise ValueError(
                    f"{path}: tasks.{task_name}.method_params maps method kinds {METHODS} to params, got {task_params!r}"
                )
            for label, m in methods.items():
                method_seeds = seeds if override else m.get("seeds", seeds)
                for seed in method_seeds:
                    config = copy.deepcopy(base)
                    for overrides in (spec.get("overrides"), model_spec.get("overrides"), task_spec.get("overrides"), m.get("overrides")):
                        for key, value in (overrides or {}).items():
                            set_dotted(config, key, value)
                    config["seed_everything"] = seed
                    for key in seed_keys:  # after the overrides: the cell's seed wins
                        set_dotted(config, key, seed)
                    params = {**task_params.get(m["method"], {}), **(m.get("params") or {})}
                    cells.append(
                        Cell(
                            cell_id=f"{model_name}|{task_name}|{label}|seed={seed}",
                            model=model_name,
                            task=task_name,
                            method=m["method"],
                            method_label=str(m.get("label", label)),
                            method_params=params,
                            seed=seed,
                            config=config,
                            primary_metrics=list(task_spec.get("primary_metrics") or []),
                            timeout_s=float(m.get("timeout_s", timeout)),
                        )
                    )
    results = Path(spec.get("results") or f"runs/bench/{name}/results.jsonl")
    launcher = spec.get("launcher") or {}
    from_mapping(launcher, f"{path}: 'launcher'")  # an unknown option or a bad value fails at load
    return Grid(name=name, results=results, cells=cells, launcher=dict(launcher))
