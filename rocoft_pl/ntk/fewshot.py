"""k-shot sampling following LM-BFF (Gao et al., 2021): k examples per class, one sample per seed.

LM-BFF seeds: 13, 21, 42, 87, 100. Train: k per class drawn without replacement from the training pool.
Test: ``test_per_class`` per class (balanced) or ``test_size`` in total drawn from the test pool, or the
whole test pool; when the test pool is the training pool, the train draw is excluded first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

LM_BFF_SEEDS = (13, 21, 42, 87, 100)


def sample_per_class(labels: Sequence[Any], k: int, rng: np.random.Generator, exclude=()) -> list[int]:
    labels = np.asarray(list(labels))
    exclude = set(int(i) for i in exclude)
    chosen: list[int] = []
    for c in sorted(set(labels.tolist()), key=str):
        pool = [i for i in np.flatnonzero(labels == c).tolist() if i not in exclude]
        if len(pool) < k:
            raise ValueError(f"class {c!r} has {len(pool)} examples, fewer than k={k}")
        chosen.extend(int(i) for i in rng.choice(pool, size=k, replace=False))
    return chosen


def k_shot_split(
    train_labels: Sequence[Any],
    k: int,
    seed: int,
    test_labels: Optional[Sequence[Any]] = None,
    test_per_class: Optional[int] = None,
    test_size: Optional[int] = None,
) -> tuple[list[int], list[int]]:
    """(train indices into train_labels, test indices into test_labels or, if None, into train_labels)."""
    rng = np.random.default_rng(seed)
    train = sample_per_class(train_labels, k, rng)
    same = test_labels is None
    pool_labels = list(train_labels if same else test_labels)
    excluded = set(train) if same else set()
    if test_per_class is not None:
        test = sample_per_class(pool_labels, test_per_class, rng, exclude=excluded)
    else:
        pool = [i for i in range(len(pool_labels)) if i not in excluded]
        if test_size is not None and test_size < len(pool):
            pool = sorted(int(i) for i in rng.choice(pool, size=test_size, replace=False))
        test = pool
    return train, test
