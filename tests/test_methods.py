"""DivideMix-LP, UNICON-LP, NMTune, FFT-GCE/ELR: every score and loss against values computed
independently (numpy, scipy, scikit-learn, by hand), then every method on two CPU ranks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import check, cpu_env, deepspeed_cmd, last_json, run
from turnctl.errors import RecipeError
from turnctl.losses import ELRTargets
from turnctl.methods.common import FeatureViews, linear_rampup, sharpen, uniform_prior_penalty
from turnctl.methods.dividemix import clean_posterior, co_divide, minmax
from turnctl.methods.fft_losses import SyncedELR, elr_apply_updates, gce_hook
from turnctl.methods.nmtune import (
    NMTuneModel, covariance_regulariser, fold_head, mse_regulariser, nmtune_loss, spectrum_term,
)
from turnctl.methods.unicon import jsd_to_labels, nt_xent, uniform_selection
from turnctl.recipe import NMTuneSection, load_recipe


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- FFT-GCE hook ----------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["literal", "surrogate"])
def test_gce_hook_gives_per_sample_values(form):
    z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = np.array([1, 0])
    q = 0.7
    p_y = np_softmax(z)[np.arange(2), y]
    ref = (1 - p_y ** q) / q if form == "literal" else q * p_y ** q * -np.log(p_y)
    got = gce_hook(q=q, form=form)(torch.tensor(z, dtype=torch.float32), torch.tensor(y), {"idx": torch.tensor([5, 6])})
    assert got.shape == (2,)  # FineTuner.train_epoch averages what the hook returns
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


# ---- ELR under the multi-rank sync ----------------------------------------------------------

def np_elr_rows(table, logits, idx, beta):
    p = np.clip(np_softmax(logits), 1e-4, 1 - 1e-4)
    p = p / p.sum(1, keepdims=True)
    return beta * table[idx] + (1 - beta) * p, p


def test_elr_targets_stay_identical_across_two_simulated_ranks():
    beta, lam, n, c = 0.7, 3.0, 6, 3
    rng = np.random.default_rng(0)
    # two steps; sample 2 is on rank 0 at step 0 and on rank 1 at step 1: its second visit must see
    # the first (rank 0's) update, as in one process
    steps = [
        [(np.array([0, 2]), np.array([0, 1])), (np.array([4, 5]), np.array([2, 2]))],
        [(np.array([1, 3]), np.array([1, 0])), (np.array([2, 0]), np.array([0, 2]))],
    ]
    ranks = [SyncedELR(n, c, beta=beta, lam=lam), SyncedELR(n, c, beta=beta, lam=lam)]
    ref = np.zeros((n, c))  # what one table sees: the updates of every rank, in rank order
    for step in steps:
        logits = [rng.normal(size=(2, c)) for _ in step]
        gathered, ref_losses = [], []
        for (idx, y), z in zip(step, logits):
            rows, p = np_elr_rows(ref, z, idx, beta)
            ce = -np.log(np_softmax(z)[np.arange(2), y])
            pc = np.clip(np_softmax(z), 1e-4, 1 - 1e-4)
            ref_losses.append(ce + lam * np.log(1 - (rows * pc).sum(1)))
            gathered.append(torch.tensor(np.concatenate([idx[:, None], p], 1), dtype=torch.float64))
        for r, ((idx, y), z) in enumerate(zip(step, logits)):
            def fake_gather(mine, r=r):
                torch.testing.assert_close(mine, gathered[r], rtol=1e-6, atol=1e-7)  # what rank r sends
                return gathered
            ranks[r].gather = fake_gather
            got = ranks[r](torch.tensor(z, dtype=torch.float32), torch.tensor(y), {"idx": torch.tensor(idx)})
            np.testing.assert_allclose(got.numpy(), ref_losses[r], rtol=1e-5)
        for (idx, _), g in zip(step, gathered):
            ref[idx] = beta * ref[idx] + (1 - beta) * g[:, 1:].numpy()
        assert ranks[0].digest() == ranks[1].digest()
        np.testing.assert_allclose(ranks[0].targets.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert ranks[0].targets[2].sum() > 0 and np.allclose(ranks[0].targets[2].sum(), 1 - beta ** 2, rtol=1e-5)


def test_elr_sync_with_one_rank_equals_elr_targets():
    torch.manual_seed(0)
    a, b = SyncedELR(5, 4, beta=0.9, lam=7.0), ELRTargets(5, 4, beta=0.9, lam=7.0)
    for idx in ([0, 3, 1], [3, 4, 3]):  # a repeated idx inside one batch: the last row wins in both
        z = torch.randn(3, 4, requires_grad=True)
        y = torch.tensor([1, 2, 0])
        got = a(z, y, {"idx": torch.tensor(idx)})
        ref = b(z, y, torch.tensor(idx), reduction="none")
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(a.targets, b.targets)
        (g1,) = torch.autograd.grad(got.mean(), z, retain_graph=True)
        (g2,) = torch.autograd.grad(ref.mean(), z)
        torch.testing.assert_close(g1, g2)  # the gradient flows through p only, in both


def test_elr_apply_updates_by_hand_and_checkpoint_round_trip(tmp_path):
    t = torch.zeros(2, 2)
    elr_apply_updates(t, [(torch.tensor([1]), torch.tensor([[0.2, 0.8]])),
                          (torch.tensor([1]), torch.tensor([[1.0, 0.0]]))], beta=0.5)
    # 0.5 * (0.5 * 0 + 0.5 * (0.2, 0.8)) + 0.5 * (1, 0) = (0.55, 0.2)
    np.testing.assert_allclose(t[1].numpy(), [0.55, 0.2], rtol=1e-6)
    assert t[0].tolist() == [0.0, 0.0]
    elr = SyncedELR(2, 2, beta=0.5, lam=1.0)
    elr.targets = t.clone()
    elr.save(tmp_path / "epoch_0003")
    other = SyncedELR(2, 2, beta=0.5, lam=1.0)
    other.load(tmp_path / "epoch_0003")
    assert other.digest() == elr.digest()
    with pytest.raises(Exception, match="missing"):
        other.load(tmp_path / "epoch_0004")


# ---- UNICON: JSD, uniform selection, contrastive loss ---------------------------------------

def test_jsd_by_hand_and_against_scipy():
    from scipy.spatial.distance import jensenshannon

    # Natural logarithms, as UNICON's code (its JSD lies in [0, ln 2]).
    # p = (1/2, 1/2), y = 0: m = (3/4, 1/4); KL(p||m) = (ln(2/3) + ln 2) / 2; KL(q||m) = ln(4/3)
    hand = 0.5 * (0.5 * np.log(2 / 3) + 0.5 * np.log(2)) + 0.5 * np.log(4 / 3)
    got = jsd_to_labels(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    assert float(got[0]) == pytest.approx(hand, rel=1e-5)
    p = np_softmax(np.random.default_rng(1).normal(size=(6, 4)) * 2)
    y = np.array([0, 1, 2, 3, 0, 2])
    ref = [jensenshannon(p[i], np.eye(4)[y[i]]) ** 2 for i in range(6)]  # scipy's default base: e
    np.testing.assert_allclose(jsd_to_labels(torch.tensor(p), torch.tensor(y)).numpy(), ref, rtol=1e-5, atol=1e-7)


def test_uniform_selection_by_hand():
    jsd = torch.tensor([0.10, 0.60, 0.20, 0.90, 0.30, 0.05, 0.70, 0.15, 0.55])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    s = uniform_selection(jsd, y, num_classes=3, d_u=None)
    # mean = 3.55 / 9 = 0.3944: 5 of 9 below it, SR = 5/9, per class int(5/9 * 9 / 3) = 1
    assert s.threshold == pytest.approx(3.55 / 9, rel=1e-6)
    assert s.selection_rate == pytest.approx(5 / 9) and s.per_class == 1
    assert s.labeled.tolist() == [0, 5, 7]  # the lowest JSD of each class
    assert s.weights.tolist() == [1.0, 1.0, 1.0]  # all below 0.5: weight 1
    assert s.unlabeled.tolist() == [1, 2, 3, 4, 6, 8]

    # d_u: the mean 0.7875 > 0.7 is lowered by (mean - min) / 5 = 0.0375 -> 0.75; 2 of 4 below it,
    # per class int(2/4 * 4 / 2) = 1; a weight 1 - d where d >= 0.5
    s = uniform_selection(torch.tensor([0.6, 0.95, 0.9, 0.7]), torch.tensor([0, 0, 1, 1]), num_classes=2,
                          d_u=0.7, filter_coefficient=5.0)
    assert s.threshold == pytest.approx(0.75, rel=1e-5)
    assert s.labeled.tolist() == [0, 3]
    np.testing.assert_allclose(s.weights.numpy(), [0.4, 0.3], rtol=1e-5)

    # mean 1.55 / 5 = 0.31: 4 of 5 below, per class int(0.8 * 5 / 2) = 2; class 1 has one sample and
    # keeps it (a class smaller than the per-class count keeps all its samples)
    s = uniform_selection(torch.tensor([0.1, 0.2, 0.3, 0.9, 0.05]), torch.tensor([0, 0, 0, 0, 1]),
                          num_classes=2, d_u=None)
    assert s.per_class == 2
    assert s.labeled.tolist() == [0, 1, 4]


def test_nt_xent_against_numpy():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    t = 0.05
    sim = z @ z.T / t
    losses = []
    for i in range(6):
        pos = (i + 3) % 6
        others = [k for k in range(6) if k != i]
        losses.append(-(sim[i, pos] - np.log(np.exp(sim[i, others]).sum())))
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=t)
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-4)


# ---- DivideMix: normalisation, global GMM, co-division --------------------------------------

def test_dividemix_co_division_matches_sklearn_gmms():
    from sklearn.mixture import GaussianMixture

    loss_a = torch.tensor([0.10, 0.20, 0.15, 2.0, 2.2, 0.12, 1.9, 0.3])
    loss_b = torch.tensor([2.1, 0.10, 0.20, 0.25, 1.8, 2.3, 0.15, 0.12])
    norm = [minmax(loss_a), minmax(loss_b)]
    np.testing.assert_allclose(norm[0].numpy(), (loss_a.numpy() - 0.10) / 2.1, rtol=1e-6)
    ref = []
    for l in norm:
        x = l.double().numpy()[:, None]
        gmm = GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=0).fit(x)
        ref.append(gmm.predict_proba(x)[:, gmm.means_.argmin()])
        np.testing.assert_allclose(clean_posterior(l), ref[-1], atol=1e-4)
    d0, d1 = co_divide(norm, p_threshold=0.5)
    # head 0 trains on head 1's division (B's clean: 1, 2, 3, 6, 7) and head 1 on head 0's (0, 1, 2, 5, 7)
    assert d0.labeled.tolist() == np.flatnonzero(ref[1] > 0.5).tolist() == [1, 2, 3, 6, 7]
    assert d1.labeled.tolist() == np.flatnonzero(ref[0] > 0.5).tolist() == [0, 1, 2, 5, 7]
    np.testing.assert_allclose(d0.weights.numpy(), ref[1][[1, 2, 3, 6, 7]], atol=1e-4)
    assert d0.unlabeled.tolist() == [0, 4, 5] and not d0.fallback


def test_mixmatch_pieces_by_hand():
    # sharpen (0.2, 0.8) at T = 0.5: (0.04, 0.64) / 0.68
    np.testing.assert_allclose(sharpen(torch.tensor([[0.2, 0.8]]), 0.5).numpy(), [[0.04 / 0.68, 0.64 / 0.68]],
                               rtol=1e-6)
    # KL(uniform || mean prediction): predictions (1, 0) and (1/2, 1/2) average to (3/4, 1/4)
    logits = torch.log(torch.tensor([[1.0 - 1e-12, 1e-12], [0.5, 0.5]]))
    hand = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert float(uniform_prior_penalty(logits)) == pytest.approx(hand, rel=1e-5)
    assert linear_rampup(4.0, warmup=5, length=16, weight=25) == 0.0
    assert linear_rampup(13.0, warmup=5, length=16, weight=25) == 12.5
    assert linear_rampup(40.0, warmup=5, length=16, weight=25) == 25.0


def test_feature_views_are_seeded_and_scaled_per_dimension():
    train = torch.tensor([[0.0, 0.0], [2.0, 20.0]])  # std (sqrt 2, 10 sqrt 2)
    v = FeatureViews(train, dropout=0.0, noise=1.0)
    a = v(torch.zeros(20000, 2), generator=torch.Generator().manual_seed(3))
    b = v(torch.zeros(20000, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    np.testing.assert_allclose(a.std(0).numpy(), [np.sqrt(2), 10 * np.sqrt(2)], rtol=0.03)


# ---- NMTune's regularisers on a fixed matrix ---------------------------------------------------

Z = np.array([[1.0, 2.0, 0.0, -1.0, 0.5, 3.0], [0.5, -1.0, 2.0, 0.0, 1.0, 1.0],
              [2.0, 0.0, -1.0, 1.0, -0.5, 0.0], [-1.0, 1.0, 1.0, 2.0, 0.0, -2.0],
              [0.0, 0.5, 0.5, -1.5, 2.0, 1.0], [1.5, -0.5, 0.0, 0.5, -1.0, 0.5],
              [0.3, 0.2, -2.0, 1.0, 1.0, -1.0], [-0.5, 1.5, 1.0, 0.0, 0.0, 2.0]])
FEAT = Z[::-1].copy() * 0.5 + 0.25


def test_nmtune_regularisers_against_numpy():
    z, f = torch.tensor(Z, dtype=torch.float32), torch.tensor(FEAT, dtype=torch.float32)
    zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    fn = FEAT / np.linalg.norm(FEAT, axis=1, keepdims=True)
    mse = np.mean((zn - fn) ** 2)
    cov = np.cov(Z, rowvar=False)  # ddof 1
    off = (cov ** 2).sum() - (np.diag(cov) ** 2).sum()
    cov_term = off / 6
    s = np.linalg.svd(Z, compute_uv=False)
    svd_term = np.mean(s[:5] / s.sum())
    assert float(mse_regulariser(z, f)) == pytest.approx(mse, rel=1e-5)
    assert float(covariance_regulariser(z)) == pytest.approx(cov_term, rel=1e-5)
    assert float(spectrum_term(z, top_k=5)) == pytest.approx(svd_term, rel=1e-5)
    logits = torch.tensor(Z[:, :3], dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ce = np.mean(-np.log(np_softmax(Z[:, :3])[np.arange(8), y.numpy()]))
    loss, parts = nmtune_loss(logits, y, z, f, config=NMTuneSection())
    assert float(loss) == pytest.approx(ce + 1.0 * mse + 0.04 * cov_term - 0.001 * svd_term, rel=1e-5)
    assert parts["svd"] == pytest.approx(svd_term, rel=1e-5)


def test_nmtune_fold_is_the_ridge_least_squares_composition():
    torch.manual_seed(0)
    m = NMTuneModel(4, 3).eval()
    f = torch.randn(40, 4)
    with torch.no_grad():
        z = m.tune(f).double().numpy()
    x = np.concatenate([f.double().numpy(), np.ones((40, 1))], 1)
    G = x.T @ x
    lam = 1e-3 * np.mean(np.diag(G)[:4])
    A = np.linalg.solve(G + np.diag([lam] * 4 + [0.0]), x.T @ z)
    W, b = m.head.weight.detach().double().numpy(), m.head.bias.detach().double().numpy()
    h, ridge = fold_head(m, f, ridge=1e-3)
    assert ridge == 1e-3
    np.testing.assert_allclose(h["weight"].numpy(), W @ A[:4].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(h["bias"].numpy(), W @ A[4] + b, rtol=1e-4, atol=1e-6)

    # several ridges: the one whose fold agrees best with the model on the held-out features wins
    held = torch.randn(30, 4) * 3
    target = m(held)[0].argmax(1)
    agree = {}
    for r in (1e-4, 1e-1, 10.0):
        one, _ = fold_head(m, f, ridge=r)
        agree[r] = float(((held @ one["weight"].t() + one["bias"]).argmax(1) == target).float().mean())
    _, chosen = fold_head(m, f, ridge=(1e-4, 1e-1, 10.0), select_on=held)
    assert agree[chosen] == max(agree.values())


# ---- recipe sections ---------------------------------------------------------------------------

def test_method_sections_default_to_the_papers_constants_and_forbid_typos():
    r = load_recipe("tiny")
    assert (r.dividemix.p_threshold, r.dividemix.temperature, r.dividemix.alpha) == (0.5, 0.5, 4.0)
    assert (r.dividemix.gmm_max_iter, r.dividemix.gmm_tol, r.dividemix.gmm_reg_covar) == (10, 1e-2, 5e-4)
    assert (r.unicon.lambda_c, r.unicon.contrastive_temperature) == (0.025, 0.05)
    n = r.nmtune
    assert (n.epochs, n.batch_size, n.lr, n.weight_decay, n.schedule) == (30, 64, 1e-3, 1e-4, "cosine")
    assert (n.mse_weight, n.cov_weight, n.svd_weight, n.svd_top_k, n.hidden_mult) == (1.0, 0.04, 1e-3, 5, 4)
    with pytest.raises(RecipeError, match=r"unknown key 'nmtune.epoch' \(did you mean 'nmtune.epochs'\?\)"):
        load_recipe("tiny", ["nmtune.epoch=2"])
    with pytest.raises(RecipeError, match="dividemix.p_threshold"):
        load_recipe("tiny", ["dividemix.p_threshold=1.5"])


# ---- every method on two ranks -------------------------------------------------------------------

NUM_CLASSES = 4
METHODS = ["lp-dividemix", "lp-unicon", "nmtune", "fft-gce", "fft-elr", "turn-nmtune"]
FAST = ["--set", "data.num_workers=0", "--set", "probe.epochs=2", "--set", "dividemix.warmup_epochs=1",
        "--set", "unicon.warmup_epochs=1", "--set", "nmtune.epochs=2", "--set", "finetune.baseline_epochs=2",
        "--set", "finetune.epochs=1"]


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    from shardgen import write_run_shards

    return write_run_shards(tmp_path_factory.mktemp("methods") / "toy")


def _lines(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multirank
def test_every_method_on_two_ranks_then_elr_resume_is_exact(toy_shards, tmp_path):
    out = tmp_path / "cmp"
    res = check(run(deepspeed_cmd(["compare", "--recipe", "tiny", "--shards", str(toy_shards), "--out", str(out),
                                   "--methods", ",".join(METHODS), "--json", *FAST], module=True), timeout=420))
    comparison = last_json(res.stdout)
    for m in METHODS:
        row = comparison["table"][m]
        assert 0.0 <= row["best"]["mean"] <= 1.0 and 0.0 <= row["last"]["mean"] <= 1.0, m
    runs = {r["method"]: Path(r["run_dir"]) for r in comparison["runs"]}
    for m in ("lp-dividemix", "lp-unicon"):
        lines = _lines(runs[m])
        assert [(l["phase"], l["epoch"], l["stage"]) for l in lines] == [("lp", 1, "warmup"), ("lp", 2, "ssl")]
        assert lines[1]["head0_labeled"] > 0 and "head1_labeled_purity" in lines[1]
        heads = torch.load(runs[m] / "method_state.pt")["heads"]
        assert len(heads) == 2 and heads[0]["weight"].shape == heads[1]["weight"].shape
    nm = _lines(runs["nmtune"])
    assert [l["phase"] for l in nm] == ["nmtune", "nmtune"] and all("test_acc" in l for l in nm)
    assert comparison["table"]["nmtune"]["last"]["mean"] == pytest.approx(nm[-1]["test_acc"])
    assert set(torch.load(runs["nmtune"] / "method_state.pt")["nmtune"]["state_dict"]) >= {"scale", "head.weight"}
    for m in ("fft-gce", "fft-elr"):
        assert [(l["phase"], l["epoch"]) for l in _lines(runs[m])] == [("fft", 0), ("fft", 1)]
        assert (runs[m] / "final" / "model.safetensors").is_file()
    tn = _lines(runs["turn-nmtune"])
    assert [l["phase"] for l in tn] == ["nmtune", "nmtune", "fft"] and tn[-1]["selected"] > 0
    assert (runs["turn-nmtune"] / "selection" / "epoch_0.npz").is_file()
    assert comparison["runs"][METHODS.index("turn-nmtune")]["selection"]["selected"] == tn[-1]["selected"]

    # fft-elr: SIGTERM inside epoch 1 (rank 0, micro-step 5 of 14: stops after 6), resume mid-epoch;
    # the ELR table (updated batch by batch) and the losses equal the uninterrupted run's.
    full = runs["fft-elr"]
    part = tmp_path / "part"
    args = ["train", "--recipe", "tiny", "--method", "fft-elr", "--shards", str(toy_shards), "--out", str(part),
            "--json", *FAST]
    cmd = deepspeed_cmd(args)
    cmd[cmd.index("turnctl")] = str(Path(__file__).parent / "scripts" / "fault_inject.py")
    stopped = run(cmd, env=cpu_env({"TURNCTL_TEST_FAULT": "TERM:0:1:5"}), timeout=240)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert (part / "checkpoints" / "latest").read_text() == "epoch_0001_step_000006"
    assert (part / "checkpoints" / "epoch_0001_step_000006" / "elr_targets.pt").is_file()
    check(run(deepspeed_cmd(args + ["--resume"]), timeout=240))
    a = torch.load(full / "checkpoints" / "epoch_0001" / "elr_targets.pt")["targets"]
    b = torch.load(part / "checkpoints" / "epoch_0001" / "elr_targets.pt")["targets"]
    assert torch.equal(a, b) and (a.sum(1) > 0).sum() > 0
    assert [l["train_loss"] for l in _lines(full)] == pytest.approx([l["train_loss"] for l in _lines(part)], rel=1e-6)
