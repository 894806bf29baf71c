"""The slow, obviously-correct selection: one scikit-learn ``GaussianMixture`` per class.

:func:`fit_reference_sklearn` is what turnctl.cleanse.gmm.select_clean is tested
(tests/test_cleanse.py) and benchmarked (benchmarks/bench_select.py) against; nothing in a run
calls it.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from turnctl.cleanse.gmm import CleanSelection, make_selection
from turnctl.cleanse.inputs import ArrayLike, check_options, normalise_losses, samples


def fit_reference_sklearn(losses: ArrayLike, labels: ArrayLike, *, num_classes: int, tau: float = 0.6,
                          max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                          normalize: str = "minmax", valid: Optional[ArrayLike] = None,
                          random_state: int = 0) -> CleanSelection:
    """The same selection as :func:`turnctl.cleanse.gmm.select_clean`, one scikit-learn ``GaussianMixture`` per class.

    Slow and obviously correct: the reference for tests and ``benchmarks/bench_select.py``. Same
    validation, global normalisation, degenerate-class conventions and output; each regular class
    is fitted with ``GaussianMixture(2, max_iter, tol, reg_covar, random_state=random_state)`` in
    float64, components re-ordered by mean. Convergence warnings are recorded in ``converged``
    instead of being emitted once per class.

    >>> ref = fit_reference_sklearn([0.1, 0.12, 0.11, 2.5, 0.7], [0, 0, 0, 0, 1], num_classes=2)
    >>> ref.keep.tolist()
    [True, True, True, False, True]
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    check_options(tau, max_iter, tol, reg_covar, normalize)
    L, Y, V = samples(losses, labels, valid, num_classes, torch.device("cpu"))
    C = int(num_classes)
    v = np.ones(L.shape[0], dtype=bool) if V is None else V.numpy()
    x = np.zeros(L.shape[0])
    xv, loss_min, loss_max = normalise_losses(L[torch.from_numpy(v)], normalize)
    x[v] = xv.numpy()
    y = Y.numpy()

    prob = np.zeros(L.shape[0])
    mu = np.full((C, 2), np.nan)
    var = np.full((C, 2), np.nan)
    w = np.zeros((C, 2))
    n_iter = np.zeros(C, dtype=np.int64)
    converged = np.ones(C, dtype=bool)
    lb = np.full(C, np.nan)
    counts = np.zeros(C, dtype=np.int64)
    members = np.flatnonzero(v)
    members = members[np.argsort(y[members], kind="stable")]
    bounds = np.searchsorted(y[members], np.arange(C + 1))
    for c in range(C):
        idx = members[bounds[c]:bounds[c + 1]]
        counts[c] = idx.size
        if idx.size == 0:
            continue
        xc = x[idx]
        if idx.size == 1 or xc.max() == xc.min():
            mu[c], var[c], w[c] = xc[0], reg_covar, (1.0, 0.0)
            prob[idx] = 1.0
            continue
        gm = GaussianMixture(2, max_iter=int(max_iter), tol=tol, reg_covar=reg_covar, random_state=random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(xc[:, None])
        o = np.argsort(gm.means_[:, 0], kind="stable")
        mu[c], var[c], w[c] = gm.means_[o, 0], gm.covariances_[o, 0, 0], gm.weights_[o]
        n_iter[c], converged[c], lb[c] = gm.n_iter_, gm.converged_, gm.lower_bound_
        prob[idx] = gm.predict_proba(xc[:, None])[:, o[0]]
    return make_selection(torch.from_numpy(prob), Y, V, C, tau, torch.from_numpy(mu), torch.from_numpy(var),
                           torch.from_numpy(w), torch.from_numpy(n_iter), torch.from_numpy(converged),
                           torch.from_numpy(counts), torch.from_numpy(lb), loss_min, loss_max)
