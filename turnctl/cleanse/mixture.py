"""The closed-form maths of a two-component 1-D Gaussian mixture, in one place.

The EM fit (turnctl.cleanse.gmm), its final posteriors, and the report's plots and checks
(turnctl.report) all evaluate a fitted mixture through these functions, so the clean posterior a
report draws is the one the selection computed. Everything rests on one identity: the log of a
weighted Gaussian density is a quadratic in x,

    log(w_k N(x | mu_k, var_k)) = a_k + b_k x + q_k x^2,

so the log-odds of the two components, d(x) = log p(component 0 | x) - log p(component 1 | x), is
a quadratic too, the clean posterior is sigmoid(d(x)) and the points where it equals tau are the
roots of d(x) = logit(tau). Component 0 is the low-mean (clean) one.
"""

from __future__ import annotations

import math
from typing import Any, List, Tuple

import numpy as np
import torch

_LOG_2PI = math.log(2.0 * math.pi)


def component_coefficients(mu: torch.Tensor, var: torch.Tensor,
                           w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, q)`` with log(w_k N(x | mu_k, var_k)) = a_k + b_k x + q_k x^2, elementwise (a zero
    weight gives a = -inf)."""
    prec = 1.0 / var
    a = torch.log(w) - 0.5 * _LOG_2PI - 0.5 * torch.log(var) - 0.5 * prec * mu * mu
    return a, prec * mu, -0.5 * prec


def log_odds_coefficients(mu: torch.Tensor, var: torch.Tensor,
                          w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(x) = log p(component 0 | x) - log p(component 1 | x) = a + b x + q x^2, from [..., 2]
    parameters (one row per class): ``(a, b, q)``, each [...]."""
    a, b, q = component_coefficients(mu, var, w)
    return a[..., 0] - a[..., 1], b[..., 0] - b[..., 1], q[..., 0] - q[..., 1]


def _params(*arrays: Any) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in arrays)


def log_components(x: Any, means: Any, variances: Any, weights: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(log(w_0 N_0(x)), log(w_1 N_1(x)))`` as float64 arrays; parameters [..., 2] broadcast
    against ``x`` as in :func:`mixture_posterior`.

    >>> l0, l1 = log_components([0.1, 0.8], [0.1, 0.8], [0.01, 0.01], [0.5, 0.5])
    >>> bool(l0[0] > l1[0]) and bool(l1[1] > l0[1])
    True
    """
    xt, m, v, w = _params(x, means, variances, weights)
    a, b, q = component_coefficients(m, v, w)
    return tuple((a[..., k] + xt * (b[..., k] + xt * q[..., k])).numpy() for k in (0, 1))


def mixture_posterior(x: Any, means: Any, variances: Any, weights: Any) -> np.ndarray:
    """Posterior of component 0 (clean) at ``x``: sigmoid of the log-odds quadratic.

    ``means``/``variances``/``weights`` are [..., 2] and broadcast against ``x`` (pass one class's
    rows, or ``means[labels]`` for per-sample parameters). A zero noisy weight gives 1; NaN
    parameters (a class without samples) give NaN.

    >>> float(mixture_posterior(0.1, [0.1, 0.8], [0.01, 0.01], [0.5, 0.5])) > 0.99
    True
    >>> mixture_posterior([0.3, 2.0], [0.3, 0.3], [0.0005, 0.0005], [1.0, 0.0]).tolist()
    [1.0, 1.0]
    """
    xt, m, v, w = _params(x, means, variances, weights)
    a, b, q = log_odds_coefficients(m, v, w)
    return torch.sigmoid(a + xt * (b + xt * q)).numpy()


def tau_crossings(means: Any, variances: Any, weights: Any, *, tau: float,
                  lo: float = 0.0, hi: float = 1.0) -> List[float]:
    """The x in [lo, hi] where one class's clean posterior equals ``tau`` (0, 1 or 2 points).

    The log-odds is a quadratic in x, so this is exact. Two crossings happen when the noisy
    component is the narrower one: samples beyond it on the right are called clean again.

    >>> [round(x, 3) for x in tau_crossings([0.2, 0.8], [0.01, 0.01], [0.5, 0.5], tau=0.5)]
    [0.5]
    """
    m, v, w = _params(means, variances, weights)
    if not bool(torch.isfinite(m).all() & torch.isfinite(v).all()) or not bool((w > 0).all()):
        return []  # a single component: the posterior is constant
    a, b, q = (float(t) for t in log_odds_coefficients(m, v, w))
    a -= math.log(tau / (1.0 - tau))  # solve d(x) = logit(tau)
    if abs(q) < 1e-12 * max(abs(b), 1.0):
        roots = [-a / b] if b != 0 else []
    else:
        disc = b * b - 4 * q * a
        if disc < 0:
            roots = []
        else:
            s = math.sqrt(disc)
            # The numerically stable pair (no cancellation between b and s).
            t = -0.5 * (b + math.copysign(s, b))
            roots = [t / q, a / t] if t != 0 else [0.0]
    return sorted(r for r in set(roots) if lo <= r <= hi)
