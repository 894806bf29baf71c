"""CE, GCE (literal and surrogate) and ELR against values computed independently with numpy."""

import numpy as np
import pytest
import torch

from turnctl.losses import (
    ELRTargets,
    cross_entropy,
    elr_regulariser,
    gce_loss,
    per_sample_ce,
)

LOGITS = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 2.0, -3.0]])
Y = np.array([2, 0, 1])


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64 if grad else torch.float32, requires_grad=grad)


def test_cross_entropy_matches_hand_value():
    # first row by hand: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2)
    assert float(per_sample_ce(t(LOGITS[:1]), torch.tensor([2]))) == pytest.approx(
        np.log(1 + np.exp(-1) + np.exp(-2)), rel=1e-6)
    ref = -np.log(np_softmax(LOGITS)[np.arange(3), Y])
    y = torch.tensor(Y)
    np.testing.assert_allclose(per_sample_ce(t(LOGITS), y).numpy(), ref, rtol=1e-6)
    assert float(cross_entropy(t(LOGITS), y)) == pytest.approx(ref.mean(), rel=1e-6)
    assert float(cross_entropy(t(LOGITS), y, reduction="sum")) == pytest.approx(ref.sum(), rel=1e-6)
    np.testing.assert_allclose(cross_entropy(t(LOGITS), y, reduction="none").numpy(), ref, rtol=1e-6)


def test_ce_computes_in_float32_for_half_logits():
    out = per_sample_ce(torch.tensor(LOGITS, dtype=torch.bfloat16), torch.tensor(Y))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("q", [0.7, 0.3, 1.0])
def test_gce_literal_value(q):
    p_y = np_softmax(LOGITS)[np.arange(3), Y]
    ref = (1 - p_y ** q) / q
    got = gce_loss(t(LOGITS), torch.tensor(Y), q=q, reduction="none").numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(gce_loss(t(LOGITS), torch.tensor(Y), q=q)) == pytest.approx(ref.mean(), rel=1e-5)


def test_gce_literal_by_hand_two_classes():
    # logits (0, 0): p_y = 1/2; q = 0.5 -> (1 - sqrt(1/2)) / 0.5 = 2 - sqrt(2)
    assert float(gce_loss(torch.zeros(1, 2), torch.tensor([1]), q=0.5)) == pytest.approx(2 - np.sqrt(2), rel=1e-6)


def test_gce_literal_accurate_when_confident():
    # 1 - p_y ~ 3.4e-4: the loss must stay positive and accurate (expm1 of q log p_y)
    logits = torch.tensor([[12.0, 0.0, 4.0]])
    p_y = np_softmax(np.array([[12.0, 0.0, 4.0]], dtype=np.float64))[0, 0]
    ref = -np.expm1(0.7 * np.log(p_y)) / 0.7
    got = float(gce_loss(logits, torch.tensor([0]), q=0.7))
    assert got > 0 and got == pytest.approx(ref, rel=1e-3)


def test_gce_surrogate_value_is_q_weighted_ce():
    q = 0.7
    p_y = np_softmax(LOGITS)[np.arange(3), Y]
    ref = q * p_y ** q * -np.log(p_y)
    got = gce_loss(t(LOGITS), torch.tensor(Y), q=q, form="surrogate", reduction="none").numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("q", [0.7, 0.4])
def test_gce_surrogate_gradient_is_q_times_literal(q):
    y = torch.tensor(Y)
    z1, z2 = t(LOGITS, grad=True), t(LOGITS, grad=True)
    (g_lit,) = torch.autograd.grad(gce_loss(z1, y, q=q, form="literal"), z1)
    (g_sur,) = torch.autograd.grad(gce_loss(z2, y, q=q, form="surrogate"), z2)
    torch.testing.assert_close(g_sur, q * g_lit)
    # and the literal gradient is p_y^q (p - onehot) / B, by hand
    p = np_softmax(LOGITS)
    onehot = np.eye(3)[Y]
    ref = (p[np.arange(3), Y] ** q)[:, None] * (p - onehot) / 3
    np.testing.assert_allclose(g_lit.numpy(), ref, rtol=1e-6, atol=1e-12)
    # the values differ: the surrogate is not the GCE value
    with torch.no_grad():
        assert not np.isclose(float(gce_loss(z1, y, q=q)), float(gce_loss(z2, y, q=q, form="surrogate")))


def test_gce_rejects_bad_arguments():
    with pytest.raises(ValueError):
        gce_loss(torch.zeros(1, 2), torch.tensor([0]), q=0.0)
    with pytest.raises(ValueError):
        gce_loss(torch.zeros(1, 2), torch.tensor([0]), form="other")
    with pytest.raises(ValueError):
        gce_loss(torch.zeros(1, 2), torch.tensor([0]), reduction="avg")


def np_elr_step(targets, logits, y, idx, beta, lam):
    """ELR's reference arithmetic in numpy (float64): update, then CE + lam * log(1 - <t, p>)."""
    p = np.clip(np_softmax(logits), 1e-4, 1 - 1e-4)
    targets = targets.copy()
    targets[idx] = beta * targets[idx] + (1 - beta) * p / p.sum(axis=1, keepdims=True)
    ce = -np.log(np_softmax(logits)[np.arange(len(y)), y])
    reg = np.log(1 - (targets[idx] * p).sum(axis=1))
    return targets, ce.mean() + lam * reg.mean()


def test_elr_two_steps_against_numpy():
    beta, lam = 0.7, 3.0
    elr = ELRTargets(5, 3, beta=beta, lam=lam)
    ref_t = np.zeros((5, 3))
    idx = np.array([4, 1, 2])
    second = LOGITS[::-1].copy() * 0.5
    for logits in (LOGITS, second):
        ref_t, ref_loss = np_elr_step(ref_t, logits, Y, idx, beta, lam)
        got = float(elr(t(logits), torch.tensor(Y), torch.tensor(idx)))
        assert got == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(elr.targets.numpy(), ref_t, rtol=1e-5, atol=1e-7)
    # rows of samples not in the batch stay untouched
    assert elr.targets[0].abs().sum() == 0 and elr.targets[3].abs().sum() == 0


def test_elr_first_update_by_hand():
    # uniform logits: p = (1/2, 1/2); t = (1 - 0.5) * p = (0.25, 0.25); <t, p> = 0.25
    elr = ELRTargets(1, 2, beta=0.5, lam=2.0)
    loss = elr(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]))
    assert elr.targets[0].tolist() == [0.25, 0.25]
    assert float(loss) == pytest.approx(np.log(2) + 2.0 * np.log(0.75), rel=1e-6)


def test_elr_clamps_probabilities():
    # softmax ~ (1, 0): clamped to (1 - 1e-4, 1e-4) before normalising
    elr = ELRTargets(1, 2, beta=0.0, lam=1.0)
    elr.update(torch.tensor([[50.0, 0.0]]), torch.tensor([0]))
    np.testing.assert_allclose(elr.targets[0].numpy(), [1 - 1e-4, 1e-4], rtol=1e-5)


def test_elr_gradient_flows_through_p_only():
    beta, lam = 0.7, 3.0
    elr = ELRTargets(3, 3, beta=beta, lam=lam)
    elr.targets = torch.tensor(np_softmax(LOGITS[::-1].copy()), dtype=torch.float64)  # an earlier state
    z = t(LOGITS, grad=True)
    idx = torch.arange(3)
    loss = elr(z, torch.tensor(Y), idx)
    (g,) = torch.autograd.grad(loss, z)
    # by hand: d/dz_j log(1 - s) = -(u_j - p_j sum(u)) / (1 - s), u = t * p, s = sum(u); t held fixed
    p = np_softmax(LOGITS)
    tt = elr.targets.numpy()
    u = tt * p
    s = u.sum(1, keepdims=True)
    d_reg = -(u - p * u.sum(1, keepdims=True)) / (1 - s)
    d_ce = p - np.eye(3)[Y]
    # the loss computes in float32, hence the tolerance
    np.testing.assert_allclose(g.numpy(), (d_ce + lam * d_reg) / 3, rtol=1e-5, atol=1e-8)


def test_elr_regulariser_value():
    targets = torch.tensor([[0.2, 0.8]])
    p = np_softmax(np.array([[1.0, 0.0]]))[0]
    ref = np.log(1 - (0.2 * p[0] + 0.8 * p[1]))
    assert float(elr_regulariser(torch.tensor([[1.0, 0.0]]), targets)) == pytest.approx(ref, rel=1e-6)


def test_elr_state_dict_round_trip_and_shape_check():
    a = ELRTargets(4, 3, beta=0.9, lam=7.0)
    a(t(LOGITS), torch.tensor(Y), torch.tensor([0, 2, 3]))
    b = ELRTargets(4, 3, beta=0.1, lam=0.0)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.targets, a.targets)
    assert (b.beta, b.lam) == (0.9, 7.0)
    with pytest.raises(ValueError, match="another dataset"):
        ELRTargets(5, 3, beta=0.9, lam=7.0).load_state_dict(a.state_dict())

