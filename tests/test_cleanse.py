"""turnctl.cleanse: vectorised per-class GMM selection against scikit-learn, edge cases, balanced subset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turnctl.cleanse import balanced_subset, fit_reference_sklearn, select_clean
from turnctl.cleanse import gmm
from turnctl.errors import DataError, TurnctlError

TINY = (2, 3, 5)  # sizes of the tiny classes appended to every synthetic set


def synthetic(seed: int = 0, n_classes: int = 40, lo: int = 200, hi: int = 1500):
    """Per-class two-mode losses: clean ~ Gamma (low), noisy ~ |Normal| (high); sizes, noise rates
    and mode shapes differ per class; the last len(TINY) classes have 2, 3 and 5 samples."""
    rng = np.random.default_rng(seed)
    sizes = list(rng.integers(lo, hi, n_classes - len(TINY))) + list(TINY)
    losses, labels = [], []
    for c, m in enumerate(sizes):
        k = rng.binomial(m, rng.uniform(0.1, 0.7))
        clean = rng.gamma(2.0, rng.uniform(0.05, 0.3), m - k)
        noisy = np.abs(rng.normal(rng.uniform(1.5, 4.0), rng.uniform(0.3, 1.0), k))
        losses.append(np.concatenate([clean, noisy]))
        labels.append(np.full(m, c))
    perm = rng.permutation(sum(sizes))
    return np.concatenate(losses)[perm], np.concatenate(labels)[perm], n_classes


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def converged_pair(data):
    """Both fits run to convergence: the same optimum, so the strictest comparison."""
    losses, labels, C = data
    kw = dict(num_classes=C, max_iter=3000, tol=1e-10)
    return select_clean(losses, labels, **kw), fit_reference_sklearn(losses, labels, **kw)


# ---- agreement with scikit-learn ----------------------------------------------------------------

def test_reference_is_plain_sklearn_on_globally_normalised_losses(data, converged_pair):
    """The reference itself: one GaussianMixture per class on the GLOBAL min-max losses."""
    from sklearn.mixture import GaussianMixture

    losses, labels, C = data
    ref = converged_pair[1]
    x = (losses - losses.min()) / (losses.max() - losses.min())
    for c in (0, 7, C - 1):
        xc = x[labels == c][:, None]
        gm = GaussianMixture(2, max_iter=3000, tol=1e-10, reg_covar=5e-4, random_state=0).fit(xc)
        low = int(np.argmin(gm.means_[:, 0]))
        np.testing.assert_allclose(ref.clean_prob[labels == c], gm.predict_proba(xc)[:, low], atol=1e-6)
        np.testing.assert_allclose(ref.means[c], np.sort(gm.means_[:, 0]))


def test_matches_converged_sklearn(data, converged_pair):
    losses, labels, C = data
    vec, ref = converged_pair
    assert vec.converged.all() and ref.converged.all()
    assert (vec.keep == ref.keep).mean() >= 0.99
    # Same optimum, so the posteriors agree to float32 output precision, and so do the parameters.
    assert np.abs(vec.clean_prob - ref.clean_prob).max() < 1e-4
    np.testing.assert_allclose(vec.means, ref.means, atol=1e-6)
    np.testing.assert_allclose(vec.variances, ref.variances, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(vec.weights, ref.weights, atol=1e-6)
    np.testing.assert_array_equal(vec.class_counts, np.bincount(labels, minlength=C))
    np.testing.assert_array_equal(vec.kept_per_class, np.bincount(labels[vec.keep], minlength=C))
    # The selection is meaningful: most of what is kept has a low loss.
    assert np.median(losses[vec.keep]) < np.median(losses[~vec.keep])


def our_initial_split(v):
    """Size of the low cluster of the 2-means partition select_clean starts EM from (one class)."""
    x = torch.from_numpy(np.asarray(v, dtype=np.float64))
    pc, lo = gmm._Pieces.build(x, torch.zeros(x.numel(), dtype=torch.int64), 1)
    n = pc.counts.to(torch.float64)
    n1, _, _ = gmm._init_two_means(pc, n, pc.max(pc.X), torch.tensor([True]))
    return x.numel() - int(n1[0])


def test_initial_split_is_a_two_means_optimum():
    """On a clear two-mode class, the start is the globally optimal 2-means split (checked by sorting)."""
    rng = np.random.default_rng(5)
    v = np.concatenate([rng.gamma(2.0, 0.1, 700), rng.normal(3.0, 0.5, 300)])
    s = np.sort(v)
    k = np.arange(1, s.size)
    cs = np.cumsum(s)[:-1]
    best = int(k[np.argmax(cs**2 / k + (s.sum() - cs) ** 2 / (s.size - k))])
    assert our_initial_split(v) == best
    assert our_initial_split(v[::-1].copy()) == best  # independent of the sample order


def test_lineage_defaults_agree_with_sklearn(data):
    """max_iter=10, tol=1e-2: neither fit has converged in the strict sense, yet the decisions agree,
    because both start EM from the same 2-means partition and stop by the same rule."""
    from sklearn.cluster import KMeans

    losses, labels, C = data
    vec = select_clean(losses, labels, num_classes=C)
    ref = fit_reference_sklearn(losses, labels, num_classes=C)
    assert (vec.keep == ref.keep).mean() >= 0.99
    # Identical trajectories (same stopping step, same lower bound) on most classes ...
    same = (vec.n_iter == ref.n_iter) & np.isclose(vec.lower_bound, ref.lower_bound, rtol=1e-9, atol=1e-12,
                                                   equal_nan=True)
    assert same.mean() >= 0.85
    np.testing.assert_allclose(vec.means[same], ref.means[same], atol=1e-6)
    # ... and where they differ, scikit-learn's seeded KMeans started EM from another 2-means
    # partition (another Lloyd fixed point of a flat objective) than ours.
    x = (losses - losses.min()) / (losses.max() - losses.min())
    for c in np.flatnonzero(~same):
        xc = x[labels == c]
        km = KMeans(2, n_init=1, random_state=0).fit(xc[:, None])
        low = int(np.argmin(km.cluster_centers_[:, 0]))
        assert (km.labels_ == low).sum() != our_initial_split(xc), c


def test_class_stops_updating_once_within_tol(data):
    """Per-class convergence masks: a class that met tol keeps its parameters while others iterate."""
    losses, labels, C = data
    short = select_clean(losses, labels, num_classes=C, max_iter=10, tol=1e-2)
    long = select_clean(losses, labels, num_classes=C, max_iter=200, tol=1e-2)
    stopped = short.converged & (short.n_iter > 0)
    assert stopped.sum() >= C // 2 and len(set(short.n_iter[stopped])) > 1  # classes stop at different steps
    np.testing.assert_array_equal(long.n_iter[stopped], short.n_iter[stopped])
    np.testing.assert_array_equal(long.means[stopped], short.means[stopped])
    members = np.isin(labels, np.flatnonzero(stopped))
    np.testing.assert_array_equal(long.clean_prob[members], short.clean_prob[members])


def test_low_mean_component_is_component_zero_even_when_noise_dominates():
    rng = np.random.default_rng(3)
    # Class 0: 80 % noisy (high losses); class 1: 10 % noisy.
    l0 = np.concatenate([rng.normal(0.2, 0.05, 100), rng.normal(3.0, 0.3, 400)])
    l1 = np.concatenate([rng.normal(0.3, 0.05, 450), rng.normal(2.5, 0.3, 50)])
    losses, labels = np.abs(np.concatenate([l0, l1])), np.repeat([0, 1], 500)
    sel = select_clean(losses, labels, num_classes=2)
    assert (sel.means[:, 0] < sel.means[:, 1]).all()
    assert sel.weights[0, 0] == pytest.approx(0.2, abs=0.02)  # the clean minority is component 0
    assert sel.weights[1, 0] == pytest.approx(0.9, abs=0.02)
    assert sel.keep[:100].all() and not sel.keep[100:500].any()
    assert sel.clean_prob[losses < 0.5].min() > 0.99


def test_hand_computed_single_em_step():
    """x = [0, .2, .4, 1] (already in [0, 1]), reg_covar = 0.1, one EM iteration, by hand.

    2-means: splits {0}|{.2,.4,1}, {0,.2}|{.4,1}, {0,.2,.4}|{1} have s0^2/n0 + s1^2/n1 = 0.853,
    1.0, 1.12, so the partition is {0, .2, .4} | {1} (and .6, the midpoint of its means .2 and 1,
    reproduces it: a Lloyd fixed point).
    """
    x = np.array([0.0, 0.2, 0.4, 1.0])
    reg, eps10 = 0.1, 10 * np.finfo(float).eps

    def normal(v, m, s2):
        return np.exp(-((v - m) ** 2) / (2 * s2)) / np.sqrt(2 * math.pi * s2)

    # Initialisation from the hard partition (scikit-learn's _initialize: weights = nk / n).
    nk = np.array([3 + eps10, 1 + eps10])
    mu = np.array([0.6 / nk[0], 1.0 / nk[1]])
    var = np.array([((x[:3] - mu[0]) ** 2).sum() / nk[0] + reg, (1.0 - mu[1]) ** 2 / nk[1] + reg])
    w = nk / 4
    # E-step, M-step.
    p = w * normal(x[:, None], mu, var)
    r = p / p.sum(1, keepdims=True)
    nk = r.sum(0) + eps10
    mu = (r * x[:, None]).sum(0) / nk
    var = (r * (x[:, None] - mu) ** 2).sum(0) / nk + reg
    w = nk / nk.sum()
    # Final posterior of the low-mean component.
    p = w * normal(x[:, None], mu, var)
    post = p[:, 0] / p.sum(1)
    assert 0.05 < post[3] < 0.95  # a genuinely soft case, not 0/1

    sel = select_clean(x, np.zeros(4, dtype=int), num_classes=1, max_iter=1, reg_covar=reg, tau=0.5)
    np.testing.assert_allclose(sel.means[0], mu, rtol=1e-12)
    np.testing.assert_allclose(sel.variances[0], var, rtol=1e-12)
    np.testing.assert_allclose(sel.weights[0], w, rtol=1e-12)
    np.testing.assert_allclose(sel.clean_prob, post, rtol=1e-6)
    assert sel.n_iter[0] == 1 and not sel.converged[0]  # the first change is +inf: never converged at 1
    assert sel.keep.tolist() == list(post > 0.5)


# ---- edge cases ---------------------------------------------------------------------------------

def test_degenerate_classes():
    losses = np.array([0.1, 0.2, 2.0, 0.15, 3.0, 0.05,   # class 0: regular
                       0.7,                               # class 1: one sample
                       0.3, 0.9,                          # class 2: two distinct samples
                       0.4, 0.4, 0.4, 0.4])               # class 3: zero spread
    labels = np.array([0] * 6 + [1] + [2] * 2 + [3] * 4)
    sel = select_clean(losses, labels, num_classes=5)  # class 4: no sample
    ref = fit_reference_sklearn(losses, labels, num_classes=5)
    np.testing.assert_array_equal(sel.keep, ref.keep)
    np.testing.assert_allclose(sel.clean_prob, ref.clean_prob, atol=1e-6)
    assert sel.class_counts.tolist() == [6, 1, 2, 4, 0]
    x = (losses - losses.min()) / (losses.max() - losses.min())
    # one sample: kept, one component at its loss
    assert sel.clean_prob[6] == 1.0 and sel.keep[6]
    np.testing.assert_allclose(sel.means[1], [x[6], x[6]])
    np.testing.assert_array_equal(sel.weights[1], [1.0, 0.0])
    # two distinct samples: a regular fit, each its own component
    assert sel.n_iter[2] >= 1 and sel.keep[7] and not sel.keep[8]
    # zero spread: no NaN, variance = reg_covar, all kept
    assert (sel.clean_prob[9:] == 1.0).all() and sel.keep[9:].all()
    np.testing.assert_allclose(sel.variances[3], [5e-4, 5e-4])
    # empty class
    assert np.isnan(sel.means[4]).all() and (sel.weights[4] == 0).all() and sel.n_iter[4] == 0
    assert sel.converged.all()
    assert np.isfinite(sel.clean_prob).all() and np.isfinite(sel.means[:4]).all()


def test_zero_variance_class_among_regular_ones(data):
    losses, labels, C = data
    losses = np.concatenate([losses, np.full(50, 0.8)])
    labels = np.concatenate([labels, np.full(50, C)])
    sel = select_clean(losses, labels, num_classes=C + 1)
    assert (sel.clean_prob[-50:] == 1.0).all() and sel.n_iter[C] == 0
    # ... and it does not disturb the other classes.
    base = select_clean(losses[:-50], labels[:-50], num_classes=C)
    np.testing.assert_array_equal(sel.clean_prob[:-50], base.clean_prob)


def test_all_losses_equal_keeps_everything():
    sel = select_clean(np.full(10, 2.3), np.arange(10) % 3, num_classes=3)
    assert sel.keep.all() and sel.loss_min == sel.loss_max == 2.3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_loss_names_first_sample(bad):
    losses = np.linspace(0, 1, 20)
    losses[[13, 17]] = bad
    with pytest.raises(TurnctlError, match=r"sample 13\b"):
        select_clean(losses, np.zeros(20, dtype=int), num_classes=1)
    with pytest.raises(TurnctlError, match=r"sample 13\b"):
        balanced_subset(np.ones(20, bool), np.zeros(20, dtype=int), num_classes=1, losses=losses)


@pytest.mark.parametrize("label", [3, -1])
def test_label_out_of_range(label):
    labels = np.array([0, 1, 2, 0, 1, label, 2])
    with pytest.raises(DataError, match=r"sample 5\b"):
        select_clean(np.linspace(0, 1, 7), labels, num_classes=3)
    with pytest.raises(DataError, match=r"sample 5\b"):
        balanced_subset(np.ones(7, bool), labels, num_classes=3, losses=np.linspace(0, 1, 7))


def test_invalid_samples_are_excluded_from_normalisation_and_fit(data):
    losses, labels, C = data
    rng = np.random.default_rng(1)
    valid = rng.random(losses.size) > 0.1
    bad_losses = losses.copy()
    bad_losses[~valid] = np.where(rng.random((~valid).sum()) < 0.5, np.nan, 1e6)  # undecodable images
    bad_labels = labels.copy()
    bad_labels[np.flatnonzero(~valid)[:5]] = -1  # and nonsense labels: ignored too
    sel = select_clean(bad_losses, bad_labels, num_classes=C, valid=valid)
    sub = select_clean(losses[valid], labels[valid], num_classes=C)
    assert (sel.clean_prob[~valid] == 0).all() and not sel.keep[~valid].any()
    np.testing.assert_array_equal(sel.clean_prob[valid], sub.clean_prob)
    np.testing.assert_array_equal(sel.means, sub.means)
    assert sel.class_counts.sum() == valid.sum()
    ref = fit_reference_sklearn(bad_losses, bad_labels, num_classes=C, valid=valid)
    assert (ref.keep == sel.keep).mean() >= 0.99


def test_normalize_none_and_input_types(data):
    losses, labels, C = data
    x = (losses - losses.min()) / (losses.max() - losses.min())
    a = select_clean(x, labels, num_classes=C, normalize="none")
    b = select_clean(torch.from_numpy(losses).float().double(), torch.from_numpy(labels), num_classes=C,
                     device="cpu")
    np.testing.assert_allclose(a.clean_prob, b.clean_prob, atol=1e-6)
    assert (a.loss_min, a.loss_max) == (0.0, 1.0)
    assert b.clean_prob.dtype == np.float32 and b.keep.dtype == bool and b.n_iter.dtype == np.int64
    np.testing.assert_array_equal(b.keep, b.clean_prob > b.tau)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=1.5), "tau"), (dict(max_iter=0), "max_iter"), (dict(tol=0.0), "tol"),
    (dict(reg_covar=0.0), "reg_covar"), (dict(normalize="zscore"), "normalize"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_options(kwargs, match):
    kw = dict(num_classes=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_clean([0.1, 0.2, 0.3], [0, 1, 1], **kw)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="labels"):
        select_clean([0.1, 0.2, 0.3], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="1-D"):
        select_clean(np.zeros((3, 2)), [0, 1, 1], num_classes=2)
    with pytest.raises(ValueError, match="integers"):
        select_clean([0.1, 0.2, 0.3], [0.0, 1.0, 1.7], num_classes=2)


def test_internal_fast_paths_do_not_change_results(data, monkeypatch):
    """Working-set compaction, the derived component-1 sums and the row length are optimisations only."""
    losses, labels, C = data
    base = select_clean(losses, labels, num_classes=C, max_iter=50, tol=1e-4)
    monkeypatch.setattr(gmm, "_COMPACT_BELOW", 0.0)  # never compact
    monkeypatch.setattr(gmm, "_THIN", 2.0)  # every class sums component 1 directly
    slow = select_clean(losses, labels, num_classes=C, max_iter=50, tol=1e-4)
    np.testing.assert_array_equal(slow.n_iter, base.n_iter)
    np.testing.assert_allclose(slow.clean_prob, base.clean_prob, atol=1e-6)
    np.testing.assert_allclose(slow.means, base.means, rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(gmm, "_COMPACT_BELOW", 1.01)  # compact after every iteration
    eager = select_clean(losses, labels, num_classes=C, max_iter=50, tol=1e-4)
    np.testing.assert_array_equal(eager.clean_prob, slow.clean_prob)
    monkeypatch.setattr(gmm, "_ROW_MAX", 8)  # another row layout: more rows, other padding
    short_rows = select_clean(losses, labels, num_classes=C, max_iter=50, tol=1e-4)
    np.testing.assert_array_equal(short_rows.n_iter, base.n_iter)
    np.testing.assert_allclose(short_rows.clean_prob, base.clean_prob, atol=1e-6)
    np.testing.assert_allclose(short_rows.means, base.means, rtol=1e-9, atol=1e-12)


# ---- balanced subset ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selection(data):
    losses, labels, C = data
    return select_clean(losses, labels, num_classes=C)


def test_balanced_subset_is_balanced_and_drawn_from_kept(data, selection):
    losses, labels, C = data
    sub = balanced_subset(selection.keep, labels, num_classes=C, losses=losses, seed=0)
    fb = list(sub.fallback_classes)
    regular = np.setdiff1d(np.arange(C), fb)
    kept = np.bincount(labels[selection.keep], minlength=C)
    assert sub.n_per_class == sub.available_per_class.min() > 0
    assert (sub.per_class[regular] == sub.n_per_class).all()
    assert (sub.per_class == sub.n_per_class).all()  # fallback classes too
    in_regular = np.isin(labels[sub.indices], regular)
    assert selection.keep[sub.indices[in_regular]].all()  # uniform draws from the kept samples only
    np.testing.assert_array_equal(sub.indices, np.flatnonzero(sub.selected))
    assert sub.indices.dtype == np.int64 and (np.diff(sub.indices) > 0).all()
    assert all(kept[c] < 2 for c in fb)


def test_balanced_subset_seeding(data, selection):
    losses, labels, C = data
    a = balanced_subset(selection.keep, labels, num_classes=C, losses=losses, seed=7)
    b = balanced_subset(selection.keep, labels, num_classes=C, losses=losses, seed=7)
    c = balanced_subset(selection.keep, labels, num_classes=C, losses=losses, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    np.testing.assert_array_equal(a.per_class, c.per_class)


def test_balanced_subset_fallback_and_empty_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], [30, 30, 20, 5])   # class 4: no sample
    losses = rng.random(labels.size)
    keep = np.zeros(labels.size, bool)
    keep[:25] = True         # class 0 keeps 25
    keep[30:42] = True       # class 1 keeps 12
    keep[60] = True          # class 2 keeps 1 -> fallback to its 8 lowest losses
    # class 3 keeps 0 -> fallback: only 5 samples, all of them
    sub = balanced_subset(keep, labels, num_classes=5, losses=losses, fallback_k=8, seed=1)
    assert sub.fallback_classes == (2, 3) and sub.empty_classes == (4,)
    assert sub.available_per_class.tolist() == [25, 12, 8, 5, 0]
    assert sub.n_per_class == 5 and sub.per_class.tolist() == [5, 5, 5, 5, 0]
    cls2 = np.flatnonzero(labels == 2)
    lowest8 = cls2[np.argsort(losses[cls2], kind="stable")[:8]]
    assert set(sub.indices[labels[sub.indices] == 2]) <= set(lowest8)
    assert set(sub.indices[labels[sub.indices] == 3]) == set(np.flatnonzero(labels == 3))


def test_balanced_subset_never_selects_invalid_samples():
    labels = np.repeat([0, 1], 10)
    losses = np.linspace(0, 1, 20)
    valid = np.ones(20, bool)
    valid[[10, 11]] = False  # the two lowest losses of class 1: undecodable
    losses[[10, 11]] = np.nan
    keep = np.zeros(20, bool)
    keep[:6] = True
    sub = balanced_subset(keep, labels, num_classes=2, losses=losses, fallback_k=3, valid=valid)
    assert sub.fallback_classes == (1,)
    assert set(sub.indices[sub.indices >= 10]) == {12, 13, 14}


def test_balanced_subset_draws_uniformly():
    """Each kept sample of a class is drawn with probability N / |kept_c| (4/10 here)."""
    labels = np.repeat([0, 1], [10, 4])
    keep = np.ones(14, bool)
    losses = np.zeros(14)
    counts = np.zeros(14)
    runs = 2000
    for seed in range(runs):
        counts[balanced_subset(keep, labels, num_classes=2, losses=losses, seed=seed).indices] += 1
    freq = counts[:10] / runs
    assert np.abs(freq - 0.4).max() < 0.05  # 4.5 standard deviations
    assert (counts[10:] == runs).all()


def test_balanced_subset_bad_arguments():
    with pytest.raises(ValueError, match="fallback_k"):
        balanced_subset([True], [0], num_classes=1, losses=[0.0], fallback_k=0)
    with pytest.raises(ValueError, match="keep"):
        balanced_subset([True, False], [0], num_classes=1, losses=[0.0])
