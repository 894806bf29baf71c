"""``turnctl prepare --val-fraction F``: a validation split held out of the (noised) train split.

The order of operations, so that val gets exactly the labels a user of noisy data would have::

    1. fold      a val split that turnctl itself drew from the official training set (digits,
                 CIFAR, Fashion-MNIST: ``Source.builtin_val``) goes back into train, after train's
                 own samples: the order the noise is drawn in, so no sample's given label changes.
                 A dataset with its own val split (Clothing1M's clean val, an ImageFolder's val/)
                 is refused: replacing a curated split silently would change the benchmark.
    2. noise     drawn over that train split exactly as without a hold-out (pipeline.apply_noise)
    3. read      every train image is read and encoded once, into a spool file; unreadable ones
                 are skipped as usual
    4. hold out  ``turnctl.holdout.stratified_holdout(given, F, seed=S)`` on the given (possibly
                 noisy) labels of the readable train samples, in order; S is ``--noise-seed``
    5. write     the spool is split into train and val shards, each in train order with its own
                 idx 0..N-1; every val sample also gets ``train_idx``, its position in step 4

The positions of step 4 are the idx the samples get from the same prepare without
``--val-fraction`` (for a dataset without a built-in val; with one, the built-in val's samples
follow train's: position = train count + their val idx). So a train-time ``data.val_fraction F``
with ``data.val_seed S`` on those shards holds out the same samples (turnctl/holdout.py). The train
samples left after the hold-out keep their order too: train idx i is the i-th position not in val.

    >>> mask = np.array([False, True, False, True])
    >>> route(mask).tolist()        # each position's new idx within its own split
    [0, 0, 1, 1]
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import numpy as np

from turnctl.errors import DataError
from turnctl.holdout import stratified_holdout
from turnctl.logger import log
from turnctl.prepare.source import Source, Split
from turnctl.prepare.writer import SPOOL_NAME, SplitWriter, writing
_RECORD = struct.Struct("<HQ")  # extension length, payload length


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in [0, 1), else a one-line DataError."""
    f = float(fraction)
    if not 0.0 <= f < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), not {fraction}")
    return f


def fold_builtin_val(source: Source, fraction: float) -> int:
    """Make ``source`` ready for a hold-out of ``fraction`` (step 1); returns how many built-in val
    samples went back into train (0 when none). Does nothing for ``fraction`` 0."""
    if fraction == 0:
        return 0
    if "train" not in source.splits:
        raise DataError(f"{source.dataset}: --val-fraction needs a train split to hold out from, found "
                        f"{', '.join(source.splits)}")
    val = source.splits.get("val")
    if val is None:
        return 0
    if not source.builtin_val:
        raise DataError(f"{source.dataset} has its own val split ({len(val):,} samples); --val-fraction would "
                        "replace it: leave --val-fraction out to keep it")
    train = source.splits["train"]
    merged = {"train": train.followed_by(val, "train")}
    merged.update((n, s) for n, s in source.splits.items() if n not in ("train", "val"))
    source.splits = merged
    # The built-in draw (CIFAR, Fashion-MNIST record its positions) no longer describes the val
    # split on disk; keep it under another name and say what became of it.
    if "val_from_train" in source.info:
        source.info["val_from_train_replaced"] = source.info.pop("val_from_train")
    source.info["builtin_val_folded_into_train"] = {
        "count": len(val), "train_positions": [len(train), len(train) + len(val)],
        "why": "--val-fraction holds out its own val split from train (turnctl/prepare/valsplit.py)"}
    log.info("%s: --val-fraction %g: the built-in val split (%d samples) goes back into train first",
             source.dataset, fraction, len(val))
    return len(val)


class _Spool:
    """Encoded images of one split, appended in order and read back once (a plain record file:
    the images are never decoded or re-encoded again)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with writing(self.path):
            self._fh = open(self.path, "wb")

    def add(self, ext: str, payload: bytes) -> None:
        e = ext.encode("ascii")
        with writing(self.path):
            self._fh.write(_RECORD.pack(len(e), len(payload)) + e + payload)

    def read(self) -> Iterator[Tuple[str, bytes]]:
        with writing(self.path):
            self._fh.close()
        with open(self.path, "rb") as fh:
            while True:
                head = fh.read(_RECORD.size)
                if not head:
                    break
                n_ext, n_payload = _RECORD.unpack(head)
                ext = fh.read(n_ext).decode("ascii")
                yield ext, fh.read(n_payload)

    def remove(self) -> None:
        if not self._fh.closed:
            with contextlib.suppress(OSError):  # a full disk fails the flush of the close
                self._fh.close()
        self.path.unlink(missing_ok=True)


def route(mask: np.ndarray) -> np.ndarray:
    """For every position, its idx within its own split (val where ``mask``, else train)."""
    mask = np.asarray(mask, dtype=bool)
    new = np.empty(mask.shape[0], dtype=np.int64)
    new[mask] = np.arange(int(mask.sum()))
    new[~mask] = np.arange(int((~mask).sum()))
    return new


@dataclasses.dataclass
class HeldOut:
    """What step 5 wrote: both splits (as :class:`Split` in their write order) with their given
    labels and shard tables, and the number of readable train samples the hold-out was drawn from."""

    train: Split
    val: Split
    given_train: np.ndarray
    given_val: np.ndarray
    train_shards: List[Dict[str, Any]]
    val_shards: List[Dict[str, Any]]
    pool_count: int


def write_held_out(split: Split, given: np.ndarray, readable: Iterable[Tuple[int, str, bytes]], directory: Path,
                   *, fraction: float, seed: int, shard_size: int) -> HeldOut:
    """Steps 3-5 for the train ``split``: ``readable`` yields (position in ``split``, ext, bytes)
    for every readable image in order. Raises a DataError when nothing would be held out."""
    spool = _Spool(Path(directory) / SPOOL_NAME)
    try:
        kept: List[int] = []
        for i, ext, payload in readable:
            spool.add(ext, payload)
            kept.append(i)
        pos = np.asarray(kept, dtype=np.int64)
        mask = stratified_holdout(given[pos], fraction, seed=seed)
        if pos.size and not mask.any():
            raise DataError(f"{split.name}: --val-fraction {fraction:g} holds out nothing (no class has two "
                            f"readable samples among {pos.size})")
        writers = {False: SplitWriter(directory, "train", shard_size=shard_size),
                   True: SplitWriter(directory, "val", shard_size=shard_size)}
        new_idx = route(mask)
        try:
            for j, (ext, payload) in enumerate(spool.read()):
                i, held = int(pos[j]), bool(mask[j])
                clean = None if split.clean is None else int(split.clean[i])
                writers[held].add(split.keys[i], ext, payload, idx=int(new_idx[j]), label=int(given[i]),
                                  clean=clean, train_idx=j if held else None)
            train_shards, val_shards = writers[False].close(), writers[True].close()
        except BaseException:
            for w in writers.values():
                w.abandon()
            raise
    finally:
        spool.remove()
    return HeldOut(split.take(pos[~mask], "train"), split.take(pos[mask], "val"), given[pos[~mask]],
                   given[pos[mask]], train_shards, val_shards, int(pos.size))


def train_fields(held: HeldOut) -> Dict[str, Any]:
    """Added to ``splits.train`` of the manifest: what was held out of it."""
    return {"count_before_holdout": held.pool_count, "held_out_to_val": len(held.val)}


def val_fields(*, fraction: float, seed: int, folded: int) -> Dict[str, Any]:
    """Added to ``splits.val`` of the manifest: where the split comes from and what its labels are."""
    same = ("the idx in the train split of the same prepare without --val-fraction" if not folded else
            "train's idx of the same prepare without --val-fraction, then its built-in val's "
            "(train count + val idx)")
    return {
        "held_out_from": "train", "val_fraction": fraction, "holdout_seed": seed, "labels": "given",
        "stratified_on": "given", "function": "turnctl.holdout.stratified_holdout",
        "train_idx": f"member train_idx: position among the readable train samples before the hold-out ({same})",
    }


def noise_after_holdout(record: Dict[str, Any]) -> Dict[str, Any]:
    """The noise record once val is held out of a noised train: val carries the same draw."""
    out = dict(record)
    if "train" not in out.get("applies_to", []):
        return out
    out["applies_to"] = ["train", "val"]
    out["note"] = ("noise is drawn over train first; val (--val-fraction) is then held out of the noised "
                   "train, so it carries the same noise process; the test split is never noised")
    return out
