"""lp-dividemix and lp-unicon against the ORIGINAL code's formulas and per-noise-level settings.

Every expected value is computed here by hand or with numpy from the formula the original code uses
(natural-log JSD, UNICON's threshold and unlabeled batch, DivideMix's loss window, the Clothing1M /
WebVision MixMatch variant, the warm-up confidence penalty), never by calling the code under test.
"""

import numpy as np
import pytest
import torch

import turnctl.methods.dividemix as dm
import turnctl.methods.unicon as uc
from turnctl.methods.common import Head, mixmatch_terms, ramp_position, warmup_epoch
from turnctl.recipe import DivideMixSection, ProbeSection, UniconSection, load_recipe

LN2 = float(np.log(2.0))


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_jsd(p, y, eps=1e-10):
    """UNICON's kl_divergence / Jensen_Shannon, written out in numpy (natural log)."""
    q = np.eye(p.shape[1])[y]
    m = (p + q) / 2
    kl = lambda a, b: (a * np.log((a + eps) / (b + eps))).sum(axis=1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def toy(n=240, c=4, d=8, seed=0, noise=0.3):
    g = np.random.default_rng(seed)
    y = np.arange(n) % c
    x = g.normal(size=(n, d)) + 3.0 * np.eye(d)[y]
    flip = g.random(n) < noise
    given = np.where(flip, g.integers(0, c, n), y)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(given), torch.tensor(y)


# ---- UNICON: JSD in natural log ------------------------------------------------------------------

def test_jsd_uses_the_natural_log_by_hand():
    # p = (1/2, 1/2), label 0: m = (3/4, 1/4); KL(p||m) = (ln(2/3) + ln 2) / 2, KL(q||m) = ln(4/3)
    hand = 0.5 * (0.5 * np.log(2 / 3) + 0.5 * np.log(2)) + 0.5 * np.log(4 / 3)
    assert hand == pytest.approx(0.2157616, abs=1e-7)  # base 2 would give 0.3112781
    got = uc.jsd_to_labels(torch.tensor([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0, 0]))
    np.testing.assert_allclose(got.numpy(), [hand, LN2, 0.0], atol=1e-6)  # a sure miss scores ln 2, not 1

    p = np_softmax(np.random.default_rng(3).normal(size=(50, 5)) * 3)
    y = np.random.default_rng(4).integers(0, 5, 50)
    got = uc.jsd_to_labels(torch.tensor(p), torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, np_jsd(p, y), rtol=1e-5, atol=1e-7)
    assert got.max() <= LN2 + 1e-6


# ---- UNICON: threshold with d_u and tau, uniform selection -----------------------------------------

def np_uniform_selection(d, y, num_classes, d_u, tau):
    thr = d.mean()
    if d_u is not None and thr > d_u:
        thr = thr - (thr - d.min()) / tau
    sr = (d < thr).sum() / d.size
    k = int(sr * d.size / num_classes)
    keep = np.zeros(d.size, bool)
    for c in range(num_classes):
        rows = np.flatnonzero(y == c)
        keep[rows[np.argsort(d[rows])[:k]]] = True
    labeled = np.flatnonzero(keep)
    w = np.where(d[labeled] < 0.5, 1.0, 1.0 - d[labeled])
    return thr, sr, k, labeled, w


def test_d_u_cut_never_fires_at_0_7_on_natural_log_jsd():
    # The heaviest noise possible: every prediction confidently wrong; JSD -> ln 2 < 0.7.
    p = np_softmax(np.random.default_rng(5).normal(size=(400, 10)) * 8)
    y = (p.argmax(1) + 1) % 10
    d = uc.jsd_to_labels(torch.tensor(p), torch.tensor(y))
    assert float(d.mean()) > 0.6
    assert uc.selection_threshold(d, d_u=0.7, filter_coefficient=5.0) == pytest.approx(float(d.double().mean()),
                                                                                        rel=1e-6)
    # with a d_u below the mean the cut fires: mean - (mean - min) / tau
    mean, lo = d.double().mean().item(), d.double().min().item()
    assert uc.selection_threshold(d, d_u=0.5, filter_coefficient=5.0) == pytest.approx(mean - (mean - lo) / 5,
                                                                                        rel=1e-6)


@pytest.mark.parametrize("d_u", [0.7, 0.3, None])
def test_uniform_selection_against_numpy(d_u):
    g = np.random.default_rng(6)
    p = np_softmax(g.normal(size=(300, 6)) * 2)
    y = g.integers(0, 6, 300)
    d = np_jsd(p, y).astype(np.float32)
    thr, sr, k, labeled, w = np_uniform_selection(d.astype(np.float64), y, 6, d_u, 5.0)
    s = uc.uniform_selection(torch.tensor(d), torch.tensor(y), num_classes=6, d_u=d_u, filter_coefficient=5.0)
    assert s.threshold == pytest.approx(thr, rel=1e-5)
    assert s.selection_rate == pytest.approx(sr) and s.per_class == k
    assert s.labeled.tolist() == labeled.tolist()
    np.testing.assert_allclose(s.weights.numpy(), w, rtol=1e-6)
    assert sorted(s.labeled.tolist() + s.unlabeled.tolist()) == list(range(300))
    if d_u == 0.3:  # the mean (> 0.3 here) was lowered
        assert thr < d.mean()


# ---- UNICON: the unlabeled batch -------------------------------------------------------------------

def test_unlabeled_batch_size_is_the_loaders_expression():
    # dataloader: batch_size = int(B / (2 * SR)); the authors' high-noise variant int(B / SR)
    assert uc.unlabeled_batch_size(64, 0.3, 2.0, 10**6) == int(64 / (2 * 0.3)) == 106
    assert uc.unlabeled_batch_size(128, 0.25, 2.0, 10**6) == 256
    assert uc.unlabeled_batch_size(128, 0.25, 1.0, 10**6) == 512
    assert uc.unlabeled_batch_size(128, 0.8, 2.0, 10**6) == 80  # SR > 1/2: smaller than B
    assert uc.unlabeled_batch_size(128, 0.25, None, 10**6) == 128  # Clothing1M/WebVision: B
    assert uc.unlabeled_batch_size(128, 0.01, 2.0, 3000) == 3000  # cut to the unlabeled set
    assert uc.unlabeled_batch_size(128, 0.5, 2.0, 0) == 0


@pytest.mark.parametrize("k", [2.0, 1.0])
def test_train_unicon_uses_int_b_over_k_sr_unlabeled_rows_and_drops_short_batches(monkeypatch, k):
    x, y, _ = toy()
    calls = []
    real = uc.unicon_step

    def spy(net, other, xv, y_onehot, w, uv, **kw):
        calls.append((xv[0].shape[0], uv[0].shape[0]))
        return real(net, other, xv, y_onehot, w, uv, **kw)

    monkeypatch.setattr(uc, "unicon_step", spy)
    B = 20  # the labeled sets here (144 rows) are not a multiple of it: the short batch is dropped
    res = uc.train_unicon(x, y, num_classes=4, seed=0, log_every_epoch=False,
                          probe=ProbeSection(epochs=2, optimizer="adamw", lr=0.05, batch_size=B),
                          config=UniconSection(warmup_epochs=1, unlabeled_batch_k=k))
    row = res.history[1]
    expected = []
    for h in (0, 1):
        sr, n_l = row[f"head{h}_selection_rate"], row[f"head{h}_labeled"]
        bu = min(int(B / (k * sr)), 240 - n_l)
        assert row[f"head{h}_unlabeled_batch"] == bu
        assert n_l % B
        expected += [(B, bu)] * (n_l // B)  # full labeled batches only (drop_last)
    assert calls == expected


def test_split_views_follows_the_scripts():
    a, b, c, d = (torch.full((1, 1), float(i)) for i in range(4))
    assert uc.split_views([a, b, c, d], "weak") == ([a, b], [c, d])  # CIFAR: guess on weak
    assert uc.split_views([a, b, c, d], "strong") == ([c, d], [a, b])  # Clothing1M/WebVision


# ---- MixMatch terms: the CIFAR form and the Clothing1M/WebVision form -------------------------------

def _fixed_head(dim, c):
    h = Head(dim, c, seed=0, optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.0, device=torch.device("cpu"))
    g = np.random.default_rng(7)
    w, b = g.normal(size=(c, dim)), g.normal(size=c)
    with torch.no_grad():
        h.W.copy_(torch.tensor(w)), h.b.copy_(torch.tensor(b))
    return h, w, b


@pytest.mark.parametrize("rows", ["all", "labeled"])
def test_mixmatch_terms_against_numpy(rows):
    g = np.random.default_rng(8)
    n_l, n_u, dim, c = 6, 4, 5, 3
    inputs = g.normal(size=(n_l + n_u, dim))
    targets = np_softmax(g.normal(size=(n_l + n_u, c)))
    head, w, b = _fixed_head(dim, c)
    terms = mixmatch_terms(head, torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32),
                           n_l, alpha=4.0, rows=rows, rng=np.random.default_rng(9),
                           generator=torch.Generator().manual_seed(10))
    lx, lu, pen = (float(t.detach()) for t in terms)
    lam = np.random.default_rng(9).beta(4.0, 4.0)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(n_l + n_u, generator=torch.Generator().manual_seed(10)).numpy()
    mx = lam * inputs + (1 - lam) * inputs[perm]
    mt = lam * targets + (1 - lam) * targets[perm]
    if rows == "labeled":  # only the labeled half is trained on; partners still from all rows
        mx, mt = mx[:n_l], mt[:n_l]
    z = mx @ w.T + b
    p = np_softmax(z)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert float(lx) == pytest.approx(-(mt[:n_l] * logp[:n_l]).sum(1).mean(), rel=1e-4)
    expected_lu = ((p[n_l:] - mt[n_l:]) ** 2).mean() if rows == "all" else 0.0
    assert float(lu) == pytest.approx(expected_lu, rel=1e-4, abs=1e-8)
    prior = np.full(c, 1.0 / c)
    assert float(pen) == pytest.approx((prior * np.log(prior / p.mean(0))).sum(), rel=1e-4, abs=1e-7)


def test_ramp_position_counts_like_the_original():
    # current = epoch + batch_idx / num_iter, num_iter = len(labeled) // B + 1
    assert ramp_position(30, 3, 1000, 64) == pytest.approx(30 + 3 / 16)
    assert ramp_position(5, 0, 10, 64) == 5.0


# ---- warm-up: confidence penalty and batch ---------------------------------------------------------

def test_warmup_penalty_is_negative_entropy_gradient_by_hand():
    g = np.random.default_rng(11)
    n, dim, c, lr = 8, 4, 3, 0.1
    x = g.normal(size=(n, dim))
    y = g.integers(0, c, n)
    for penalty in (False, True):
        head, w, b = _fixed_head(dim, c)
        warmup_epoch(head, torch.tensor(x, dtype=torch.float32), torch.tensor(y), batch_size=n,
                     generator=torch.Generator().manual_seed(0), lr_at=lambda f: lr, penalty=penalty)
        p = np_softmax(x @ w.T + b)
        grad = (p - np.eye(c)[y]) / n  # d CE / d logits
        if penalty:  # d/dz_j sum_c p_c ln p_c = p_j (ln p_j - sum_c p_c ln p_c)
            grad = grad + p * (np.log(p) - (p * np.log(p)).sum(1, keepdims=True)) / n
        np.testing.assert_allclose(head.W.detach().numpy(), w - lr * grad.T @ x, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(head.b.detach().numpy(), b - lr * grad.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("module, section", [(dm, DivideMixSection), (uc, UniconSection)])
def test_warmup_uses_factor_times_the_batch_and_the_penalty_switch(monkeypatch, module, section):
    x, y, _ = toy(n=120)
    seen = []
    monkeypatch.setattr(module, "warmup_epoch", lambda h, X, Y, **kw: seen.append(
        (kw["batch_size"], kw["penalty"])) or 0.0)
    train = dm.train_dividemix if module is dm else uc.train_unicon
    train(x, y, num_classes=4, seed=0, log_every_epoch=False,
          probe=ProbeSection(epochs=1, batch_size=16),
          config=section(warmup_epochs=1, warmup_batch_factor=4, warmup_penalty=True))
    assert seen == [(64, True), (64, True)]  # both heads, 4 x 16


# ---- DivideMix: the loss window (90% noise) ------------------------------------------------------

def test_dividemix_gmm_reads_the_mean_of_the_last_k_normalised_losses(monkeypatch):
    x, y, _ = toy(n=120)
    raw, fed = [], []
    real_losses, real_divide = dm.per_sample_losses, dm.co_divide
    monkeypatch.setattr(dm, "per_sample_losses", lambda h, X, Y: raw.append(real_losses(h, X, Y)) or raw[-1])
    monkeypatch.setattr(dm, "co_divide", lambda norm, **kw: fed.append([t.clone() for t in norm])
                        or real_divide(norm, **kw))
    dm.train_dividemix(x, y, num_classes=4, seed=0, log_every_epoch=False,
                       probe=ProbeSection(epochs=5, optimizer="adamw", lr=0.05, batch_size=32),
                       config=DivideMixSection(warmup_epochs=1, loss_window=3, p_threshold=0.6))
    assert len(fed) == 4 and len(raw) == 8  # 4 co-divided epochs, both heads each
    norm = [(l.numpy() - l.numpy().min()) / (l.numpy().max() - l.numpy().min()) for l in raw]
    for e in range(4):
        for k in (0, 1):
            window = [norm[2 * j + k] for j in range(max(0, e - 2), e + 1)]
            np.testing.assert_allclose(fed[e][k].numpy(), np.mean(window, axis=0), rtol=1e-5, atol=1e-6)


# ---- the per-noise-level values reach the methods through the recipes --------------------------------

@pytest.mark.parametrize("name", ["vit_b16", "vit_l16", "clip_b16", "mae_b16", "msn_b16"])
def test_cifar100_sym90_recipes_carry_the_90_percent_values(name):
    r = load_recipe(name)
    assert r.data.shards.endswith("cifar100-symmetric-0.9")
    d, u = r.dividemix, r.unicon
    assert (d.p_threshold, d.lambda_u, d.loss_window, d.alpha, d.temperature) == (0.6, 150.0, 5, 4.0, 0.5)
    assert (d.mixmatch_rows, d.warmup_penalty) == ("all", False)
    assert (u.lambda_u, u.d_u, u.filter_coefficient, u.unlabeled_batch_k) == (30.0, 0.7, 5.0, 1.0)


@pytest.mark.parametrize("name, penalty", [("clip_l14", False), ("convnext_t", False), ("resnet50", True)])
def test_webvision_and_clothing1m_recipes_carry_their_scripts_values(name, penalty):
    r = load_recipe(name)
    d, u = r.dividemix, r.unicon
    assert (d.alpha, d.lambda_u, d.mixmatch_rows, d.warmup_penalty) == (0.5, 0.0, "labeled", penalty)
    assert (u.alpha, u.mixmatch_rows, u.guess_views, u.unlabeled_batch_k) == (0.5, "labeled", "strong", None)
    assert (u.warmup_batch_factor, u.warmup_penalty) == (4, penalty)


def test_defaults_are_the_cifar_scripts_and_every_level_value_is_a_key():
    r = load_recipe("tiny")
    d, u = r.dividemix, r.unicon
    assert (d.p_threshold, d.lambda_u, d.loss_window, d.warmup_batch_factor) == (0.5, 25.0, 1, 2)
    assert (u.lambda_u, u.d_u, u.filter_coefficient, u.unlabeled_batch_k, u.warmup_batch_factor) == \
        (30.0, 0.7, 5.0, 2.0, 2)
    r = load_recipe("tiny", ["dividemix.lambda_u=50", "dividemix.p_threshold=0.6", "unicon.unlabeled_batch_k=null",
                             "unicon.guess_views=strong", "dividemix.mixmatch_rows=labeled"])
    assert (r.dividemix.lambda_u, r.dividemix.p_threshold, r.dividemix.mixmatch_rows) == (50.0, 0.6, "labeled")
    assert (r.unicon.unlabeled_batch_k, r.unicon.guess_views) == (None, "strong")
