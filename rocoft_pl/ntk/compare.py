"""Comparing kernels: the paper's relative difference (Tables 5 and 13) and eigenvalue spectra (Fig. 5).

relative_difference(K_S, K, p) = || K_S / ||K_S||_p - K / ||K||_p ||_p on the flattened kernels, so only the
shape of the kernel matters, not its scale (a subset kernel is much smaller in magnitude).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def relative_difference(k_s: torch.Tensor, k: torch.Tensor, p: float = 2) -> float:
    a = k_s.detach().double().flatten()
    b = k.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"kernels differ in size: {tuple(k_s.shape)} vs {tuple(k.shape)}")
    na, nb = torch.linalg.vector_norm(a, p), torch.linalg.vector_norm(b, p)
    if na == 0 or nb == 0:
        raise ValueError("relative difference of a zero kernel is undefined")
    return float(torch.linalg.vector_norm(a / na - b / nb, p))


def eigenspectrum(k: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Eigenvalues of a symmetric (n, n) or (n, D, n, D) kernel, descending; divided by the largest."""
    m = k.detach().double()
    if m.dim() == 4:
        m = m.reshape(m.shape[0] * m.shape[1], -1)
    ev = torch.linalg.eigvalsh((m + m.T) / 2).flip(0)
    if normalize and ev[0] > 0:
        ev = ev / ev[0]
    return ev


def compare_kernels(kernels: Mapping[str, torch.Tensor], reference: str = "full", ps=(1, 2)) -> dict[str, dict[str, float]]:
    """{set: {"p=1": diff, "p=2": diff}} for every set except the reference."""
    if reference not in kernels:
        raise KeyError(f"reference kernel {reference!r} not among {list(kernels)}")
    return {
        name: {f"p={p}": relative_difference(k, kernels[reference], p) for p in ps}
        for name, k in kernels.items()
        if name != reference
    }
