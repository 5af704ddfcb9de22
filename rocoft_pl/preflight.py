"""Preflight: before a run loads anything, check that its model (and, through the datamodule, its datasets) can
be reached, and report every one that cannot in a single error.

Without it, an offline or gated run meets its missing inputs one at a time, each after the model or the data
before it has loaded. Reachable means: a local directory (``config.json``, weights and tokenizer files, or the
``gguf_file``), a ``pkg:<module>`` model package, a repository in the local Hugging Face cache (complete: a
snapshot with config, weights and tokenizer), or, only when downloads are allowed, a repository the hub says
this token may read (one ``auth-check`` request per repository, no files). With ``HF_HUB_OFFLINE=1`` nothing
touches the network.

``ROCOFT_NO_PREFLIGHT=1`` skips every check (the ``rocoft`` CLI's and the datamodules' own). Datamodules take
part through a ``preflight()`` method that raises ``PreflightError`` (see ``tasks.reasoning``); this module
imports no datamodule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

SKIP_ENV = "ROCOFT_NO_PREFLIGHT"
MODEL_FLAG = "--model.init_args.model_name_or_path"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# AutoTokenizer reads one of these (the rest come with them); a GGUF file carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class PreflightError(ValueError):
    """Every input of a run that cannot be reached, one line each, with how to point it at a local copy.

    ``problems``: one line per model / dataset; ``notes``: advice shared by several lines (printed once, after).
    A ValueError, so callers that already report bad input report this too.
    """

    def __init__(self, problems: Sequence[str], notes: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        self.notes = list(dict.fromkeys(notes))
        super().__init__(format_problems(self.problems, self.notes))


def format_problems(problems: Sequence[str], notes: Sequence[str] = ()) -> str:
    n = len(problems)
    head = f"{n} input{'s' if n != 1 else ''} of this run cannot be reached (nothing was loaded):"
    return "\n".join([head, *(f"  - {p}" for p in problems), *notes, f"({SKIP_ENV}=1 skips this check.)"])


def raise_if_problems(problems: Sequence[str], notes: Sequence[str] = ()) -> None:
    if problems:
        raise PreflightError(problems, notes)


def skipped() -> bool:
    """``ROCOFT_NO_PREFLIGHT`` set to anything but empty / 0 / false / no."""
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no")


def hub_offline() -> bool:
    """What transformers and huggingface_hub obey: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as read at import."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def offline_note() -> str:
    """Where the caches are and which variables matter: shared by every problem line of an offline run."""
    from huggingface_hub import constants

    return (f"Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): only local files and the caches under "
            f"HF_HOME={constants.HF_HOME} count; fill them where the hub is reachable with the same HF_HOME "
            "(HF_TOKEN for gated repos), or unset those variables to download.")


def hub_access_problem(repo_id: str, repo_type: str = "model", token: Any = None,
                       timeout: Optional[float] = None) -> Optional[str]:
    """None when the hub says this token may read ``repo_id``; else why not (gated, missing, refused, unreachable).

    One request to the hub's ``auth-check`` endpoint (what ``HfApi.auth_check`` calls), with a timeout, which
    ``auth_check`` lacks: a run must not hang on a firewalled network before it has reported anything.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    page = f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        response = get_session().get(f"{constants.ENDPOINT}/api/{repo_type}s/{repo_id}/auth-check",
                                     headers=build_hf_headers(token=token),
                                     timeout=timeout or constants.HF_HUB_ETAG_TIMEOUT)
        hf_raise_for_status(response)
    except GatedRepoError:
        return f"gated: accept its terms at {page} and set HF_TOKEN (or `hf auth login`)"
    except RepositoryNotFoundError:
        return f"not found on the hub ({page}); a private repository needs HF_TOKEN"
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        return f"the hub refused it (HTTP {status}: {_first_line(err)})"
    except Exception as err:  # no network, proxy, timeout: all mean "cannot download"
        return f"cannot reach the hub ({type(err).__name__}: {_first_line(err)})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- the model --------------------------------------------------------------------------------------------------
def missing_model_files(folder: Path, gguf_file: Optional[str] = None) -> Optional[str]:
    """What ``from_pretrained(folder)`` (and its tokenizer) would miss, in words; None when nothing.

    Reads file names and, for a sharded checkpoint, its index: no weights are opened.
    """
    if gguf_file:
        return None if (folder / gguf_file).is_file() else f"has no {gguf_file}"
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    weights = _missing_weights(folder)
    if weights:
        missing.append(weights)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES[:3])} ...)")
    return f"has no {', no '.join(missing)}" if missing else None


def _missing_weights(folder: Path) -> Optional[str]:
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return None
    for index in INDEX_FILES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                return f"readable {index} ({type(err).__name__})"
            absent = [s for s in shards if not (folder / s).is_file()]
            return f"shards {', '.join(absent)} (listed in {index})" if absent else None
    return f"weights ({' / '.join(WEIGHT_FILES + INDEX_FILES[:1])})"


def _looks_like_repo_id(name: str) -> bool:
    """A name transformers would look up on the hub (``org/name`` or ``name``), not a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str, filename: str, cache_dir: Optional[str], revision: Optional[str]) -> Optional[Path]:
    """The snapshot folder of ``repo_id`` in the hub cache when it holds ``filename``; None otherwise."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if not isinstance(found, str):
        return None
    path = Path(found)
    for _ in Path(filename).parts:
        path = path.parent
    return path


def model_problems(name_or_path: str, gguf_file: Optional[str] = None, cache_dir: Optional[str] = None,
                   revision: Optional[str] = None, token: Any = None, offline: Optional[bool] = None,
                   flag: str = MODEL_FLAG) -> list[str]:
    """Why the model cannot be loaded (one line, with the fix), or nothing.

    ``pkg:<module>`` is resolved as the modules do; a path that exists must hold a loadable checkpoint; a hub
    id counts when its cached snapshot is complete, else (online only) when the hub grants access.
    """
    name = str(name_or_path or "")
    if not name:
        return []
    local_fix = f"point {flag} at a local directory (config.json, weights, tokenizer)"
    try:
        from .modules.classification import resolve_pretrained

        path = resolve_pretrained(name)
    except ValueError as err:
        return [f"model {err}; install the package or {local_fix}"]
    folder = Path(path).expanduser()
    if folder.is_dir():
        missing = missing_model_files(folder, gguf_file)
        return [f"model {name}: {folder} {missing}; {local_fix}"] if missing else []
    if folder.exists() or not _looks_like_repo_id(path):
        return [f"model {name}: no such directory {folder}; {local_fix}, or give a hub id"]
    return _hub_model_problems(path, gguf_file, cache_dir, revision, token, offline, local_fix)


def _hub_model_problems(repo_id: str, gguf_file: Optional[str], cache_dir: Optional[str], revision: Optional[str],
                        token: Any, offline: Optional[bool], local_fix: str) -> list[str]:
    from huggingface_hub import constants

    snapshot = _cached_snapshot(repo_id, gguf_file or "config.json", cache_dir, revision)
    missing = missing_model_files(snapshot, gguf_file) if snapshot is not None else "not cached"
    if missing is None:
        return []
    cache = cache_dir or constants.HF_HUB_CACHE
    where = "is not in the Hugging Face cache" if snapshot is None else f"is cached incompletely ({missing})"
    if hub_offline() if offline is None else offline:
        return [f"model {repo_id}: hub id {where.replace('is ', '', 1)} {cache} (offline); `hf download {repo_id}` "
                f"where the hub is reachable (HF_TOKEN if gated), or {local_fix}"]
    why = hub_access_problem(repo_id, "model", token)
    return [f"model {repo_id}: hub id {where.replace('is ', '', 1)}, {why}; or {local_fix}"] if why else []


def model_config_problems(init_args: dict[str, Any], offline: Optional[bool] = None) -> list[str]:
    """``model_problems`` from a model's init arguments (``model_name_or_path``, ``gguf_file``, and
    ``cache_dir`` / ``revision`` / ``token`` inside ``model_kwargs``); nothing when it has no
    ``model_name_or_path`` (a module built from an object)."""
    name = init_args.get("model_name_or_path")
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return []
    kwargs = init_args.get("model_kwargs") or {}
    return model_problems(str(name), init_args.get("gguf_file"), kwargs.get("cache_dir"), kwargs.get("revision"),
                          kwargs.get("token"), offline)


def collect(checks: Iterable[Any]) -> tuple[list[str], list[str]]:
    """Run zero-argument checks; every PreflightError's problems and notes are gathered, and a check's other
    bad-input error (ValueError, OSError) becomes one problem line: all of them are reported together."""
    problems: list[str] = []
    notes: list[str] = []
    for check in checks:
        try:
            found = check()
        except PreflightError as err:
            problems += err.problems
            notes += err.notes
        except (ValueError, OSError) as err:
            problems.append(str(err).strip() or type(err).__name__)
        else:
            problems += list(found or [])
    return problems, notes


__all__ = [
    "MODEL_FLAG", "PreflightError", "SKIP_ENV", "collect", "hub_access_problem", "hub_offline",
    "missing_model_files", "model_config_problems", "model_problems", "offline_note", "raise_if_problems", "skipped",
]
