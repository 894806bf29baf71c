"""Label-noise generators (turnctl.prepare.noise): rates, rules, reproducibility, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest

from turnctl.errors import TurnctlError
from turnctl.prepare import noise as nz


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("convention,C,expected", [("include", 10, 0.6 * 0.9), ("exclude", 10, 0.6),
                                                    ("include", 100, 0.9 * 0.99), ("exclude", 100, 0.9)])
def test_symmetric_rates_follow_the_convention(convention, C, expected):
    rate = 0.6 if C == 10 else 0.9
    y = np.repeat(np.arange(C), 20000 // C)
    noisy = nz.symmetric(y, rate=rate, num_classes=C, rng=rng(), convention=convention)
    # exactly round(r*N) samples are redrawn; "include" lets 1/C of them land on the true class
    assert abs(nz.realised_rate(y, noisy) - expected) < 0.01
    assert nz.expected_rate(nz.parse_spec(f"symmetric:{rate}:{convention}"), num_classes=C) == pytest.approx(expected)
    if convention == "exclude":
        assert int((noisy != y).sum()) == round(rate * len(y))
    # the wrong labels are spread over all other classes, roughly uniformly
    T = nz.transition_matrix(y, noisy, num_classes=C)
    off = T[~np.eye(C, dtype=bool)]
    per_pair = rate / (C - 1) if convention == "exclude" else rate / C
    assert abs(off.mean() - per_pair) < 1e-3 and T[~np.eye(C, dtype=bool)].max() < 5 * per_pair + 0.02


def test_symmetric_default_is_include_and_seeded():
    assert nz.parse_spec("symmetric:0.4").convention == nz.SYMMETRIC_DEFAULT == "include"
    y = np.arange(1000) % 10
    a = nz.symmetric(y, rate=0.4, num_classes=10, rng=rng(3))
    b = nz.symmetric(y, rate=0.4, num_classes=10, rng=rng(3))
    c = nz.symmetric(y, rate=0.4, num_classes=10, rng=rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(y, np.arange(1000) % 10)  # input untouched


def test_asymmetric_cifar10_flips_only_the_named_pairs():
    y = np.repeat(np.arange(10), 500)
    t = nz.asymmetric_targets(num_classes=10, family="cifar10")
    noisy = nz.asymmetric(y, rate=0.4, targets=t, rng=rng())
    pairs = set(zip(y[noisy != y].tolist(), noisy[noisy != y].tolist()))
    assert pairs == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}  # truck->auto, bird->plane, deer->horse, cat<->dog
    for c in (9, 2, 4, 3, 5):
        assert int((noisy[y == c] != c).sum()) == 200  # exactly round(0.4 * 500) per flipped class
    assert nz.realised_rate(y, noisy) == pytest.approx(0.2)


def test_asymmetric_cifar100_blocks_of_five_circular():
    y = np.repeat(np.arange(100), 50)
    t = nz.asymmetric_targets(num_classes=100, family="cifar100")
    noisy = nz.asymmetric(y, rate=0.4, targets=t, rng=rng())
    flipped = noisy != y
    src, dst = y[flipped], noisy[flipped]
    assert np.all(dst // 5 == src // 5)                 # never leaves its block
    assert np.all(dst == (src // 5) * 5 + (src % 5 + 1) % 5)  # always the next one, 4 -> 0
    assert nz.realised_rate(y, noisy) == pytest.approx(0.4)


def test_asymmetric_superclass_uses_the_coarse_labels():
    perm = np.random.default_rng(7).permutation(100)
    coarse_of = {f: int(perm[f] // 5) for f in range(100)}  # superclasses unlike the index blocks
    t = nz.asymmetric_targets(num_classes=100, family="superclass", coarse_of=coarse_of)
    for f in range(100):
        assert t[f] != f and coarse_of[int(t[f])] == coarse_of[f]
    # within a superclass the map is one cycle over its five members
    members = [f for f in range(100) if coarse_of[f] == 0]
    seen, f = [], members[0]
    for _ in range(5):
        seen.append(f)
        f = int(t[f])
    assert sorted(seen) == members and f == members[0]
    with pytest.raises(TurnctlError, match="CIFAR-100"):
        nz.asymmetric_targets(num_classes=100, family="superclass", coarse_of=None)


def test_generic_asymmetric_is_pair_flip():
    assert nz.asymmetric_targets(num_classes=4).tolist() == [1, 2, 3, 0]


def test_truncated_normal_stays_in_range_and_centred():
    q = nz.truncated_normal(20000, mean=0.4, std=0.1, rng=rng())
    assert q.min() >= 0 and q.max() <= 1 and abs(q.mean() - 0.4) < 0.005 and abs(q.std() - 0.1) < 0.01


def test_instance_noise_rate_and_dependence_on_the_input():
    C, n = 10, 4000
    y = np.repeat(np.arange(C), n // C)
    x = nz.standardise(rng(1).integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8))
    noisy = nz.instance(y, rate=0.4, features=x, num_classes=C, rng=rng(2))
    assert abs(nz.realised_rate(y, noisy) - 0.4) < 0.03
    assert noisy.min() >= 0 and noisy.max() < C
    again = nz.instance(y, rate=0.4, features=x, num_classes=C, rng=rng(2))
    assert np.array_equal(noisy, again)
    # instance dependence: the wrong label is (nearly) the argmax of x W_y, so two samples with the
    # same image and class that both flip mostly go to the same class (symmetric noise: 1 time in 9)
    twins = nz.instance(np.concatenate([y, y]), rate=0.5, features=np.concatenate([x, x]), num_classes=C, rng=rng(5))
    a, b = twins[:n], twins[n:]
    both = (a != y) & (b != y)
    assert both.sum() > 500 and np.mean(a[both] == b[both]) > 0.6
    # truncation at 0 keeps a half-normal at rate 0: mean 0.1 * sqrt(2 / pi) ~ 0.08 (documented)
    at_zero = nz.instance(y, rate=0.0, features=x, num_classes=C, rng=rng(2))
    assert abs(nz.realised_rate(y, at_zero) - 0.08) < 0.015


def test_transition_matrix_rows_sum_to_one():
    y = np.arange(300) % 3
    noisy = nz.symmetric(y, rate=0.5, num_classes=3, rng=rng(), convention="exclude")
    T = nz.transition_matrix(y, noisy, num_classes=4)
    assert np.allclose(T[:3].sum(axis=1), 1.0) and T[3].sum() == 0


@pytest.mark.parametrize("text,kind,rate,conv", [
    ("symmetric:0.6", "symmetric", 0.6, "include"), ("symmetric:0.2:exclude", "symmetric", 0.2, "exclude"),
    ("asymmetric:0.4", "asymmetric", 0.4, None), ("asymmetric:0.4:superclass", "asymmetric", 0.4, "superclass"),
    ("instance:0.3", "instance", 0.3, "xia2020"), ("none", "none", 0.0, None),
])
def test_parse_spec(text, kind, rate, conv):
    spec = nz.parse_spec(text)
    assert (spec.kind, spec.rate, spec.convention) == (kind, rate, conv)


def test_parse_spec_slugs():
    assert nz.parse_spec("symmetric:0.6").slug == "symmetric-0.6"
    assert nz.parse_spec("human:worse").slug == "human-worse"
    assert nz.parse_spec("file:x/labels.csv").slug == "file-labels"
    assert nz.parse_spec(None).slug == ""


@pytest.mark.parametrize("bad,fragment", [
    ("symmetric:1.5", "outside [0, 1]"), ("symmetric", "symmetric:RATE"), ("gaussian:0.2", "unknown kind"),
    ("symmetric:0.2:both", "unknown option"), ("human:", "label set"), ("asymmetric:0.2:include", "unknown option"),
])
def test_parse_spec_errors_are_one_line(bad, fragment):
    with pytest.raises(TurnctlError) as err:
        nz.parse_spec(bad)
    assert fragment in str(err.value) and "\n" not in str(err.value)
