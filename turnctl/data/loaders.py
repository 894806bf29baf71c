"""The two readers of a prepared split (the shards ``turnctl prepare`` writes, docs/ARCHITECTURE.md).

Two ways to read a split, one per use:

* :func:`exact_loader` -- every sample exactly once, in lockstep: feature extraction and the
  per-sample losses of every TURN epoch. Shard ``i`` goes to rank ``i % world_size`` and then to the
  rank's workers; ranks with fewer real batches get *padding batches* (one row, ``idx == -1``) so
  that every rank runs the same number of forwards (under ZeRO-3 a forward is a collective).
  Undecodable images are not dropped: they come back as zero images with ``ok == False`` so that
  each idx still appears exactly once and the caller's coverage check stays exact.
* :func:`train_loader` -- one training epoch: a seeded per-epoch shard shuffle *before* the node
  split (so the shard -> rank partition changes every epoch), node and worker splitting, every
  worker cycling over its shards so it never starves, an optional ``keep_idx`` filter (the clean
  subset) applied *before* image decoding, a sample shuffle buffer, and a hard cut at exactly
  ``.steps`` batches on every rank. Corrupt samples are counted and skipped. With fewer shards
  than readers (ranks x workers) the shards are shared in interleaved parts rather than refused
  (``share_shards=False`` refuses with a DataError instead).

Both run one pipeline, built by :func:`_pipeline`: the loader picks this reader's shards, then
tar members (turnctl/data/tar.py) -> samples parsed and filtered before decoding -> decoded
(turnctl/data/stages.py) -> batches that cross from DataLoader workers through shared memory
(turnctl/data/batches.py). The two modes differ only in which shards a reader takes and in what
happens to a bad sample (exact: ``ok=False`` row; train: skipped and counted).

The rank and world size are explicit arguments (callers pass ``turnctl.distributed.rank()`` /
``world_size()``) rather than read from the environment by ``wds.split_by_node``: the split is then
the same whether or not a process group exists, and tests simulate several ranks in one process.
Nothing here runs a collective: every rank derives the same ``.steps`` from ``sizes.json`` alone.

Example::

    info = open_split("shards/cifar100-sym-0.9", "train")
    tf = ToTensorResize(224)
    for batch in exact_loader(info, transform=tf, batch_size=256, rank=r, world_size=w):
        keep = batch["idx"] >= 0                      # drop padding rows
        feats = model(batch["image"])[keep]           # forward on every rank, every step

    loader = train_loader(info, transform=tf, batch_size=128, epoch=e, seed=0, rank=r,
                          world_size=w, num_workers=4, shuffle_buffer=1000, keep_idx=subset)
    for batch in loader:                              # exactly loader.steps batches on every rank
        ...
    loader.stats()   # {"seen": ..., "corrupt": ..., "filtered": ..., ...}
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from turnctl.data.batches import _Batch, _stream, _sum_stats, _unpack
from turnctl.data.decode import check_pil
from turnctl.data.format import SplitInfo
from turnctl.data.stages import (CountingHandler, _Counters, _Cycle, _Decode, _EpochShuffle, _Parse,
                                 _SampleShuffle, _ShardList, _SplitByRank, shard_order)
from turnctl.data.tar import expand_tars, group_samples
from turnctl.errors import DataError

log = logging.getLogger("turnctl.data")

_warned_once: set = set()


def _warn_once(key: Any, msg: str) -> None:
    if key not in _warned_once:
        _warned_once.add(key)
        log.warning("%s", msg)


def _check_common(info: SplitInfo, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of {world_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")


def _pipeline(info: SplitInfo, c: _Counters, shards: List[Callable], *, transform: Callable,
              batch_size: int, exact: bool, keep: Optional[np.ndarray] = None,
              shuffle: Optional[_SampleShuffle] = None) -> wds.DataPipeline:
    """The one pipeline of both loaders (one copy per worker, every stage sharing the counters ``c``).

    ``shards`` are the stages that choose and order this reader's shards; then tar members ->
    samples -> parsed (and filtered by ``keep``) while still compressed -> ``shuffle`` (a shuffle
    buffer, or None) -> decoded -> batches. ``exact``: a sample with a valid idx is never dropped
    (an undecodable one is a zero image with ``ok=False``) and the last short batch is emitted;
    otherwise bad samples are counted and skipped, and every batch is full.
    """
    handler = CountingHandler(c)
    return wds.DataPipeline(
        shards,
        wds.pipelinefilter(expand_tars)(handler, info.layout),
        wds.pipelinefilter(group_samples)(handler),
        _Parse(info.num_samples, info.num_classes, c, keep=keep, strict=exact, layout=info.layout),
        shuffle,
        _Decode(transform, c, skip=not exact),
        _Batch(batch_size, c, partial=exact),
    )


# ----------------------------------------------------------------------------------------------
# Exact-once, lockstep reading
# ----------------------------------------------------------------------------------------------


def exact_assignment(num_shards: int, *, world_size: int, num_workers: int) -> List[List[List[int]]]:
    """Shard indices per rank and worker for :func:`exact_loader`: shard ``i`` -> rank
    ``i % world_size``; a rank's ``k``-th shard -> worker ``k % W`` with
    ``W = min(max(1, num_workers), shards of the rank)`` (no idle workers are started)."""
    out = []
    for r in range(world_size):
        mine = list(range(r, num_shards, world_size))
        w = min(max(1, num_workers), len(mine))
        out.append([mine[k::w] for k in range(w)])
    return out


def exact_steps(shard_sizes: Sequence[int], *, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches every rank yields in :func:`exact_loader`: the largest number of real batches of any
    rank, where a worker makes ``ceil(samples / batch_size)`` batches. From sizes.json alone."""
    steps = 0
    for workers in exact_assignment(len(shard_sizes), world_size=world_size, num_workers=num_workers):
        real = sum(-(-sum(shard_sizes[i] for i in shards) // batch_size) for shards in workers)
        steps = max(steps, real)
    return steps


class ExactLoader:
    """Every sample of a split exactly once across ranks, in ``steps`` batches on every rank.

    Iterating yields exactly ``steps`` dict batches:

    ====== ========================= ==============================================================
    key    type                      meaning
    ====== ========================= ==============================================================
    image  float32 [B,3,H,W]         ``transform(image)``; zeros where the image is undecodable
    idx    int64 [B]                 sample idx; ``-1`` marks a padding row
    cls    int64 [B]                 given (possibly noisy) label
    clean  int64 [B]                 true label, ``-1`` when unknown
    ok     bool [B]                  decoded fine (False for undecodable samples and padding rows)
    ====== ========================= ==============================================================

    Rows with ``idx >= 0`` over all ranks and steps cover every idx of the split exactly once. After
    its real batches a rank yields padding batches of one row (a copy of one of its real samples,
    or of a blank image when it has none) with ``idx = -1``, ``ok = False``: run the forward on them,
    discard the outputs. If the shards disagree with sizes.json the loader still yields exactly
    ``steps`` batches (truncating or padding) and :meth:`stats` reports it; the caller's coverage
    check (``turnctl.distributed.gather_by_idx``) then fails on every rank alike, instead of one rank
    raising while the others wait in a collective.
    """

    def __init__(self, info: SplitInfo, *, transform: Callable, batch_size: int, rank: int,
                 world_size: int, num_workers: int = 0, mp_context: Optional[str] = None):
        _check_common(info, batch_size, rank, world_size, num_workers)
        self.info, self.transform, self.batch_size = info, transform, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.mp_context = mp_context
        assign = exact_assignment(info.num_shards, world_size=world_size, num_workers=num_workers)
        self.shards: List[int] = sorted(i for w in assign[rank] for i in w)
        # Worker processes actually started on this rank (0 = in-process).
        self.workers = 0 if num_workers == 0 else len(assign[rank])
        self.steps = exact_steps(info.shard_sizes, batch_size=batch_size, world_size=world_size,
                                 num_workers=num_workers)
        self.expected_rows = sum(info.shard_sizes[i] for i in self.shards)
        self._stats: Dict[str, Any] = {}

    def __len__(self) -> int:
        return self.steps

    def pipeline(self) -> wds.DataPipeline:
        """This rank's pipeline (one copy per worker); the worker split happens inside."""
        c = _Counters()
        urls = [str(self.info.shard_paths[i]) for i in self.shards]
        shards = [
            _ShardList(urls, c),                   # this rank's shards, in name order
            wds.split_by_worker,                   # rank's k-th shard -> worker k % W
        ]
        return _pipeline(self.info, c, shards, transform=self.transform, batch_size=self.batch_size,
                         exact=True)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        check_pil()
        last: Dict[int, np.ndarray] = {}
        real = rows = bad = 0
        overflow = 0
        template: Optional[Dict[str, torch.Tensor]] = None
        if self.shards and self.steps:
            stream = _stream(self.pipeline(), self.workers, mp_context=self.mp_context)
            try:
                for b in stream:
                    snap = b["stats"]
                    last[int(snap[0])] = snap
                    if "image" not in b:  # a worker's end-of-stream counters
                        continue
                    batch = _unpack(b)
                    if real == self.steps:  # more data than sizes.json says: cut, keep lockstep
                        overflow += int(batch["idx"].numel())
                        continue
                    real += 1
                    rows += int(batch["idx"].numel())
                    bad += int((~batch["ok"]).sum())
                    template = batch
                    yield batch
            finally:
                stream.close()
        pads = self.steps - real
        if pads:
            pad = self._padding(template)
            for _ in range(pads):
                yield {k: v.clone() for k, v in pad.items()}
        s = _sum_stats(last)
        self._stats = {
            "steps": self.steps, "real_steps": real, "padding_steps": pads, "seen": rows,
            "expected": self.expected_rows, "corrupt": bad, "overflow": overflow,
            "errors": s["errors"], "read": s["read"], "workers": self.workers,
        }
        if rows != self.expected_rows or overflow or s["errors"]:
            log.warning(
                "rank %d read %d samples of %s/%s, sizes.json says %d (%d beyond the last step, %d "
                "stream errors): the shards and sizes.json disagree", self.rank, rows,
                self.info.root, self.info.split, self.expected_rows, overflow, s["errors"],
            )
        if bad:
            log.warning("rank %d: %d undecodable samples in %s/%s (zero images, ok=False)",
                        self.rank, bad, self.info.root, self.info.split)

    def _padding(self, template: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if template is not None:
            image = template["image"][:1].clone()
            cls = template["cls"][:1].clone()
        else:  # this rank owns no shard (world_size > num_shards): a blank image of the right size
            image = self.transform(Image.new("RGB", (32, 32))).unsqueeze(0)
            cls = torch.zeros(1, dtype=torch.int64)
        return {"image": image, "idx": torch.full((1,), -1, dtype=torch.int64), "cls": cls,
                "clean": torch.full((1,), -1, dtype=torch.int64), "ok": torch.zeros(1, dtype=torch.bool)}

    def stats(self) -> Dict[str, Any]:
        """After iterating: ``steps``, ``real_steps``, ``padding_steps``, ``seen`` (real rows,
        ``idx >= 0``), ``expected`` (from sizes.json), ``corrupt`` (rows with ``ok=False``),
        ``overflow`` (rows cut beyond ``steps``), ``errors`` (stream errors), ``read``, ``workers``."""
        return dict(self._stats)


def exact_loader(info: SplitInfo, *, transform: Callable, batch_size: int, rank: int,
                 world_size: int, num_workers: int = 0, mp_context: Optional[str] = None) -> ExactLoader:
    """Read ``info``'s split exactly once across ``world_size`` ranks, in lockstep.

    ``steps`` is identical on every rank and computed from sizes.json alone (no communication).
    See :class:`ExactLoader` for the batch layout and padding rules.

    Example (a sketch: ``model`` and ``keep`` are the caller's)::

        info = open_split(root, "train")
        ld = exact_loader(info, transform=ToTensorResize(64), batch_size=256,
                          rank=dist.rank(), world_size=dist.world_size(), num_workers=2)
        for b in ld:
            real = b["idx"] >= 0
            out = model(b["image"])              # every rank, every step (ZeRO-3 safe)
            keep(b["idx"][real], out[real])
    """
    return ExactLoader(info, transform=transform, batch_size=batch_size, rank=rank,
                       world_size=world_size, num_workers=num_workers, mp_context=mp_context)


# ----------------------------------------------------------------------------------------------
# Training epochs
# ----------------------------------------------------------------------------------------------


class ShardPart(NamedTuple):
    """A reader's unit of work in training: samples ``part, part + parts, ...`` of shard ``shard``
    (``parts == 1``: the whole shard)."""

    shard: int
    part: int
    parts: int


def shard_parts(num_shards: int, *, world_size: int, num_workers: int) -> int:
    """How many interleaved parts each shard is cut into so that every reader (rank x worker) gets
    at least one: 1 whenever ``num_shards >= world_size * max(1, num_workers)``."""
    readers = world_size * max(1, num_workers)
    return max(1, -(-readers // max(1, num_shards)))


def train_assignment(num_shards: int, *, seed: int, epoch: int, world_size: int,
                     num_workers: int) -> List[List[List[ShardPart]]]:
    """The :class:`ShardPart` lists per rank and worker for one :func:`train_loader` epoch.

    Units are the shards (``parts == 1``), or, with fewer shards than readers, every shard cut into
    ``m =`` :func:`shard_parts` interleaved parts; unit ``v`` is part ``v // num_shards`` of shard
    ``v % num_shards``. The epoch's :func:`shard_order` of the units, then position ``p`` -> rank
    ``p % world_size``, then a rank's ``k``-th unit -> worker ``k % max(1, num_workers)``. Each worker
    cycles over its list in this order.

    >>> train_assignment(3, seed=0, epoch=0, world_size=2, num_workers=1)  # doctest: +NORMALIZE_WHITESPACE
    [[[ShardPart(shard=0, part=0, parts=1), ShardPart(shard=1, part=0, parts=1)]],
     [[ShardPart(shard=2, part=0, parts=1)]]]
    """
    m = shard_parts(num_shards, world_size=world_size, num_workers=num_workers)
    units = [ShardPart(v % num_shards, v // num_shards, m) for v in range(num_shards * m)]
    order = shard_order(len(units), seed=seed, epoch=epoch)
    w = max(1, num_workers)
    out = []
    for r in range(world_size):
        mine = [units[v] for v in order[r::world_size]]
        out.append([mine[k::w] for k in range(w)])
    return out


class TrainLoader:
    """One training epoch: exactly ``steps`` full batches on every rank.

    Batches are dicts with ``image`` float32 [B,3,H,W], ``idx``, ``cls``, ``clean`` (int64 [B],
    ``clean = -1`` when unknown) and ``ok`` (always True here: corrupt samples are skipped). Every
    batch has exactly ``batch_size`` rows.

    Semantics of an epoch: ``steps`` defaults to ``floor(n_kept / (batch_size * world_size))`` (at
    least 1), so the ranks together see about one pass over the kept samples. Each worker cycles over
    its shards (:func:`train_assignment`) and batches come from a rank's workers in turn, so a
    sample can repeat within an epoch when shards are uneven, and some samples of a long shard may
    not appear. Iterating twice replays the same epoch (same shard order, same shuffle seeds).

    Fewer shards than readers (``world_size * max(1, num_workers)``): with ``share_shards`` (the
    default) each shard is cut into interleaved parts so that every reader has one (each reader
    still scans the whole tar but decodes only its part: more reading, same decoding); with
    ``share_shards=False`` that is a DataError that says how to re-prepare.
    """

    def __init__(self, info: SplitInfo, *, transform: Callable, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 keep_idx: Optional[Iterable[int]] = None, steps: Optional[int] = None,
                 share_shards: bool = True, mp_context: Optional[str] = None):
        _check_common(info, batch_size, rank, world_size, num_workers)
        workers = max(1, num_workers)
        if info.num_shards == 0:
            raise DataError(f"{info.root}/{info.split}: the split has no shard")
        if info.num_shards < world_size * workers and not share_shards:
            fewer = (f" or set data.num_workers to {info.num_shards // world_size}"
                     if info.num_shards >= world_size else "")
            raise DataError(
                f"{info.root}/{info.split}: {info.num_shards} shard(s) for {world_size} rank(s) x "
                f"{workers} worker(s) = {world_size * workers} readers, and every reader needs a shard "
                f"of its own (a reader without one yields nothing and the ranks fall out of step). "
                f"Re-run `turnctl prepare` with --shard-size at most "
                f"{max(1, info.num_samples // (world_size * workers))}{fewer}"
            )
        self.keep_mask: Optional[np.ndarray] = None
        n_kept = info.num_samples
        if keep_idx is not None:
            if not isinstance(keep_idx, (np.ndarray, torch.Tensor)):
                keep_idx = list(keep_idx)
            keep = np.unique(np.asarray(keep_idx, dtype=np.int64).ravel())
            if keep.size == 0:
                raise DataError("keep_idx is empty: nothing to train on (the selection kept no sample)")
            if keep[0] < 0 or keep[-1] >= info.num_samples:
                raise DataError(f"keep_idx holds idx outside [0, {info.num_samples}) of split {info.split!r}")
            mask = np.zeros(info.num_samples, dtype=bool)
            mask[keep] = True
            self.keep_mask = mask
            n_kept = int(keep.size)
        if n_kept < 1:
            raise DataError(f"{info.root}/{info.split}: the split is empty")
        if steps is None:
            steps = max(1, n_kept // (batch_size * world_size))
        if steps < 1:
            raise DataError(f"steps must be >= 1, got {steps}")
        self.info, self.transform, self.batch_size = info, transform, batch_size
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.steps = num_workers, shuffle_buffer, int(steps)
        self.n_kept, self.mp_context = n_kept, mp_context
        self.parts = shard_parts(info.num_shards, world_size=world_size, num_workers=num_workers)
        self.assignment = train_assignment(info.num_shards, seed=seed, epoch=epoch,
                                           world_size=world_size, num_workers=num_workers)[rank]
        if self.parts > 1:
            _warn_once(
                (str(info.root), info.split, world_size, workers),
                f"{info.root}/{info.split}: {info.num_shards} shard(s) for {world_size} rank(s) x "
                f"{workers} worker(s); each shard is shared by up to {self.parts} readers, each "
                f"decoding every {self.parts}th sample (every reader scans the whole tar). Prepare "
                f"with --shard-size at most {max(1, info.num_samples // (world_size * workers))} "
                f"to give every reader shards of its own",
            )
        self._stats: Dict[str, Any] = {}

    def __len__(self) -> int:
        return self.steps

    def pipeline(self) -> wds.DataPipeline:
        """This rank's pipeline for the epoch (one copy per worker)."""
        c = _Counters()
        urls = [str(p) for p in self.info.shard_paths]
        n, m = self.info.num_shards, self.parts
        # The units of train_assignment, in canonical order: unit v = part v // n of shard v % n.
        units = [{"url": urls[v % n], "part": v // n, "parts": m} for v in range(n * m)]
        shards = [
            _ShardList(units, c),                       # all shards (or shard parts), name order
            _EpochShuffle(self.seed, self.epoch),       # same permutation on every rank, per epoch
            _SplitByRank(self.rank, self.world_size),   # ... then the node split
            wds.split_by_worker,                        # ... then the worker split
            _Cycle(urls, c),                            # repeat: no worker runs dry before the cut
        ]
        shuffle = (_SampleShuffle(self.shuffle_buffer, self.seed, self.epoch, self.rank, c)
                   if self.shuffle_buffer > 1 else None)
        return _pipeline(self.info, c, shards, transform=self.transform, batch_size=self.batch_size,
                         exact=False, keep=self.keep_mask, shuffle=shuffle)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        # A seeded generator makes the workers' base seed (torch/random/numpy, for augmentation)
        # a function of (seed, epoch, rank) instead of the main process's RNG state.
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.rank) % (2**62))
        check_pil()
        last: Dict[int, np.ndarray] = {}
        done = 0
        stream = _stream(self.pipeline(), self.num_workers, generator=gen, mp_context=self.mp_context)
        try:
            for b in stream:
                snap = b["stats"]
                last[int(snap[0])] = snap
                done += 1
                yield _unpack(b)
                if done == self.steps:  # the epoch's cut (with_epoch at the loader level)
                    break
        finally:
            stream.close()
            # Also when the consumer stops early (a preempted epoch closes this generator).
            s = _sum_stats(last)
            self._stats = {"steps": done, "seen": done * self.batch_size, **s,
                           "workers": max(1, self.num_workers)}
        if done < self.steps:
            # Cannot happen with cycling workers unless the stream died; fail loudly, not by hanging
            # the other ranks in their next collective... which is all a single rank can do.
            raise DataError(f"rank {self.rank}: the shard stream ended after {done} of {self.steps} steps")
        if s["corrupt"] or s["errors"]:
            log.warning("epoch %d rank %d: skipped %d corrupt samples, %d stream errors (%s/%s)",
                        self.epoch, self.rank, s["corrupt"], s["errors"], self.info.root, self.info.split)

    def stats(self) -> Dict[str, Any]:
        """After an epoch, summed over this rank's workers: ``steps``, ``seen`` (rows yielded =
        steps x batch_size), and, as of each worker's last consumed batch, ``corrupt``
        (undecodable or malformed samples skipped before its last row), ``read`` (samples taken
        from the tar streams, including read-ahead: the shuffle buffer and up to DECODE_CHUNK
        samples waiting to be decoded), ``kept``, ``filtered`` (dropped by keep_idx, never decoded),
        ``errors`` (stream-level), ``passes`` (most passes any worker made over its shards),
        ``fallback`` (workers that had to read all shards), ``workers``."""
        return dict(self._stats)


def train_loader(info: SplitInfo, *, transform: Callable, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 keep_idx: Optional[Iterable[int]] = None, steps: Optional[int] = None,
                 share_shards: bool = True, mp_context: Optional[str] = None) -> TrainLoader:
    """One training epoch over ``info``'s split, ``steps`` full batches on every rank.

    ``keep_idx`` (the clean subset) is applied before decoding; ``steps`` defaults to
    ``max(1, len(keep_idx or split) // (batch_size * world_size))``. With fewer shards than
    ``world_size * max(1, num_workers)`` readers, shards are shared in interleaved parts (a warning
    says so), or, with ``share_shards=False``, DataError. DataError too when ``keep_idx`` is empty.

    Example (a sketch: ``aug``, ``subset`` and ``engine`` are the caller's)::

        ld = train_loader(info, transform=aug, batch_size=32, epoch=e, seed=0,
                          rank=dist.rank(), world_size=dist.world_size(), num_workers=2,
                          shuffle_buffer=1000, keep_idx=subset)
        for b in ld:
            loss = engine(b["image"], b["cls"]); engine.backward(loss); engine.step()
        ld.stats()["corrupt"]    # 0 on clean shards
    """
    return TrainLoader(info, transform=transform, batch_size=batch_size, epoch=epoch, seed=seed,
                       rank=rank, world_size=world_size, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, keep_idx=keep_idx, steps=steps,
                       share_shards=share_shards, mp_context=mp_context)
