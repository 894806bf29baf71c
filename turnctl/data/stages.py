"""The stages of a reading pipeline and the per-worker counters they share.

Every stage is a module-level, picklable object (in the style of open_clip's ``data.py``), so the
same :class:`webdataset.DataPipeline` runs in-process (``num_workers=0``) or in DataLoader
workers under fork, spawn or forkserver; turnctl/data/loaders.py puts them together. In order:
which shards (:class:`_ShardList`, :class:`_EpochShuffle`, :class:`_SplitByRank`,
:class:`_Cycle`), then per sample: :class:`_Parse` (only the ASCII integers ``idx`` / ``cls`` /
``clean.cls`` are parsed, or a ``turnctl index`` dataset's tar-order idx and label field; nothing
is unpickled, ``keep_idx`` is applied before decoding),
:class:`_SampleShuffle`, :class:`_Decode` (PIL, by turnctl/data/decode.py); batching is in
turnctl/data/batches.py.

Errors are counted by a :class:`CountingHandler` with rate-limited logging, never webdataset's
``warn_and_continue`` (which sleeps 0.5 s per bad sample).
"""

from __future__ import annotations

import logging
import os
import random
import time
from itertools import islice
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from turnctl.data.decode import decode_image
from turnctl.data.format import IDX_TAR_ORDER, IMAGE_EXTS, SampleLayout, read_label
from turnctl.errors import DataError

log = logging.getLogger("turnctl.data")

# Train mode: this many undecodable samples in a row on one worker means the data is broken (or the
# transform is): stop with a DataError instead of spinning over the shards forever.
MAX_CONSECUTIVE_CORRUPT = 10_000

# Raw samples a worker pulls before decoding them back to back (see _Decode).
DECODE_CHUNK = 32

# Rate limit of the per-worker warnings about bad samples: the first few, then one per interval.
_WARN_FIRST = 3
_WARN_EVERY_S = 30.0

# Fields of the per-worker counters attached to every batch (see _Counters.snapshot).
_STAT_FIELDS = ("worker", "read", "kept", "filtered", "corrupt", "errors", "passes", "fallback")


class _Counters:
    """Running per-worker counters. Every stage of one pipeline holds the same instance (pickling
    the pipeline keeps the shared reference), so a worker's stages update one object; the batch
    stage attaches a snapshot to every batch and the main process keeps the last one per worker."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.worker = 0
        self.read = 0        # samples pulled out of the tar streams
        self.kept = 0        # ... that passed the parse and keep_idx filter
        self.filtered = 0    # ... dropped by keep_idx (never decoded)
        self.corrupt = 0     # undecodable / malformed samples (skipped, or ok=False in exact mode)
        self.errors = 0      # stream-level errors (unreadable shard, bad tar header, ...)
        self.passes = 0      # completed passes over this worker's shard list
        self.fallback = 0    # 1 when this worker had to borrow all shards (see _Cycle)
        self.pass_kept: Optional[int] = None
        self._warned = 0
        self._last_warn = 0.0

    def snapshot(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in _STAT_FIELDS], dtype=np.int64)

    def warn(self, msg: str) -> None:
        """Log ``msg`` for the first few problems of this worker, then at most every 30 s."""
        now = time.monotonic()
        if self._warned < _WARN_FIRST or now - self._last_warn >= _WARN_EVERY_S:
            self._warned += 1
            self._last_warn = now
            log.warning("%s (worker %d: %d corrupt samples, %d stream errors so far)",
                        msg, self.worker, self.corrupt, self.errors)


class CountingHandler:
    """webdataset exception handler: count, warn rate-limited, continue.

    Used for stream-level errors (unreadable shard, broken tar header, duplicate member); the
    stream goes on with the next shard. Unlike ``wds.warn_and_continue`` it never sleeps.
    """

    def __init__(self, counters: _Counters):
        self.counters = counters

    def __call__(self, exn: BaseException) -> bool:
        self.counters.errors += 1
        self.counters.warn(f"shard stream error: {type(exn).__name__}: {exn}")
        return True


def _worker_id() -> int:
    wi = torch.utils.data.get_worker_info()
    return 0 if wi is None else wi.id


def shard_order(num_shards: int, *, seed: int, epoch: int) -> List[int]:
    """The permutation of shard indices used for ``epoch``: identical on every rank (it depends on
    ``seed`` and ``epoch`` only) and stable across Python versions (string-seeded ``random``)."""
    order = list(range(num_shards))
    random.Random(f"turnctl-shards:{seed}:{epoch}").shuffle(order)
    return order


class _ShardList:
    """First stage: the shards as ``{"url": path}`` (plus ``part``/``parts`` for shared shards, see
    :func:`train_assignment`); resets this pipeline copy's counters."""

    def __init__(self, sources: Sequence[Union[str, Mapping[str, Any]]], counters: _Counters):
        self.sources = [{"url": u} if isinstance(u, str) else dict(u) for u in sources]
        self.counters = counters

    def __call__(self):
        self.counters.reset()
        self.counters.worker = _worker_id()
        for src in self.sources:
            yield dict(src)


class _EpochShuffle:
    """Seeded shard shuffle, *before* the node split: the same permutation on every rank, a new one
    every epoch, so the shard -> rank partition changes between epochs (webdataset's own shardshuffle
    runs after splitting and can only reorder a rank's fixed shards)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, src):
        shards = list(src)
        for i in shard_order(len(shards), seed=self.seed, epoch=self.epoch):
            yield shards[i]


class _SplitByRank:
    """``wds.split_by_node`` with an explicit rank (it reads RANK/WORLD_SIZE or the process group)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        for i, s in enumerate(src):
            if i % self.world_size == self.rank:
                yield s


class _Cycle:
    """Repeat this worker's shards forever, so that no worker starves before the epoch's cut.

    When a whole pass over its shards yields no sample (every one filtered out by ``keep_idx``) the
    worker falls back to cycling over *all* shards of the split, reading duplicates of other
    workers' samples rather than leaving its rank short of batches (a rank that runs out of batches
    hangs the others in their next collective). If even a pass over all shards yields nothing, the
    data contradicts ``keep_idx``: DataError.
    """

    def __init__(self, all_urls: Sequence[str], counters: _Counters):
        self.all_urls = list(all_urls)
        self.counters = counters

    def __call__(self, src):
        c = self.counters
        shards = list(src)
        fell_back = False
        while True:
            before = c.kept
            if not shards:
                kept_in_pass = 0
            else:
                for s in shards:
                    yield dict(s)
                kept_in_pass = c.kept - before
                c.passes += 1
            if kept_in_pass > 0:
                c.pass_kept = kept_in_pass
                continue
            if fell_back:
                raise DataError(
                    "no sample of the split passed the keep_idx filter: the shards do not hold the "
                    "idx being kept (shards replaced after the selection was made?)"
                )
            fell_back = True
            c.fallback = 1
            log.warning("worker %d: none of its %d shards holds a kept sample; reading all %d shards",
                        c.worker, len(shards), len(self.all_urls))
            shards = [{"url": u} for u in self.all_urls]


class _Parse:
    """Sample dict -> ``(idx, cls, clean, image_bytes, key, url)``; drops what ``keep`` excludes.

    Runs before the shuffle buffer and before decoding: the buffer then holds compressed bytes
    only, and filtered samples are never decoded. Only ASCII integers are parsed (and, for a
    ``json:FIELD`` label, JSON); nothing is unpickled. In strict (exact) mode a sample with a valid
    idx is always kept (a bad image or label becomes ``ok=False`` downstream) so that every idx
    reaches the caller exactly once. ``layout`` (turnctl/data/format.py) says where idx and label
    are: prepare's ``idx``/``cls``/``clean.cls`` members by default; for ``turnctl index`` shards,
    idx = the shard's first idx + the sample's position in it (``__pos__``, turnctl/data/tar.py).
    """

    def __init__(self, num_samples: int, num_classes: int, counters: _Counters, *,
                 keep: Optional[np.ndarray] = None, strict: bool = False,
                 layout: SampleLayout = SampleLayout()):
        self.num_samples, self.num_classes = num_samples, num_classes
        self.counters, self.keep, self.strict = counters, keep, strict
        self.tar_order = layout.idx == IDX_TAR_ORDER
        self.label_field, self.clean_member = layout.label_field, layout.clean_member
        self.first_idx = {name: (first, count) for name, first, count in layout.shards}

    def _tar_order_idx(self, s: Mapping[str, Any]) -> int:
        name = os.path.basename(s["__url__"])
        if name not in self.first_idx:
            raise ValueError(f"shard {name} is not in the manifest")
        first, count = self.first_idx[name]
        pos = s["__pos__"]
        if pos >= count:
            raise ValueError(f"sample {pos + 1} of a shard the manifest says holds {count}")
        return first + pos

    def __call__(self, src):
        c, keep, n, ncls, strict = self.counters, self.keep, self.num_samples, self.num_classes, self.strict
        tar_order, label_field, clean_member = self.tar_order, self.label_field, self.clean_member
        for s in src:
            c.read += 1
            try:
                idx = self._tar_order_idx(s) if tar_order else int(s["idx"])
            except (KeyError, ValueError) as exn:
                c.corrupt += 1
                c.warn(f"{s.get('__key__')} in {s.get('__url__')}: no valid idx ({exn!r}); dropped")
                continue
            if not 0 <= idx < n:
                c.corrupt += 1
                c.warn(f"{s['__key__']} in {s['__url__']}: idx {idx} outside [0, {n}); dropped")
                continue
            if keep is not None and not keep[idx]:
                c.filtered += 1
                continue
            try:
                cls = int(s["cls"]) if label_field == "cls" else read_label(s, label_field)
                if not 0 <= cls < ncls:
                    raise ValueError(f"{label_field} {cls} outside [0, {ncls})")
                clean = int(s[clean_member]) if clean_member in s else -1
            except (KeyError, ValueError) as exn:
                if not strict:
                    c.corrupt += 1
                    c.warn(f"{s['__key__']} in {s['__url__']}: bad label ({exn!r}); skipped")
                    continue
                cls, clean, data = 0, -1, None  # reported as ok=False, label 0
            else:
                data = None
                for ext in IMAGE_EXTS:
                    data = s.get(ext)
                    if data is not None:
                        break
            c.kept += 1
            yield (idx, cls, clean, data, s["__key__"], s["__url__"])


class _SampleShuffle:
    """Shuffle buffer over the (still compressed) samples, seeded per (seed, epoch, rank, worker).

    Like ``wds.shuffle`` but bounded by one pass of this worker's data once that size is known:
    with cycling streams a buffer larger than a worker's data would fill with duplicates and read
    the shards many times over before yielding anything.
    """

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int, counters: _Counters):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank
        self.counters = counters

    def __call__(self, src):
        c = self.counters
        rng = random.Random(f"turnctl-samples:{self.seed}:{self.epoch}:{self.rank}:{_worker_id()}")
        buf: List[Any] = []
        for s in src:
            buf.append(s)
            cap = self.bufsize if c.pass_kept is None else max(1, min(self.bufsize, c.pass_kept))
            while len(buf) >= cap:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _Decode:
    """Decode + transform in the worker. ``skip=True`` (train): undecodable samples are counted and
    dropped. ``skip=False`` (exact): they become a zero image with ``ok=False``.

    Raw samples are pulled ``chunk`` at a time and then decoded back to back: alternating tar
    parsing and image decoding sample by sample was measurably slower (~5% at CIFAR sizes; the two
    compete for the CPU's caches), see benchmarks/bench_reader.py. The upstream counters (read,
    filtered) therefore run up to ``chunk`` samples ahead of the batches; ``corrupt`` does not.
    """

    def __init__(self, transform: Callable, counters: _Counters, *, skip: bool,
                 max_consecutive: Optional[int] = None, chunk: int = DECODE_CHUNK):
        self.transform, self.counters, self.skip, self.chunk = transform, counters, skip, chunk
        self.max_consecutive = MAX_CONSECUTIVE_CORRUPT if max_consecutive is None else max_consecutive

    def _zero(self, like: Optional[torch.Tensor]) -> torch.Tensor:
        """Zeros shaped like the transform's output (the last good one, else a blank image's)."""
        if like is None:
            like = self.transform(Image.new("RGB", (32, 32)))
        return torch.zeros_like(like)

    def __call__(self, src):
        c, transform, skip = self.counters, self.transform, self.skip
        last: Optional[torch.Tensor] = None
        in_a_row = 0
        it = iter(src)
        while True:
            chunk = list(islice(it, self.chunk))
            if not chunk:
                return
            for idx, cls, clean, data, key, url in chunk:
                try:
                    if data is None:
                        raise ValueError("no image member (jpg/jpeg/png/webp) or bad label")
                    x = transform(decode_image(data))
                except Exception as exn:  # noqa: BLE001 -- any decode/transform failure is per sample
                    c.corrupt += 1
                    c.warn(f"{key} in {url}: cannot decode ({type(exn).__name__}: {exn})")
                    if not skip:
                        yield idx, cls, clean, 0, self._zero(last)
                        continue
                    in_a_row += 1
                    if in_a_row >= self.max_consecutive:
                        raise DataError(
                            f"{in_a_row} undecodable samples in a row (last: {key} in {url}: {exn}); "
                            f"the shards or the transform are broken"
                        ) from exn
                    continue
                last = x
                in_a_row = 0
                yield idx, cls, clean, 1, x

