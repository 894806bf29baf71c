"""TURN's class-balanced clean subset, with a fallback for classes that keep (almost) nothing.

:func:`balanced_subset` turns the GMM's keep mask (turnctl.cleanse.gmm.select_clean) into the
samples of one fine-tuning epoch: the same number from every class, redrawn each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from turnctl.cleanse.inputs import ArrayLike, as_1d, samples


@dataclass(frozen=True)
class BalancedSubset:
    """Result of :func:`balanced_subset`."""

    selected: np.ndarray  # bool [N_samples]
    indices: np.ndarray  # int64, sorted: np.flatnonzero(selected)
    per_class: np.ndarray  # int64 [C]: samples drawn per class (n_per_class, or 0 for empty classes)
    n_per_class: int  # N = min over non-empty classes of available_per_class
    available_per_class: np.ndarray  # int64 [C]: kept samples per class after the fallback
    fallback_classes: Tuple[int, ...]  # classes that kept < min_per_class and used their lowest losses
    empty_classes: Tuple[int, ...]  # classes without any (valid) sample: ignored


def balanced_subset(keep: ArrayLike, labels: ArrayLike, *, num_classes: int, losses: ArrayLike,
                    fallback_k: int = 8, min_per_class: int = 2, seed: int = 0,
                    valid: Optional[ArrayLike] = None) -> BalancedSubset:
    """TURN's class-balanced clean subset: N uniform draws from every class's kept samples.

    N = min over classes of the number of kept samples. A class keeping fewer than
    ``min_per_class`` samples (0 or 1 would make N collapse) falls back to its ``fallback_k``
    lowest-loss samples (all of them if it has fewer; ties by index) and is listed in
    ``fallback_classes`` for the log; N is computed after the fallback, so every class, fallback or
    not, contributes exactly N samples. Note that this makes N <= fallback_k whenever a fallback
    happens. Classes with no (valid) sample at all are ignored and listed in ``empty_classes``.
    Draws use ``numpy.random.default_rng(seed)``, class by class in increasing class order:
    deterministic for a given seed.

    Args:
        keep: bool [N_samples] from :func:`turnctl.cleanse.gmm.select_clean` (``CleanSelection.keep``).
        labels: labels [N_samples] in ``[0, num_classes)``.
        num_classes: C.
        losses: per-sample losses [N_samples] (only used to rank a fallback class's samples).
        fallback_k, min_per_class: the fallback rule above (recipe ``cleanse.fallback_k``,
            ``cleanse.min_per_class``).
        seed: seed of the draws (the trainer derives one per epoch: the subset is redrawn).
        valid: optional bool mask; invalid samples are never selected (their loss may be NaN).

    Example: class 0 keeps 3, class 1 keeps 2, class 2 keeps none and falls back to its 2 lowest
    losses (fallback_k=2), class 3 has no sample; so N = 2.

    >>> keep   = [1, 1, 1, 0,  1, 1, 0,  0, 0, 0]
    >>> labels = [0, 0, 0, 0,  1, 1, 1,  2, 2, 2]
    >>> losses = [.1, .2, .3, 2., .1, .2, 3., .9, .5, .7]
    >>> sub = balanced_subset(keep, labels, num_classes=4, losses=losses, fallback_k=2, seed=0)
    >>> sub.n_per_class, sub.per_class.tolist(), sub.fallback_classes, sub.empty_classes
    (2, [2, 2, 2, 0], (2,), (3,))
    >>> sub.indices[sub.indices >= 7].tolist()  # class 2: its two lowest losses
    [8, 9]
    """
    if int(fallback_k) != fallback_k or fallback_k < 1:
        raise ValueError(f"fallback_k must be an int >= 1, got {fallback_k}")
    if int(min_per_class) != min_per_class or min_per_class < 1:
        raise ValueError(f"min_per_class must be an int >= 1, got {min_per_class}")
    cpu = torch.device("cpu")
    K = as_1d("keep", keep, torch.bool, cpu)
    L, Y, V = samples(losses, labels, valid, num_classes, cpu)
    if K.shape[0] != L.shape[0]:
        raise ValueError(f"keep has {K.shape[0]} entries, losses has {L.shape[0]}")
    C = int(num_classes)
    v = np.ones(K.shape[0], dtype=bool) if V is None else V.numpy()
    k, loss, y = K.numpy() & v, L.numpy(), Y.numpy()

    counts = np.bincount(y[v], minlength=C)
    kept = np.bincount(y[k], minlength=C)
    empty = counts == 0
    fallback = ~empty & (kept < min_per_class)
    pool = k.copy()
    if fallback.any():
        cand = np.flatnonzero(v & fallback[np.where(v, y, 0)])
        pool[cand] = False
        # Sort the candidates by (class, loss, index): lexsort's last key is the primary one.
        cand = cand[np.lexsort((cand, loss[cand], y[cand]))]
        start = np.searchsorted(y[cand], y[cand], side="left")
        rank = np.arange(cand.size) - start
        pool[cand[rank < fallback_k]] = True
    available = np.bincount(y[pool], minlength=C).astype(np.int64)
    n_per = int(available[~empty].min()) if (~empty).any() else 0

    rng = np.random.default_rng(seed)
    members = np.flatnonzero(pool)
    key = y[members]
    # numpy's stable sort is a radix sort for 16-bit keys: several times faster than for int64.
    members = members[np.argsort(key.astype(np.int16) if C <= np.iinfo(np.int16).max else key, kind="stable")]
    bounds = np.searchsorted(y[members], np.arange(C + 1))
    chosen = []
    for c in np.flatnonzero(~empty):
        m = members[bounds[c]:bounds[c + 1]]
        chosen.append(m[rng.choice(m.size, size=n_per, replace=False)])
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    selected = np.zeros(y.shape[0], dtype=bool)
    selected[indices] = True
    return BalancedSubset(
        selected=selected, indices=indices.astype(np.int64),
        per_class=np.bincount(y[indices], minlength=C).astype(np.int64), n_per_class=n_per,
        available_per_class=available,
        fallback_classes=tuple(int(c) for c in np.flatnonzero(fallback)),
        empty_classes=tuple(int(c) for c in np.flatnonzero(empty)),
    )
