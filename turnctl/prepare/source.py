"""What a dataset reader hands to the writer: splits of (key, label, true label, image) in order.

Readers (``cifar``, ``arrays``, ``listed``) only parse raw layouts into :class:`Source`; noise,
encoding and shard writing happen downstream, so every dataset gets the same treatment.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from turnctl.errors import DataError

SPLITS = ("train", "val", "test")
# The splits that get label noise (one draw over both, in this order); the test split never does.
NOISED_SPLITS = ("train", "val")
# The held-out validation split never depends on --noise-seed: every noise setting of a dataset
# is evaluated on the same samples.
SPLIT_SEED = 0
# Curated benchmarks (digits, CIFAR, Fashion-MNIST): their official labels are taken as the truth,
# as every noisy-label benchmark does, so each sample's true label is known.
TRUSTED_LABELS = "the dataset's official labels (a curated benchmark, taken as the truth) on every split"
# File-listed datasets (class-sorted lists) are written in a seeded shuffled order so that every
# equal-size shard mixes all classes; the order, like idx, never depends on the noise.
ORDER_SEED = 0


@dataclasses.dataclass
class Split:
    """One split, in write order.

    ``labels``: the labels the dataset gives (before any synthetic noise); ``clean``: the true
    labels, -1 where unknown, or None when none are known; ``images``: a uint8 array (N, H, W[, C])
    or N file paths; ``positions``: position in the original training order (CIFAR-N labels are
    indexed by it); ``coarse``: CIFAR-100 superclass labels.
    """

    name: str
    keys: List[str]
    labels: np.ndarray
    clean: Optional[np.ndarray]
    images: Union[np.ndarray, List[str]]
    positions: Optional[np.ndarray] = None
    coarse: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray, name: Optional[str] = None) -> "Split":
        """The samples at ``index`` (in that order) as a new split."""
        index = np.asarray(index, dtype=np.int64)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        images = self.images[index] if isinstance(self.images, np.ndarray) else [self.images[i] for i in index]
        return Split(name or self.name, [self.keys[i] for i in index], self.labels[index], pick(self.clean),
                     images, pick(self.positions), pick(self.coarse))

    @property
    def is_array(self) -> bool:
        return isinstance(self.images, np.ndarray)

    def followed_by(self, other: "Split", name: Optional[str] = None) -> "Split":
        """This split's samples, then ``other``'s, as one split (an optional field survives only
        when both have it)."""
        both = lambda a, b: None if a is None or b is None else np.concatenate([a, b])  # noqa: E731
        images = (np.concatenate([self.images, other.images]) if self.is_array and other.is_array
                  else list(self.images) + list(other.images))
        return Split(name or self.name, self.keys + other.keys, np.concatenate([self.labels, other.labels]),
                     both(self.clean, other.clean), images, both(self.positions, other.positions),
                     both(self.coarse, other.coarse))


@dataclasses.dataclass
class Source:
    """A parsed dataset: class names, ordered splits, and what to record under ``sources``.

    ``builtin_val``: the val split is not the dataset's own but a share of its official training
    set that turnctl draws (digits, CIFAR, Fashion-MNIST), so ``--val-fraction`` may replace it.
    ``clean_labels``: where the true labels (``Split.clean``) come from, or why there are none;
    recorded in the manifest, because a true label is only written where it is actually known.
    """

    dataset: str
    class_names: List[str]
    splits: Dict[str, Split]
    info: Dict[str, Any]
    asymmetric_family: str = "generic"  # cifar10 / cifar100 / generic (see noise.asymmetric_targets)
    builtin_val: bool = False
    clean_labels: str = "none"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sanitize_key(text: str) -> str:
    """A dot-free WebDataset key from a path or name (dots, slashes, spaces become '_').

    >>> sanitize_key("images/0/00/1234.jpg")
    'images_0_00_1234_jpg'
    """
    return re.sub(r"[.\s/\\]", "_", text.strip().lstrip("./"))


def is_int_text(text: str) -> bool:
    """True for an optionally signed run of ASCII digits: what ``int()`` reads as the label written.

    ``str.isdigit`` is also true for '²' or Arabic-Indic digits, which ``int()`` refuses or reads
    as another number.

    >>> is_int_text("12"), is_int_text("-1"), is_int_text("²"), is_int_text("١")
    (True, True, False, False)
    """
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def check_unique(keys: Sequence[str], *, where: str) -> None:
    """One DataError naming the first key that occurs twice."""
    seen = set()
    for k in keys:
        if k in seen:
            raise DataError(f"{where}: duplicate sample key {k!r} (keys must be unique; dots and slashes map to '_')")
        seen.add(k)


def check_range(labels: np.ndarray, *, num_classes: int, where: str, names: Optional[Sequence[str]] = None) -> None:
    """One DataError naming the first out-of-range label, its position (or key) and the file."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        at = f"key {names[i]!r}" if names is not None else f"position {i}"
        raise DataError(f"{where}: label {int(labels[i])} at {at} is outside 0..{num_classes - 1}"
                        f" ({len(bad)} bad label{'s' if len(bad) > 1 else ''})")


def stratified_holdout(labels: np.ndarray, *, fractions: Mapping[str, float], seed: int = SPLIT_SEED
                       ) -> Dict[str, np.ndarray]:
    """Seeded, stratified holdouts: for each name, about ``fraction`` of every class (sorted indices).

    Per-class quotas use largest remainders so the totals are round(N * fraction); with 5,000
    samples per class and 0.05 every class gives exactly 250. The rest is returned as ``"rest"``.

    >>> y = np.repeat(np.arange(10), 5000)
    >>> parts = stratified_holdout(y, fractions={"val": 0.05})
    >>> len(parts["val"]), len(parts["rest"]), int(np.bincount(y[parts["val"]]).min())
    (2500, 47500, 250)
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    members = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    counts = np.array([len(members[c]) for c in classes], dtype=np.float64)
    taken = {c: 0 for c in classes}
    out: Dict[str, np.ndarray] = {}
    for name, fraction in fractions.items():
        exact = counts * fraction
        quota = np.floor(exact).astype(np.int64)
        short = int(round(len(labels) * fraction)) - int(quota.sum())
        if short > 0:  # largest remainders first, ties broken by class order
            order = np.lexsort((np.arange(len(classes)), -(exact - quota)))
            quota[order[:short]] += 1
        picked = []
        for c, q in zip(classes, quota):
            picked.append(members[c][taken[c]:taken[c] + q])
            taken[c] += int(q)
        out[name] = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    rest = [members[c][taken[c]:] for c in classes]
    out["rest"] = np.sort(np.concatenate(rest)) if rest else np.zeros(0, dtype=np.int64)
    return out


def shuffled(split: Split, *, seed: int = ORDER_SEED) -> Split:
    """``split`` in a seeded random order (for class-sorted file lists)."""
    return split.take(np.random.default_rng(seed).permutation(len(split)))


def require_file(path: Path, *, dataset: str, what: str = "") -> Path:
    """``path`` if it is a file, else a one-line DataError naming it."""
    if not Path(path).is_file():
        hint = f" ({what})" if what else ""
        raise DataError(f"{dataset}: missing file {path}{hint}; set --root or $TURNCTL_DATA")
    return Path(path)
