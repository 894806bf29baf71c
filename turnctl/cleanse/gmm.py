"""The vectorised per-class two-component GMM: :func:`select_clean` and its result.

All classes are fitted at once, in float64, following scikit-learn's ``GaussianMixture`` step for
step (turnctl.cleanse's docstring has the conventions; turnctl.cleanse.reference is the per-class
scikit-learn loop it is checked against). The mixture's closed-form maths (log-odds, posteriors)
is turnctl.cleanse.mixture's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from turnctl.cleanse.inputs import ArrayLike, check_options, normalise_losses, resolve_device, samples
from turnctl.cleanse.mixture import component_coefficients, log_odds_coefficients

# scikit-learn adds 10 * eps to every component's responsibility mass before dividing by it
# (``_estimate_gaussian_parameters``); we do the same so that the EM trajectories coincide.
_EPS10 = 10 * float(np.finfo(np.float64).eps)
# Bins per class (at most) of the histogram that seeds the 2-means initialisation (_init_two_means).
_INIT_BINS = 1024
# Lloyd iterations to polish the histogram split; 1-D 2-means reaches a fixed point in a handful.
_LLOYD_MAX_ITER = 100
# Longest row of the class-aligned layout (_Pieces); <= 1000 keeps _Pieces.sum_log's products finite.
_ROW_MAX = 64
# Re-pack the working set when the classes still iterating hold less than this share of it.
_COMPACT_BELOW = 0.75
# A component with less than this share of its class's responsibility mass is "thin": its sums
# are accumulated directly rather than as (class total - other component).
_THIN = 1e-6


@dataclass(frozen=True)
class CleanSelection:
    """Result of :func:`select_clean`.

    Per-sample arrays have length N (the length of ``losses``); per-class arrays have C rows. All
    mixture parameters live in the normalised loss space: ``(loss - loss_min) / (loss_max -
    loss_min)`` (``loss_min=0, loss_max=1`` with ``normalize="none"``; every loss maps to 0 when
    ``loss_min == loss_max``). Component 0 is the low-mean (clean) one.
    """

    clean_prob: np.ndarray  # float32 [N]: posterior of the low-mean component (0 for invalid samples)
    keep: np.ndarray  # bool [N]: clean_prob > tau
    means: np.ndarray  # float64 [C, 2], means[:, 0] <= means[:, 1]
    variances: np.ndarray  # float64 [C, 2], reg_covar included
    weights: np.ndarray  # float64 [C, 2], rows sum to 1 (0 for empty classes)
    n_iter: np.ndarray  # int64 [C]: EM iterations run (0: degenerate class, no EM)
    converged: np.ndarray  # bool [C]: False only where EM stopped at max_iter
    class_counts: np.ndarray  # int64 [C]: valid samples per class (those the mixture saw)
    lower_bound: np.ndarray  # float64 [C]: mean log-likelihood at the last E-step (NaN: no EM)
    kept_per_class: np.ndarray  # int64 [C]: number of kept samples per class
    loss_min: float
    loss_max: float
    tau: float


class _Pieces:
    """The valid samples grouped by class into rows ("pieces") of P samples.

    Class c owns rows ``[row0_c, row0_c + k_c)``, ``k_c = ceil(n_c / P)``: its n_c samples, then
    padding. Samples are stored relative to their class minimum (``x - lo_c >= 0``) and padding
    is 0, so padding adds nothing to any x-weighted sum and never lies above a class threshold;
    where it would count (responsibility mass, log-likelihood) a mask or a closed-form correction
    removes it. Why this layout: a per-class sum becomes a dense row sum plus a tiny segment sum
    over rows (several times faster on CPU than a segment reduction over the samples), and every
    per-class constant is applied by broadcasting a [rows, 1] column instead of gathering one
    value per sample. EM is translation-equivariant, so fitting the shifted losses gives the same
    responsibilities; means are shifted back at the end.

    ``buf`` is three [rows, P] float64 scratch arrays that every pass writes into (a fresh
    multi-megabyte temporary costs page faults on each allocation); compacted subsets share them.
    """

    def __init__(self, X, M, row_cls, rows, counts, buf):
        self.X, self.M, self.row_cls, self.rows, self.counts, self._buf = X, M, row_cls, rows, counts, buf
        self.b0, self.b1, self.b2 = (b[: X.shape[0]] for b in buf)
        self.npad = (rows * X.shape[1] - counts).to(X.dtype)  # padding slots per class

    @staticmethod
    def build(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> Tuple["_Pieces", torch.Tensor]:
        """Group ``x`` (float64) by label ``y``; returns the pieces and the per-class minimum."""
        C, n, dev = num_classes, x.shape[0], x.device
        counts = torch.bincount(y, minlength=C)
        # Rows of P (8.._ROW_MAX): long enough for fast row reductions, short enough that the
        # padding (P/2 per class on average) stays under ~6% of the data.
        P = 8
        while P < _ROW_MAX and 8 * P <= n // max(C, 1):
            P *= 2
        # Group by class with a stable argsort of the labels (the losses need no sorting); narrow
        # integer keys sort two to three times faster than int64.
        order = torch.argsort(y.to(torch.int16 if C <= torch.iinfo(torch.int16).max else torch.int32), stable=True)
        xs = x.index_select(0, order)
        del order
        lo = torch.segment_reduce(xs, "min", lengths=counts)
        rows = (counts + P - 1) // P
        row0 = torch.cumsum(rows, 0) - rows
        start = torch.cumsum(counts, 0) - counts
        # Sorted sample i of class c goes to flat slot row0_c * P + (i - start_c). Per-class values
        # are expanded along the sorted samples with repeat_interleave (no label array needed).
        pos = torch.arange(n, device=dev).add_(torch.repeat_interleave(row0 * P - start, counts, output_size=n))
        R = int(rows.sum())
        xs.sub_(torch.repeat_interleave(lo, counts, output_size=n))
        X = x.new_zeros(R * P).index_copy_(0, pos, xs).view(R, P)
        del pos, xs
        row_cls = torch.repeat_interleave(torch.arange(C, device=dev), rows)
        # Samples fill each class's rows from the left: row r holds n_c - (r - row0_c) * P of them.
        real = (counts.index_select(0, row_cls) - (torch.arange(R, device=dev) - row0.index_select(0, row_cls)) * P)
        M = torch.lt(torch.arange(P, device=dev), real.clamp_(0, P)[:, None], out=x.new_empty(R, P))
        buf = tuple(x.new_empty(R, P) for _ in range(3))
        return _Pieces(X, M, row_cls, rows, counts, buf), lo

    def sum(self, V: torch.Tensor) -> torch.Tensor:
        """Per-class sums of a [rows, P] array (padding included: callers keep it at 0)."""
        return torch.segment_reduce(V.sum(1), "sum", lengths=self.rows)

    def max(self, V: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(V.amax(1), "max", lengths=self.rows)

    def sum_log(self, V: torch.Tensor) -> torch.Tensor:
        """Per-class sums of log(V) for V in [0.5, 1]: one log per row of products, not per sample
        (a product of P <= 1000 factors >= 0.5 stays above 1e-301: no underflow)."""
        return torch.segment_reduce(V.prod(1).log_(), "sum", lengths=self.rows)

    def col(self, per_class: torch.Tensor) -> torch.Tensor:
        """A per-class value as a [rows, 1] column, to broadcast over the pieces."""
        return per_class.index_select(0, self.row_cls)[:, None]

    def quadratic(self, a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """a[c] + b[c] x + q[c] x^2 per slot, in scratch b0 (b1 is clobbered)."""
        t = torch.addcmul(self.col(b), self.X, self.col(q), out=self.b1)
        return torch.addcmul(self.col(a), self.X, t, out=self.b0)

    def subset(self, class_mask: torch.Tensor) -> Tuple["_Pieces", torch.Tensor]:
        """The rows of the classes in ``class_mask`` (and their row indices in this set)."""
        keep = torch.nonzero(class_mask.index_select(0, self.row_cls))[:, 0]
        # The mask M is only needed by the initialisation, which runs on the full set.
        sub = _Pieces(self.X.index_select(0, keep), None, self.row_cls.index_select(0, keep),
                      torch.where(class_mask, self.rows, 0), torch.where(class_mask, self.counts, 0), self._buf)
        return sub, keep


def _init_two_means(pc: _Pieces, n: torch.Tensor, span: torch.Tensor,
                    fit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard 2-means partition of every fitted class, as scikit-learn's default initialisation.

    ``GaussianMixture(init_params="kmeans")`` starts EM from the labels of ``KMeans(2, n_init=1)``
    (k-means++ seeding, then Lloyd). In 1-D a 2-means partition is a threshold, and the best one is
    where the between-cluster term s0^2/n0 + s1^2/n1 peaks. We find it for all classes at once: a
    per-class histogram (up to _INIT_BINS bins over the class's own range) locates the best split
    to within a bin, and vectorised Lloyd steps (threshold = midpoint of the two cluster means)
    polish it to an exact Lloyd fixed point, which is what scikit-learn's KMeans converges to. When
    there is one fixed point near the optimum, scikit-learn reaches it too, EM starts from
    identical responsibilities and follows the same trajectory up to rounding: that is why the
    decisions agree even when both stop after 10 iterations, far from convergence. Where the
    2-means objective is flat near its optimum, adjacent fixed points a few samples apart exist;
    scikit-learn lands on one of them depending on its random seed, we on the one next to the best
    histogram split. The early-stopped EM results then differ by a few decisions (no more than
    between two scikit-learn seeds), and not at all once EM has converged.

    Works on the shifted losses (class minimum 0, maximum ``span``). Returns per-class
    (n1, s1, ss1): count, sum and sum of squares of the high cluster.
    """
    C = n.shape[0]
    # Enough bins that the histogram split is within a sample or two of the optimum, few enough
    # that C x B stays small for any number of classes.
    B = int(min(_INIT_BINS, max(16, (1 << 22) // max(C, 1))))
    X, M = pc.X, pc.M
    # bin of a sample = floor(c*B + 0.5 + x * (B - 1) / span_c): the +-0.5 margin keeps every
    # sample inside its own class's B bins whatever the rounding. Padding (x = 0) lands in bin 0
    # with weight 0.
    scale = torch.where(fit, (B - 1) / torch.where(fit, span, 1.0), 0.0)
    off = torch.arange(C, device=X.device, dtype=X.dtype) * B + 0.5
    flat = torch.addcmul(pc.col(off), X, pc.col(scale), out=pc.b0).view(-1).to(torch.int64)
    hn = X.new_zeros(C * B).scatter_add_(0, flat, M.view(-1)).view(C, B).cumsum_(1)
    hs = X.new_zeros(C * B).scatter_add_(0, flat, X.view(-1)).view(C, B).cumsum_(1)
    del flat
    # Split after bin j (cluster 0 = bins <= j): n0 = hn[:, j], s0 = hs[:, j]; totals in the last bin.
    # For a fitted class bin 0 holds its minimum and bin B-1 its maximum, so n0, n1 >= 1 for every
    # split and no masking is needed (other classes may produce NaN here; their result is unused).
    n0, s0, S = hn[:, :-1], hs[:, :-1], hs[:, -1]
    score = torch.mul(s0, s0).div_(n0)
    s1 = torch.sub(S[:, None], s0)
    score.add_(s1.mul_(s1).div_(torch.sub(n[:, None], n0)))
    j = score.argmax(1, keepdim=True)
    n0j, s0j = n0.gather(1, j)[:, 0], s0.gather(1, j)[:, 0]
    m0 = torch.where(fit, s0j / n0j.clamp(min=1), 0.0)
    m1 = torch.where(fit, (S - s0j) / (n - n0j).clamp(min=1), span)
    # Lloyd: threshold at the midpoint of the two means, recompute the means. Partitions are upper
    # sets of the sorted losses, so an unchanged high-cluster count means an unchanged partition,
    # i.e. a fixed point; often the histogram split already is one and one step confirms it.
    # (The threshold is > 0, so padding is never "high".)
    prev_n1 = n - n0j
    for _ in range(_LLOYD_MAX_ITER):
        high = torch.gt(X, pc.col((m0 + m1) / 2), out=pc.b1)  # 1.0 / 0.0
        cnt1 = pc.sum(high)
        hx = torch.mul(high, X, out=pc.b2)
        sum1 = pc.sum(hx)
        # Both clusters stay non-empty (min < t < max); the guard only protects against rounding.
        good = fit & (cnt1 > 0) & (cnt1 < n)
        m1 = torch.where(good, sum1 / cnt1.clamp(min=1), m1)
        m0 = torch.where(good, (S - sum1) / (n - cnt1).clamp(min=1), m0)
        if bool(((cnt1 == prev_n1) | ~good).all()):
            break
        prev_n1 = cnt1
    return cnt1, sum1, pc.sum(hx.mul_(X))



def _m_step(R, Rx, Rxx, reg_covar):
    """scikit-learn's M-step from responsibility sums: nk = sum r + 10 eps, mean, variance + reg."""
    nk = R + _EPS10
    mu = Rx / nk
    # sum r (x - mu)^2 expanded; exact up to rounding in float64 (x >= 0 here: the class minimum is 0).
    var = (Rxx - 2 * mu * Rx + mu * mu * R).clamp(min=0) / nk + reg_covar
    return mu, var, nk


def _fit_pieces(pc: _Pieces, *, max_iter: int, tol: float, reg_covar: float):
    """EM for every class with ``fit`` True at once, mirroring scikit-learn's loop step by step.

    scikit-learn, per iteration: E-step with the current parameters (giving responsibilities and
    the mean log-likelihood = the "lower bound"), M-step, then stop if |lower bound change| < tol
    (the first change is +inf). Here every class does exactly that, and a class that has met its
    tolerance is frozen (its parameters no longer change) while the others go on.

    Only classes with two or more distinct losses are fitted (``fit``, returned too); parameters
    are in the shifted coordinates of ``pc`` (class minimum 0).
    """
    X = pc.X
    dt, dev = X.dtype, X.device
    n = pc.counts.to(dt)
    C = n.shape[0]
    Sx = pc.sum(X)
    Sxx = pc.sum(torch.mul(X, X, out=pc.b0))
    span = pc.max(X)  # max - min per class (the padding, at 0, is never above the data)
    fit = (pc.counts > 0) & (span > 0)

    # Initial parameters from the hard 2-means partition, exactly like GaussianMixture._initialize
    # (weights = nk / n_samples there; = nk / sum(nk) after every M-step).
    n1, s1, ss1 = _init_two_means(pc, n, span, fit)
    mu, var, nk = _m_step(torch.stack([n - n1, n1], 1), torch.stack([Sx - s1, s1], 1),
                          torch.stack([Sxx - ss1, ss1], 1), reg_covar)
    w = nk / n.clamp(min=1)[:, None]
    # Classes not fitted get harmless placeholders so that no NaN/inf leaks into shared arithmetic.
    mu = torch.where(fit[:, None], mu, 0.0)
    var = torch.where(fit[:, None], var, 1.0)
    w = torch.where(fit[:, None], w, 0.5)

    n_iter = torch.zeros(C, dtype=torch.int64, device=dev)
    converged = torch.zeros(C, dtype=torch.bool, device=dev)
    lower_bound = torch.full((C,), -torch.inf, dtype=dt, device=dev)
    active = fit.clone()
    work = pc
    for it in range(1, max_iter + 1):
        if not bool(active.any()):
            break
        # E-step on the working set: d = log-odds of component 0, r0 = sigmoid(d) = its responsibility.
        da, db, dq = log_odds_coefficients(mu, var, w)
        d = work.quadratic(da, db, dq)  # in b0
        r0 = torch.sigmoid(d, out=work.b1)
        # Padding sits at x = 0, where d = da: it adds nothing to x-weighted sums, and its share
        # of the others is removed in closed form. No cancellation to fear: the class minimum is
        # a real sample at x = 0 too, so R0 >= sigmoid(da) >= (padding's share) / P.
        ra = torch.sigmoid(da)
        R0 = work.sum(r0) - work.npad * ra
        rx = torch.mul(r0, work.X, out=work.b2)
        R0x = work.sum(rx)
        R0xx = work.sum(rx.mul_(work.X))
        # Mean log-likelihood under this E-step's parameters (scikit-learn's "lower bound"):
        # log p(x) = l1(x) + softplus(d); the l1 part is a closed form in the class sums, and
        # softplus(d) = relu(d) - log(max(r0, 1 - r0)) reuses r0 (the log's argument is in
        # [0.5, 1]: accurate, and summed as a log of products, one log per row).
        m = torch.maximum(torch.sub(1.0, r0, out=work.b2), r0, out=work.b2)
        sp = work.sum(torch.clamp(d, min=0.0, out=work.b1)) - work.sum_log(m)
        sp -= work.npad * (da.clamp(min=0.0) - torch.maximum(ra, 1.0 - ra).log())
        a, b, q = component_coefficients(mu, var, w)
        nw = work.counts.to(dt)
        lb = (nw * a[:, 1] + b[:, 1] * Sx + q[:, 1] * Sxx + sp) / nw.clamp(min=1)
        # Component 1's sums are the class totals minus component 0's (half the passes over the
        # samples). That subtraction cancels when component 1 is nearly empty; scikit-learn sums
        # exp(log_resp) directly there, so those (rare) classes are summed directly too.
        R1, R1x, R1xx = nw - R0, Sx - R0x, Sxx - R0xx
        thin = active & (R1 < _THIN * nw)
        if bool(thin.any()):
            tpc, rows = work.subset(thin)
            r1 = torch.sigmoid(-d.index_select(0, rows))
            r1x = r1 * tpc.X
            # padding removed as for R0 (bounded: the class minimum has the padding's r1)
            R1 = torch.where(thin, tpc.sum(r1) - tpc.npad * torch.sigmoid(-da), R1)
            R1x = torch.where(thin, tpc.sum(r1x), R1x)
            R1xx = torch.where(thin, tpc.sum(r1x * tpc.X), R1xx)
        new_mu, new_var, new_nk = _m_step(torch.stack([R0, R1], 1), torch.stack([R0x, R1x], 1),
                                          torch.stack([R0xx, R1xx], 1), reg_covar)
        new_w = new_nk / new_nk.sum(1, keepdim=True)
        upd = active[:, None]
        mu, var, w = torch.where(upd, new_mu, mu), torch.where(upd, new_var, var), torch.where(upd, new_w, w)
        change = lb - lower_bound
        lower_bound = torch.where(active, lb, lower_bound)
        n_iter = torch.where(active, it, n_iter)
        done = active & (change.abs() < tol)
        converged |= done
        active &= ~done
        # Classes that stopped leave the working set once the others are a minority of it.
        if bool(active.any()):
            share = float(torch.where(active, nw, 0.0).sum()) / max(float(nw.sum()), 1.0)
            if share < _COMPACT_BELOW:
                work = work.subset(active)[0]
    return mu, var, w, n_iter, converged, lower_bound, fit


def select_clean(losses: ArrayLike, labels: ArrayLike, *, num_classes: int, tau: float = 0.6,
                 max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                 normalize: str = "minmax", valid: Optional[ArrayLike] = None,
                 device: Union[str, torch.device, None] = None) -> CleanSelection:
    """Per-class two-component GMMs on per-sample losses; keep the samples likely clean.

    For every class c, a 1-D Gaussian mixture with two components is fitted by EM to the losses of
    the (valid) samples labelled c; ``clean_prob[i]`` is the posterior of the low-mean component
    under the mixture of sample i's class and ``keep = clean_prob > tau``. All classes are fitted
    simultaneously with torch (float64, on ``device``: default the device of ``losses`` if it is a
    tensor, else CPU), following scikit-learn's ``GaussianMixture(2, max_iter=max_iter, tol=tol,
    reg_covar=reg_covar)`` step for step, including its per-fit stopping rule (see
    :func:`turnctl.cleanse.reference.fit_reference_sklearn`). Conventions for normalisation, degenerate classes, invalid
    samples and errors are in turnctl.cleanse's docstring.

    Args:
        losses: per-sample losses, shape [N] (numpy array, torch tensor or list).
        labels: given labels in ``[0, num_classes)``, shape [N].
        num_classes: C.
        tau: keep threshold on the clean posterior (TURN: 0.6).
        max_iter, tol, reg_covar: EM settings (DivideMix lineage defaults 10, 1e-2, 5e-4).
        normalize: ``"minmax"`` (global, to [0, 1]) or ``"none"``.
        valid: optional bool mask [N]; False excludes a sample (clean_prob 0, keep False).
        device: where to run the fit.

    Returns:
        :class:`CleanSelection`.

    Example: class 0 has three low losses and one high one, class 1 a single sample.

    >>> sel = select_clean([0.1, 0.12, 0.11, 2.5, 0.7], [0, 0, 0, 0, 1], num_classes=2)
    >>> sel.keep.tolist()
    [True, True, True, False, True]
    >>> sel.class_counts.tolist(), sel.n_iter[1].item()
    ([4, 1], 0)
    >>> bool(sel.means[0, 0] < sel.means[0, 1])  # component 0 is the low-mean one
    True
    """
    check_options(tau, max_iter, tol, reg_covar, normalize)
    dev = resolve_device(losses, device)
    L, Y, V = samples(losses, labels, valid, num_classes, dev)
    N, C = L.shape[0], int(num_classes)

    vidx = None if V is None else torch.nonzero(V)[:, 0]
    Lv, Yv = (L, Y) if vidx is None else (L.index_select(0, vidx), Y.index_select(0, vidx))
    x, loss_min, loss_max = normalise_losses(Lv, normalize)

    pc, lo = _Pieces.build(x, Yv, C)
    counts = pc.counts
    empty = counts == 0
    mu, var, w, n_iter, converged, lb, fit = _fit_pieces(pc, max_iter=int(max_iter), tol=float(tol),
                                                         reg_covar=float(reg_covar))
    del pc
    flat = ~empty & ~fit  # one sample or zero spread: closed form, no EM
    # Component 0 := the low-mean one (EM may in principle let the two means cross).
    swap = mu[:, 0] > mu[:, 1]
    perm = torch.stack([swap.long(), 1 - swap.long()], 1)
    mu, var, w = mu.gather(1, perm), var.gather(1, perm), w.gather(1, perm)

    # Final E-step with the final parameters (scikit-learn's predict_proba after fit), in the
    # input order so nothing needs scattering back: the log-odds quadratic is moved from the
    # shifted coordinates (x - lo_c) back to x. Flat classes get d = +inf: posterior exactly 1.
    a, b, q = log_odds_coefficients(mu, var, w)
    a, b = a - b * lo + q * lo * lo, b - 2 * q * lo
    a, b, q = torch.where(fit, a, torch.inf), torch.where(fit, b, 0.0), torch.where(fit, q, 0.0)
    ya = a.index_select(0, Yv)
    p = ya.addcmul_(x, torch.index_select(b, 0, Yv).addcmul_(x, torch.index_select(q, 0, Yv)))
    p = torch.sigmoid(p, out=torch.empty(p.shape, dtype=torch.float32, device=dev))
    if vidx is not None:
        p = torch.zeros(N, dtype=torch.float32, device=dev).index_copy_(0, vidx, p)
    mu = mu + lo[:, None]

    # Degenerate classes' documented parameters.
    mu = torch.where(fit[:, None], mu, torch.where(flat[:, None], torch.where(flat, lo, 0.0)[:, None], torch.nan))
    var = torch.where(fit[:, None], var, torch.where(flat[:, None], reg_covar, torch.nan))
    one_zero = torch.tensor([1.0, 0.0], dtype=torch.float64, device=dev).expand(C, 2)
    w = torch.where(fit[:, None], w, torch.where(flat[:, None], one_zero, 0.0))
    return make_selection(p, Y, V, C, tau, mu, var, w, n_iter, converged | ~fit, counts,
                          torch.where(fit, lb, torch.nan), loss_min, loss_max)


def make_selection(prob, Y, V, C, tau, mu, var, w, n_iter, converged, counts, lb, loss_min, loss_max):
    """Assemble the CPU/numpy result; ``prob`` must already be 0 for invalid samples."""
    def np_(t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy()

    clean_prob = np_(prob.to(torch.float32))
    # keep is derived from the returned float32 probabilities so that keep == (clean_prob > tau).
    keep = clean_prob > tau
    if V is not None:
        keep &= np_(V)
    y = np_(Y)
    return CleanSelection(
        clean_prob=clean_prob, keep=keep,
        means=np_(mu), variances=np_(var), weights=np_(w),
        n_iter=np_(n_iter).astype(np.int64), converged=np_(converged),
        class_counts=np_(counts).astype(np.int64), lower_bound=np_(lb),
        # (weights: no boolean gather; invalid samples may carry any label, so they are left out)
        kept_per_class=(np.bincount(y, weights=keep, minlength=C) if V is None
                        else np.bincount(y[keep], minlength=C)).astype(np.int64),
        loss_min=float(loss_min), loss_max=float(loss_max), tau=float(tau),
    )
