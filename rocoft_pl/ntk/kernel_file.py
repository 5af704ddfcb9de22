"""Kernels on disk: one safetensors file per run (never pickle), readable without this package.

Keys: ``train/<set>`` (n x d x n x d), ``cross/<set>`` (m x d x n x d), ``y_train``, ``y_test``; the class
names are in the file's metadata (``classes``, a JSON list).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import torch


def save_kernels(
    path: str | os.PathLike,
    train: dict[str, torch.Tensor],
    cross: Optional[dict[str, torch.Tensor]] = None,
    y_train: Optional[torch.Tensor] = None,
    y_test: Optional[torch.Tensor] = None,
    classes: Optional[Sequence[str]] = None,
) -> None:
    from safetensors.torch import save_file

    tensors = {f"train/{s}": k for s, k in train.items()}
    tensors.update({f"cross/{s}": k for s, k in (cross or {}).items()})
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y is not None:
            tensors[name] = y
    metadata = {"classes": json.dumps(list(classes))} if classes is not None else None
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_kernels(path: str | os.PathLike) -> dict[str, Any]:
    """``{"train": {set: K}, "cross": {set: K}, "y_train", "y_test", "classes"}`` (absent parts omitted)."""
    from safetensors import safe_open

    out: dict[str, Any] = {"train": {}, "cross": {}}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            group, _, name = key.partition("/")
            if name:
                out[group][name] = f.get_tensor(key)
            else:
                out[key] = f.get_tensor(key)
        metadata = f.metadata() or {}
    if "classes" in metadata:
        out["classes"] = json.loads(metadata["classes"])
    return out
