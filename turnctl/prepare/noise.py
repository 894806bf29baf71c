"""Label-noise generators: seeded, reproducible bit for bit, documented.

Every generator takes the true labels and returns new ones; none mutates its input. All randomness
comes from the ``numpy.random.Generator`` passed in, so the same seed gives the same labels::

    >>> import numpy as np
    >>> y = np.repeat(np.arange(10), 100)
    >>> noisy = symmetric(y, rate=0.6, num_classes=10, rng=np.random.default_rng(0))
    >>> 0.5 < realised_rate(y, noisy) < 0.6   # "include": 60% redrawn, 1/10 of them land on y
    True

Conventions (recorded in the manifest):

- ``symmetric:r`` / ``symmetric:r:include`` (the default, as in DivideMix, UNICON and ELR code):
  exactly round(r*N) samples, chosen uniformly, get a label drawn uniformly from all C classes,
  which may be the true one, so the expected realised rate is r(1 - 1/C).
  ``symmetric:r:exclude``: exactly round(r*N) samples get a uniformly drawn *other* class, which
  is the transition matrix with 1-r on the diagonal and r/(C-1) elsewhere.
- ``asymmetric:r``: in every class that has a flip target, exactly round(r*n_c) samples take it.
  CIFAR-10: truck->automobile, bird->airplane, deer->horse, cat<->dog (other classes keep their
  labels, so the overall rate is about r/2). CIFAR-100: within each block of five consecutive
  class indices, class j -> next, circularly (not the real superclasses). Other datasets: the
  pair-flip convention j -> (j+1) mod C. ``asymmetric:r:superclass`` (CIFAR-100): j -> the next
  fine class of its real superclass (taken from the coarse labels), circularly.
- ``instance:r`` (Xia et al. 2020, "Part-dependent label noise", their reference code):
  q_i ~ N(r, 0.1) truncated to [0, 1] (rejection sampling); one W_c ~ N(0, 1) of shape D x C per
  true class c; p_i = q_i * softmax(x_i W_{y_i}) with the true class excluded, p_{i,y_i} = 1 - q_i;
  the new label is drawn from p_i. x_i is the flattened image scaled to [0, 1] and standardised
  per dimension over the noised samples (Xia normalises per channel); as in their code the logits
  are not temperature-scaled, so the wrong label is close to the argmax of x_i W_{y_i}. Note that
  ``instance:0`` is not clean: the truncated N(0, 0.1) still has mean 0.08.
- ``human:<name>`` and ``file:<csv>`` replace labels from a file (see :mod:`turnctl.prepare.labels`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from turnctl.errors import TurnctlError

KINDS = ("none", "symmetric", "asymmetric", "instance", "human", "file")
SYMMETRIC_DEFAULT = "include"
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
INSTANCE_STD = 0.1


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    """A parsed ``--noise`` value.

    >>> parse_spec("symmetric:0.6")
    NoiseSpec(text='symmetric:0.6', kind='symmetric', rate=0.6, convention='include', name=None, path=None)
    """

    text: str
    kind: str
    rate: Optional[float] = None
    convention: Optional[str] = None  # symmetric: include/exclude; asymmetric: blocks/superclass/...
    name: Optional[str] = None  # human:<name>
    path: Optional[str] = None  # file:<csv>

    @property
    def slug(self) -> str:
        """The directory suffix: the spec with ':' and '/' replaced by '-' (``file:`` keeps the stem).

        >>> parse_spec("human:worse").slug, parse_spec("file:x/labels.csv").slug
        ('human-worse', 'file-labels')
        """
        if self.kind == "none":
            return ""
        if self.kind == "file":
            return "file-" + Path(self.path or "labels").stem.replace(".", "-")
        return self.text.replace(":", "-").replace("/", "-")


def parse_spec(text: Optional[str]) -> NoiseSpec:
    """Parse ``none``, ``symmetric:r[:include|exclude]``, ``asymmetric:r[:superclass]``,
    ``instance:r``, ``human:<name>`` or ``file:<csv>``; a bad spec is a one-line error.

    >>> parse_spec("asymmetric:0.4:superclass").convention
    'superclass'
    >>> parse_spec(None).kind
    'none'
    """
    if text is None or text.strip().lower() in ("", "none", "clean"):
        return NoiseSpec(text="none", kind="none", rate=0.0)
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "human":
        if not rest:
            raise TurnctlError(f"--noise {text}: give the label set, e.g. human:worse or human:aggre")
        return NoiseSpec(text=text, kind="human", name=rest)
    if kind == "file":
        if not rest:
            raise TurnctlError(f"--noise {text}: give a CSV path, e.g. file:labels.csv")
        return NoiseSpec(text=text, kind="file", path=rest)
    if kind not in ("symmetric", "asymmetric", "instance"):
        raise TurnctlError(f"--noise {text}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    parts = rest.split(":") if rest else []
    if not parts or not re.fullmatch(r"\d*\.?\d+(e-?\d+)?", parts[0]):
        raise TurnctlError(f"--noise {text}: expected {kind}:RATE with RATE in [0, 1], e.g. {kind}:0.4")
    rate = float(parts[0])
    if not 0.0 <= rate <= 1.0:
        raise TurnctlError(f"--noise {text}: rate {rate} is outside [0, 1]")
    options = {"symmetric": ("include", "exclude"), "asymmetric": ("superclass",), "instance": ()}[kind]
    if len(parts) > 2 or (len(parts) == 2 and parts[1] not in options):
        allowed = ", ".join(f"{kind}:{parts[0]}:{o}" for o in options) or f"{kind}:{parts[0]}"
        raise TurnctlError(f"--noise {text}: unknown option (allowed: {allowed})")
    convention = parts[1] if len(parts) == 2 else None
    if kind == "symmetric":
        convention = convention or SYMMETRIC_DEFAULT
    elif kind == "instance":
        convention = "xia2020"
    return NoiseSpec(text=text, kind=kind, rate=rate, convention=convention)


def _exact_choice(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly round(rate*n) samples, uniformly chosen (the DivideMix selection)."""
    return rng.permutation(n)[: int(round(rate * n))]


def symmetric(labels: np.ndarray, *, rate: float, num_classes: int, rng: np.random.Generator,
              convention: str = SYMMETRIC_DEFAULT) -> np.ndarray:
    """Uniform noise: round(rate*N) samples get a random label (see the module docstring).

    >>> y = np.zeros(1000, dtype=np.int64)
    >>> realised_rate(y, symmetric(y, rate=0.3, num_classes=10, rng=np.random.default_rng(1), convention="exclude"))
    0.3
    """
    if convention not in ("include", "exclude"):
        raise ValueError(f"convention must be include or exclude, not {convention!r}")
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    chosen = _exact_choice(len(labels), rate, rng)
    if convention == "include":
        out[chosen] = rng.integers(0, num_classes, size=len(chosen))
    else:  # a uniform draw among the C-1 other classes: shift past the true label
        draw = rng.integers(0, num_classes - 1, size=len(chosen))
        out[chosen] = draw + (draw >= labels[chosen])
    return out


def asymmetric_targets(*, num_classes: int, family: str = "generic",
                       coarse_of: Optional[Dict[int, int]] = None) -> np.ndarray:
    """The flip target of every class (``t[c] == c``: never flipped).

    ``family``: ``cifar10`` (the fixed pairs), ``cifar100`` (blocks of five, circular),
    ``superclass`` (next fine class inside its real superclass; needs ``coarse_of`` fine->coarse),
    ``generic`` (pair flip c -> c+1 mod C).

    >>> asymmetric_targets(num_classes=100, family="cifar100")[[0, 3, 4, 5, 99]].tolist()
    [1, 4, 0, 6, 95]
    >>> asymmetric_targets(num_classes=10, family="cifar10").tolist()
    [0, 1, 0, 5, 7, 3, 6, 7, 8, 1]
    """
    targets = np.arange(num_classes, dtype=np.int64)
    if family == "cifar10":
        for src, dst in CIFAR10_ASYMMETRIC.items():
            targets[src] = dst
    elif family == "cifar100":
        if num_classes % 5:
            raise ValueError(f"CIFAR-100 blocks need a multiple of 5 classes, not {num_classes}")
        targets = (targets // 5) * 5 + (targets % 5 + 1) % 5
    elif family == "superclass":
        if not coarse_of:
            raise TurnctlError("asymmetric:r:superclass needs coarse (superclass) labels: CIFAR-100 only")
        groups: Dict[int, list] = {}
        for fine in sorted(coarse_of):
            groups.setdefault(coarse_of[fine], []).append(fine)
        for members in groups.values():
            for i, fine in enumerate(members):
                targets[fine] = members[(i + 1) % len(members)]
    elif family == "generic":
        targets = (targets + 1) % num_classes
    else:
        raise ValueError(f"unknown asymmetric family {family!r}")
    return targets


def asymmetric(labels: np.ndarray, *, rate: float, targets: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Class-conditional flips: in each class c with ``targets[c] != c``, exactly round(rate*n_c)
    samples take ``targets[c]``.

    >>> y = np.repeat(np.arange(10), 10)
    >>> t = asymmetric_targets(num_classes=10, family="cifar10")
    >>> noisy = asymmetric(y, rate=0.4, targets=t, rng=np.random.default_rng(0))
    >>> sorted(set(zip(y[noisy != y].tolist(), noisy[noisy != y].tolist())))
    [(2, 0), (3, 5), (4, 7), (5, 3), (9, 1)]
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = labels.copy()
    for c in range(len(targets)):  # class by class, in index order, so the draw order is fixed
        members = np.flatnonzero(labels == c)
        if targets[c] == c or len(members) == 0:
            continue
        out[members[_exact_choice(len(members), rate, rng)]] = targets[c]
    return out


def truncated_normal(n: int, *, mean: float, std: float, rng: np.random.Generator,
                     low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``n`` draws of N(mean, std) restricted to [low, high] by rejection (seeded, vectorised).

    >>> q = truncated_normal(1000, mean=0.95, std=0.1, rng=np.random.default_rng(0))
    >>> bool(q.min() >= 0 and q.max() <= 1)
    True
    """
    out = np.empty(n)
    filled = 0
    while filled < n:
        draw = rng.normal(mean, std, size=max(2 * (n - filled), 16))
        draw = draw[(draw >= low) & (draw <= high)][: n - filled]
        out[filled:filled + len(draw)] = draw
        filled += len(draw)
    return out


def standardise(features: np.ndarray) -> np.ndarray:
    """Flatten to (N, D) float32 in [0, 1] (uint8 input) and z-score every dimension.

    >>> standardise(np.array([[0, 255], [255, 255]], dtype=np.uint8)).tolist()
    [[-1.0, 0.0], [1.0, 0.0]]
    """
    x = np.asarray(features).reshape(len(features), -1).astype(np.float32)
    if np.asarray(features).dtype == np.uint8:
        x /= 255.0
    x -= x.mean(axis=0, keepdims=True)
    # einsum avoids x.std's full-size temporary (CIFAR: 50,000 x 3,072 floats)
    std = np.sqrt(np.einsum("ij,ij->j", x, x) / max(len(x), 1)).astype(np.float32)
    x /= np.where(std > 0, std, 1.0)
    return x


def instance(labels: np.ndarray, *, rate: float, features: np.ndarray, num_classes: int,
             rng: np.random.Generator, std: float = INSTANCE_STD) -> np.ndarray:
    """Instance-dependent noise of Xia et al. 2020 (see the module docstring).

    ``features``: (N, ...) per-sample inputs, already standardised (:func:`standardise`).

    >>> y = np.repeat(np.arange(5), 200)
    >>> x = np.random.default_rng(1).normal(size=(1000, 16))
    >>> noisy = instance(y, rate=0.3, features=x, num_classes=5, rng=np.random.default_rng(0))
    >>> 0.25 < realised_rate(y, noisy) < 0.35
    True
    """
    labels = np.asarray(labels, dtype=np.int64)
    x = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    n, dim = x.shape
    q = truncated_normal(n, mean=rate, std=std, rng=rng)
    probs = np.empty((n, num_classes), dtype=np.float64)
    for c in range(num_classes):  # one W per true class, drawn in class order (fixed stream)
        w = rng.standard_normal((dim, num_classes)).astype(np.float32)
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        logits = (x[members] @ w).astype(np.float64)
        logits[:, c] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p *= q[members, None]
        p[:, c] = 1.0 - q[members]
        probs[members] = p
    u = rng.random(n)
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = np.inf  # rounding must never push a draw past the last class
    return (cum < u[:, None]).sum(axis=1).astype(np.int64)


def realised_rate(true: np.ndarray, given: np.ndarray) -> Optional[float]:
    """Fraction of samples whose given label differs from the true one (None when there are none).

    >>> realised_rate(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]))
    0.25
    """
    true, given = np.asarray(true), np.asarray(given)
    if len(true) == 0:
        return None
    return float(np.mean(true != given))


def transition_matrix(true: np.ndarray, given: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Empirical T[i, j] = P(given = j | true = i); rows of absent classes are all zero.

    >>> transition_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), num_classes=2).tolist()
    [[0.5, 0.5], [0.0, 1.0]]
    """
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (np.asarray(true, dtype=np.int64), np.asarray(given, dtype=np.int64)), 1)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def expected_rate(spec: NoiseSpec, *, num_classes: int, class_counts: Optional[Sequence[int]] = None,
                  targets: Optional[np.ndarray] = None) -> Optional[float]:
    """The rate the generator aims at (for the manifest next to the realised one).

    >>> expected_rate(parse_spec("symmetric:0.6"), num_classes=10)
    0.54
    """
    if spec.kind == "none":
        return 0.0
    if spec.kind == "symmetric":
        r = spec.rate if spec.convention == "exclude" else spec.rate * (1 - 1 / num_classes)
        return round(r, 10)
    if spec.kind == "instance":
        return spec.rate
    if spec.kind == "asymmetric" and class_counts is not None and targets is not None:
        counts = np.asarray(class_counts, dtype=np.float64)
        moved = counts[targets != np.arange(len(targets))].sum()
        return round(spec.rate * moved / max(counts.sum(), 1), 10)
    return None
