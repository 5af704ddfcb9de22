"""Preflight for hub datasets: can ``datasets.load_dataset(path, config, split=...)`` get this dataset without
reading any of its rows to find out?

Offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), ``load_dataset`` skips the hub and falls back to the prepared
copy in the datasets cache (``datasets.load.CachedDatasetModuleFactory`` and ``packaged_modules.cache``):
``<cache_dir>/<namespace>___<snake_case name>/<config>/<version>/<hash>/dataset_info.json`` beside the Arrow
files. Files in the hub cache (``HF_HOME/hub``) do not count there. Online, a cached copy still serves when the
hub cannot be asked, and anything else must be downloadable: one ``auth-check`` request says whether it is
(``rocoft_pl.preflight.hub_access_problem``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from rocoft_pl.extras import require_extra
from rocoft_pl.preflight import hub_access_problem

DATA_FILES_FLAG = "--data.init_args.data_files"


def datasets_offline() -> bool:
    """What ``load_dataset`` obeys: HF_DATASETS_OFFLINE when set, else HF_HUB_OFFLINE (read at import)."""
    config = require_extra("datasets.config", "tasks")
    return bool(config.HF_HUB_OFFLINE)


def datasets_cache(cache_dir: Optional[str] = None) -> Path:
    config = require_extra("datasets.config", "tasks")
    return Path(cache_dir or config.HF_DATASETS_CACHE).expanduser()


def cached_splits(path: str, config: Optional[str], cache_dir: Optional[str] = None) -> Optional[set[str]]:
    """The splits of the newest prepared copy of hub dataset ``path`` (``config``; any config when None) in the
    datasets cache; None when there is none. An empty set: cached, splits not recorded."""
    camelcase_to_snakecase = require_extra("datasets.naming", "tasks").camelcase_to_snakecase

    parts = path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = datasets_cache(cache_dir) / "___".join(parts)
    found = [d for d in root.glob(f"{config or '*'}/*/*")
             if d.is_dir() and not d.name.endswith(".incomplete") and (d / "dataset_info.json").is_file()]
    if not found:
        return None
    newest = max(found, key=lambda d: d.stat().st_mtime)
    try:
        splits = json.loads((newest / "dataset_info.json").read_text()).get("splits") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return set(splits)


def data_files_hint(names: Iterable[str], existing: Optional[dict[str, Any]] = None, flag: str = DATA_FILES_FLAG) -> str:
    """The override that reads ``names`` from local files (JSON/JSONL/CSV/parquet), with ``existing`` entries
    kept: a data_files given on the command line replaces the config's whole mapping."""
    entries = [f"{n}: {_flow(v)}" for n, v in (existing or {}).items()]
    entries += [f"{n}: path/to/{n}.json" for n in names]
    return f"{flag} '{{{', '.join(entries)}}}'"


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def dataset_problem(name: str, path: str, config: Optional[str], splits: list[str], cache_dir: Optional[str] = None,
                    offline: Optional[bool] = None, token: Any = None, flag: str = DATA_FILES_FLAG) -> Optional[str]:
    """Why dataset ``name`` (hub ``path``/``config``, the ``splits`` the run reads) cannot be loaded, with the
    data_files override for a local copy; None when it can."""
    cached = cached_splits(path, config, cache_dir)
    if cached is not None and (not cached or set(splits) <= cached):
        return None
    label = f"{path} ({config})" if config else path
    fix = f"local copy: {data_files_hint([name], flag=flag)}"
    if datasets_offline() if offline is None else offline:
        cache = datasets_cache(cache_dir)
        where = (f"is not in the datasets cache {cache}" if cached is None else
                 f"is cached in {cache} without split {', '.join(sorted(set(splits) - cached))} (has {', '.join(sorted(cached))})")
        return f"dataset {name}: hub {label} {where} (offline); {fix}"
    why = hub_access_problem(path, "dataset", token)
    return f"dataset {name}: hub {label}: {why}; or {fix}" if why else None


__all__ = ["DATA_FILES_FLAG", "cached_splits", "data_files_hint", "dataset_problem", "datasets_cache", "datasets_offline"]
