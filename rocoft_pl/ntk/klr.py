"""Kernel logistic regression on an NTK (the paper's eq. 6, Malladi et al. 2023), multi-class, convex.

With a train kernel K (n, D, n, D) and coefficients alpha (n, D) the scores are s_ia = sum_jb K_iajb alpha_jb
(f in the RKHS of the matrix-valued kernel). Logits: s (D = C classes), or [0, s] for one binary output
(D = 1, C = 2). An unregularised bias per class is added. We minimise

    mean_i CE(softmax(logits_i + b), y_i) + lambda / 2 * alpha^T K alpha

with damped Newton steps in float64; the problem is convex in (alpha, b). K is first divided by its mean diagonal so the
lambda grid means the same for every kernel. lambda is chosen by stratified k-fold cross-validation on the
train set (highest held-out accuracy, then lowest held-out log-loss). Predictions on new points use the
cross kernel K(test, train) of shape (m, D, n, D).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

@contextmanager
def single_thread():
    """Tiny dense problems: one intra-op thread is far faster (no thread wake-ups), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


DEFAULT_LAMBDAS = tuple(float(x) for x in np.logspace(-5, 1, 7))


def _logits(scores: torch.Tensor, bias: torch.Tensor, n_classes: int) -> torch.Tensor:
    if scores.shape[1] == 1 and n_classes == 2:
        scores = torch.cat([torch.zeros_like(scores), scores], dim=1)
    return scores + bias


def _check(kernel: torch.Tensor, n_classes: int) -> torch.Tensor:
    if kernel.dim() == 2:
        kernel = kernel[:, None, :, None]
    d = kernel.shape[1]
    if not (d == n_classes or (d == 1 and n_classes == 2)):
        raise ValueError(f"a kernel with {d} outputs cannot classify {n_classes} classes (need D = C, or D = 1 and C = 2)")
    return kernel.double()


def _design(k: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Phi (n*C, n*D + C) with logits.flatten() = Phi @ [alpha.flatten(), bias]."""
    n, d = k.shape[:2]
    km = k.reshape(n, d, n * d)
    bias = torch.eye(n_classes, dtype=k.dtype).expand(n, n_classes, n_classes)
    if d == n_classes:
        scores = km
    else:  # one binary output: class 0 has logit 0 (+ bias), class 1 the score
        scores = torch.cat([torch.zeros_like(km), km], dim=1)
    return torch.cat([scores, bias], dim=2).reshape(n * n_classes, n * d + n_classes)


def fit_klr(
    kernel: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float, max_iter: int = 100, tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha (n, D), bias (C,)) minimising the regularised mean cross-entropy. ``kernel`` (n, D, n, D) or (n, n).

    Damped Newton with exact Hessian (the problem has n*D + C unknowns) and backtracking line search.
    """
    k = _check(kernel, n_classes)
    n, d = k.shape[:2]
    c = n_classes
    y = torch.as_tensor(y, dtype=torch.long)
    phi = _design(k, c)
    reg = torch.zeros(n * d + c, n * d + c, dtype=torch.float64)
    reg[: n * d, : n * d] = (k.reshape(n * d, n * d) + k.reshape(n * d, n * d).T) / 2
    onehot = torch.nn.functional.one_hot(y, c).double()
    z = torch.zeros(n * d + c, dtype=torch.float64)

    def objective(z: torch.Tensor) -> torch.Tensor:
        logits = (phi @ z).reshape(n, c)
        return torch.nn.functional.cross_entropy(logits, y) + lam / 2 * z @ (reg @ z)

    f = objective(z)
    ridge = 1e-10 * (1 + float(torch.diagonal(reg).abs().max()))
    for _ in range(max_iter):
        prob = torch.softmax((phi @ z).reshape(n, c), dim=1)
        grad = phi.T @ (prob - onehot).reshape(-1) / n + lam * (reg @ z)
        w = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # (n, C, C)
        pw = torch.einsum("iab,ibp->iap", w, phi.reshape(n, c, -1)).reshape(n * c, -1)
        hess = phi.T @ pw / n + lam * reg + ridge * torch.eye(len(z), dtype=torch.float64)
        step = torch.linalg.lstsq(hess, -grad[:, None]).solution[:, 0]
        decrement = float(-(grad @ step))
        if decrement / 2 < tol:
            break
        t = 1.0
        while t > 1e-10:
            z_new = z + t * step
            f_new = objective(z_new)
            if f_new <= f - 0.25 * t * decrement:
                break
            t /= 2
        else:
            break
        z, f = z_new, f_new
    return z[: n * d].reshape(n, d), z[n * d :]


def predict_logits(cross: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Logits (m, C) from the cross kernel K(test, train) (m, D, n, D) or (m, n)."""
    c = cross.double()
    if c.dim() == 2:
        c = c[:, None, :, None]
    scores = torch.einsum("iajb,jb->ia", c, alpha)
    return _logits(scores, bias, n_classes)


def _folds(y: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            folds[i % n_folds].append(int(j))
    return [np.asarray(sorted(f)) for f in folds if f]


@dataclass
class KernelLogisticRegression:
    """fit(K_train, y) picks lambda by CV and refits on all of train; predict(K_test_train) gives classes."""

    n_classes: int
    lambdas: Sequence[float] = DEFAULT_LAMBDAS
    n_folds: int = 4
    seed: int = 0
    max_iter: int = 100
    lam_: Optional[float] = None
    scale_: float = 1.0
    cv_scores_: dict = field(default_factory=dict)

    def fit(self, kernel: torch.Tensor, y) -> "KernelLogisticRegression":
        with single_thread():
            return self._fit(kernel, y)

    def _fit(self, kernel: torch.Tensor, y) -> "KernelLogisticRegression":
        k = _check(kernel, self.n_classes)
        n, d = k.shape[:2]
        diag = torch.diagonal(k.reshape(n * d, n * d)).mean()
        self.scale_ = float(diag) if float(diag) > 0 else 1.0
        k = k / self.scale_
        y_np = np.asarray(torch.as_tensor(y).tolist())
        y_t = torch.as_tensor(y_np, dtype=torch.long)
        n_folds = min(self.n_folds, int(np.bincount(y_np).min()) if len(y_np) else 0)
        if len(self.lambdas) == 1 or n_folds < 2:
            self.lam_ = float(self.lambdas[0] if len(self.lambdas) == 1 else np.median(self.lambdas))
        else:
            folds = _folds(y_np, n_folds, self.seed)
            best = None
            for lam in self.lambdas:
                accs, losses = [], []
                for f in folds:
                    tr = np.setdiff1d(np.arange(n), f)
                    a, b = fit_klr(k[tr][:, :, tr], y_t[tr], self.n_classes, lam, self.max_iter)
                    logits = predict_logits(k[f][:, :, tr], a, b, self.n_classes)
                    accs.append(float((logits.argmax(1) == y_t[f]).double().mean()))
                    losses.append(float(torch.nn.functional.cross_entropy(logits, y_t[f])))
                score = (float(np.mean(accs)), -float(np.mean(losses)))
                self.cv_scores_[lam] = {"accuracy": score[0], "log_loss": -score[1]}
                if best is None or score > best[0]:
                    best = (score, lam)
            self.lam_ = float(best[1])
        self.alpha_, self.bias_ = fit_klr(k, y_t, self.n_classes, self.lam_, self.max_iter)
        return self

    def decision_function(self, cross: torch.Tensor) -> torch.Tensor:
        return predict_logits(cross.double() / self.scale_, self.alpha_, self.bias_, self.n_classes)

    def predict(self, cross: torch.Tensor) -> torch.Tensor:
        return self.decision_function(cross).argmax(1)

    def score(self, cross: torch.Tensor, y) -> float:
        return float((self.predict(cross) == torch.as_tensor(y, dtype=torch.long)).double().mean())
