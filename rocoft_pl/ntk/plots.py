"""Figures of the NTK section: kernel heatmaps ordered by class (Fig. 3, 6) and eigenvalue spectra (Fig. 5).

matplotlib with the Agg backend (no display needed). Multi-output kernels (n, D, n, D) are shown as their
trace over outputs sum_a K[:, a, :, a] (n x n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from ..extras import require_extra
from .compare import eigenspectrum
from .kernel import scalar_kernel


def _plt():
    matplotlib = require_extra("matplotlib", "ntk")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _square(k: torch.Tensor) -> torch.Tensor:
    return scalar_kernel(k) if k.dim() == 4 else k


def plot_kernels(
    kernels: Mapping[str, torch.Tensor],
    labels: Sequence[int],
    path: Union[str, Path],
    title: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """One heatmap per kernel, examples sorted by class (stable), class boundaries marked; a PNG file."""
    plt = _plt()
    labels_t = torch.as_tensor(list(labels))
    order = torch.argsort(labels_t, stable=True)
    counts = torch.bincount(labels_t)
    bounds = torch.cumsum(counts, 0)[:-1].tolist()
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 3.8), squeeze=False)
    for ax, (name, k) in zip(axes[0], kernels.items()):
        m = _square(k).double()[order][:, order].numpy()
        im = ax.imshow(m, cmap="viridis", interpolation="nearest")
        for b in bounds:
            ax.axhline(b - 0.5, color="white", lw=0.8)
            ax.axvline(b - 0.5, color="white", lw=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title + (f"  (classes in order: {', '.join(class_names)})" if class_names else ""), fontsize=9)
    return _save_png(plt, fig, path)


def plot_spectra(kernels: Mapping[str, torch.Tensor], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Eigenvalues (each divided by its largest) against their rank, log scale; a PNG file."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, k in kernels.items():
        ev = eigenspectrum(k).clamp_min(1e-12).numpy()
        ax.semilogy(range(1, len(ev) + 1), ev, marker="o", ms=2.5, lw=1, label=name)
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    return _save_png(plt, fig, path)


def _save_png(plt, fig, path: Union[str, Path]) -> Path:  # type: ignore[no-untyped-def]
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
