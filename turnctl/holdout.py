"""The validation hold-out: which training samples are set aside to choose checkpoints and settings.

One function, used by ``turnctl prepare --val-fraction F`` (the held-out samples become a ``val``
split on disk) and by a train-time ``data.val_fraction`` (the held-out samples stay in the train
shards and are masked out of training by their ``idx``). Both draw the same set from the same
labels, fraction and seed, so a run on shards without a val split and a run on shards prepared with
one hold out exactly the same samples.

The split is stratified on the *given* labels (the possibly noisy ones: that is all a user has),
so every class with at least two samples keeps at least one for training and gives
``round(F * n_c)`` (at least one when F > 0) to validation. The validation labels are the given
labels too, so validation accuracy is measured against noisy labels, exactly as a user of real
noisy data would measure it (docs/PROTOCOL.md).

>>> import numpy as np
>>> y = np.array([0] * 10 + [1] * 10)
>>> m = stratified_holdout(y, 0.2, seed=0)
>>> int(m.sum()), int(m[:10].sum()), int(m[10:].sum())
(4, 2, 2)
>>> bool((stratified_holdout(y, 0.2, seed=0) == m).all())
True
"""

from __future__ import annotations

import numpy as np

from turnctl.data.format import IDX_TAR_ORDER

# Offset added to the seed so the hold-out draw never coincides with another seeded draw of the run.
_SALT = 7_919


def stratified_holdout(labels: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """A boolean mask over ``labels`` (in idx order): True = held out for validation.

    Per class ``c`` with ``n_c`` samples, ``min(max(round(fraction * n_c), 1), n_c - 1)`` samples are
    drawn without replacement (none from a class of one sample; negative labels, unknown, are never
    held out). Deterministic in
    ``(labels, fraction, seed)``; independent of the machine and the numpy version's default RNG.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    mask = np.zeros(labels.shape[0], dtype=bool)
    if fraction == 0 or labels.size == 0:
        return mask
    rng = np.random.Generator(np.random.PCG64(int(seed) + _SALT))
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        n = members.size
        k = min(max(int(round(fraction * n)), 1), n - 1)
        if k <= 0:
            continue
        mask[rng.choice(members, size=k, replace=False)] = True
    return mask


def read_given_labels(info) -> np.ndarray:
    """The given label of every sample of a split, in idx order, read from the shards' ``cls``
    members (the images are skipped, never decoded). One sequential read of the split: cheap next to
    a feature pass, but for very large datasets prefer ``turnctl prepare --val-fraction``, which
    writes the validation split once. A sample whose idx or label cannot be read gets -1 (the
    reader reports it as undecodable later; it is never held out).
    """
    import tarfile

    from turnctl.errors import DataError
    from turnctl.data import iter_tar

    labels = np.full(info.num_samples, -1, dtype=np.int64)
    if info.layout.idx == IDX_TAR_ORDER:  # `turnctl index` shards: idx by position, label by field
        return _read_tar_order_labels(info, labels)
    for path in info.shard_paths:
        pending = {}  # key -> {"idx": .., "cls": ..}: a sample's members are adjacent in a shard
        try:
            with open(path, "rb") as f:
                for name, data in iter_tar(f, suffixes=(".idx", ".cls")):
                    if name.endswith(".clean.cls"):
                        continue
                    key, _, member = name.rpartition(".")
                    pending.setdefault(key, {})[member] = data
                    row = pending[key]
                    if "idx" in row and "cls" in row:
                        del pending[key]
                        i, c = int(row["idx"]), int(row["cls"])
                        if 0 <= i < info.num_samples:
                            labels[i] = c
        except (OSError, ValueError, tarfile.TarError) as exn:
            raise DataError(f"{path}: cannot read the labels for the validation hold-out ({exn})") from None
    return labels


def _read_tar_order_labels(info, labels: np.ndarray) -> np.ndarray:
    """:func:`read_given_labels` for shards numbered in tar order (``turnctl index``): the reader's
    own numbering (turnctl/data/tar.py) and label parser (turnctl/data/format.py)."""
    import tarfile

    from turnctl.data import iter_tar
    from turnctl.data.format import read_label
    from turnctl.data.tar import numbered_members
    from turnctl.errors import DataError

    first = {name: start for name, start, _ in info.layout.shards}
    member = "." + info.layout.label_member
    for path in info.shard_paths:
        start = first[path.name]
        try:
            with open(path, "rb") as f:
                for name, data, pos in numbered_members(iter_tar(f, suffixes=(member,))):
                    i = start + pos
                    if 0 <= i < info.num_samples:
                        try:
                            labels[i] = read_label({info.layout.label_member: data}, info.layout.label_field)
                        except (KeyError, ValueError):
                            pass  # -1: never held out (the reader reports the sample)
        except (OSError, ValueError, tarfile.TarError) as exn:
            raise DataError(f"{path}: cannot read the labels for the validation hold-out ({exn})") from None
    return labels
