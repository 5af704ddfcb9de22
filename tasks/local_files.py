"""Local data files shared by every DataModule: ``data_dir/<split>.<ext>`` discovery and checks.

One place decides which formats are read and what a bad path, an empty file or mixed formats say, so
GLUE, text classification, SQuAD, summarization and reasoning data fail the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

# suffix -> the `datasets` builder that reads it (TSV is CSV with a tab separator).
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Compressed text files (e.g. ``reviews.csv.bz2``): `datasets` decompresses them itself.
COMPRESSIONS = (".bz2", ".gz", ".xz", ".zst")


def data_suffix(path: Union[str, Path]) -> str:
    """The format suffix of a data file, under any compression suffix: ``a.csv.bz2`` -> ``.csv``."""
    p = Path(path)
    if p.suffix.lower() in COMPRESSIONS:
        p = p.with_suffix("")
    return p.suffix.lower()


def split_files(data_dir: Union[str, Path], splits: list[str]) -> dict[str, str]:
    """``{split: data_dir/<split>.<ext>}`` for those of ``splits`` that have a file (maybe none)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: no such directory {root}")
    files = {}
    for split in splits:
        found = [root / f"{split}{ext}" for ext in LOCAL_FORMATS if (root / f"{split}{ext}").is_file()]
        if len(found) > 1:
            raise ValueError(f"data_dir {root}: several files for split {split!r}: {[f.name for f in found]}")
        if found:
            files[split] = str(found[0])
    return files


def check_data_files(data_files: dict[str, Union[str, Path]], one_format: bool = True) -> dict[str, str]:
    """Every file exists, is not empty and has a known suffix (and, with ``one_format``, all share one
    reader); returns ``{split: str(path)}``."""
    if not data_files:
        raise ValueError("data_files is empty: give at least {train: PATH}")
    formats = set()
    for split, path in data_files.items():
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data_files[{split!r}]: no such file {path}")
        if p.stat().st_size == 0:
            raise ValueError(f"data_files[{split!r}]: {path} is empty")
        if data_suffix(p) not in LOCAL_FORMATS:
            raise ValueError(
                f"data_files[{split!r}]: {path}: unknown format; use one of {sorted(LOCAL_FORMATS)} "
                f"(optionally compressed: {', '.join(COMPRESSIONS)})"
            )
        formats.add(LOCAL_FORMATS[data_suffix(p)])
    if one_format and len(formats) > 1:
        raise ValueError(f"data_files mix formats {sorted(formats)}; use one format for all splits")
    return {k: str(v) for k, v in data_files.items()}


def local_data_files(
    data_dir: Optional[Union[str, Path]],
    data_files: Optional[dict[str, Union[str, Path]]],
    splits: list[str],
    one_format: bool = True,
) -> Optional[dict[str, str]]:
    """The checked local files from ``data_dir`` (``<split>.<ext>`` for ``splits``) or ``data_files``;
    None when neither is given (load from the hub)."""
    if data_dir is not None:
        data_files = split_files(data_dir, splits)
        if not data_files:
            raise FileNotFoundError(
                f"data_dir {data_dir}: no <split>.<ext> files for {splits} (ext: {sorted(LOCAL_FORMATS)})"
            )
    return None if data_files is None else check_data_files(data_files, one_format)


def packaged_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package (some data
    packages do not import, or pull heavy dependencies): ``<package dir>/<relative>``."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this data needs the `{package}` package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing")
    return path
