"""`rocoft-bench adapter-diff A B`: how far apart two saved RoCoFT adapters are (e.g. one run on one process and
the same run sharded over several): the same targets and indices, and the largest difference of the trained
tensors relative to each tensor's largest value. Exit status 0 when within ``--tol``, else 1."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from rocoft_pl.adapter import read_adapter


def adapter_difference(a: Path, b: Path) -> dict[str, Any]:
    """``{"worst": (key, relative difference), "max_relative": float, "max_abs": float, "tensors": n}`` over
    the trained tensors; ValueError when the two do not hold the same keys, shapes and indices."""
    (_, ta), (_, tb) = read_adapter(a), read_adapter(b)
    if ta.keys() != tb.keys():
        only = sorted(ta.keys() ^ tb.keys())
        raise ValueError(f"the adapters hold different tensors, e.g. {only[:3]}")
    worst, max_rel, max_abs = ("", 0.0), 0.0, 0.0
    for key in sorted(ta):
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            raise ValueError(f"{key}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
        if not x.is_floating_point():  # indices: must be identical
            if not torch.equal(x, y):
                raise ValueError(f"{key}: the adapters trained different rows / columns")
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = max(x.double().abs().max().item(), y.double().abs().max().item()) if x.numel() else 0.0
        rel = diff / scale if scale > 0 else diff
        max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        if rel >= worst[1]:
            worst = (key, rel)
    return {"worst": worst, "max_relative": max_rel, "max_abs": max_abs, "tensors": len(ta)}


def run(args: argparse.Namespace) -> int:
    result = adapter_difference(Path(args.a), Path(args.b))
    key, rel = result["worst"]
    print(f"{result['tensors']} tensors, same indices; largest difference {result['max_abs']:.3g} "
          f"({result['max_relative']:.3g} of the tensor's largest value; worst: {key})")
    ok = result["max_relative"] <= args.tol
    print(f"{'within' if ok else 'NOT within'} --tol {args.tol:g}")
    return 0 if ok else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("adapter-diff", help="compare two saved RoCoFT adapters (same indices, how close the deltas are)")
    p.add_argument("a", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("b", help="the other adapter directory")
    p.add_argument("--tol", type=float, default=1e-5, help="largest relative difference accepted (default 1e-5)")
    p.set_defaults(func=run)
    return p
