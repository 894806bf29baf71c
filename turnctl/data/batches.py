"""Batches, and how they cross from DataLoader workers to the main process.

:class:`_Batch` (the last pipeline stage) packs the small per-row fields into one numpy array and,
in a DataLoader worker, stacks the images into a few recycled shared-memory buffers
(:class:`_ShmPool`) instead of a fresh shared tensor per batch (measured: see
benchmarks/bench_reader.py and benchmarks/results/reader.json). :func:`_stream` runs a pipeline in
this process or in workers and hands the buffers back; :func:`_unpack` turns a packed batch into
the loaders' dict of tensors; :func:`_sum_stats` adds up the workers' counters.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import webdataset as wds

from turnctl.data.stages import _STAT_FIELDS, _Counters

# Rows of the packed metadata array that crosses the worker -> main process boundary.
_M_IDX, _M_CLS, _M_CLEAN, _M_OK = range(4)


class _Batch:
    """Collate to ``{"image": Tensor[B,3,H,W], "meta": int64[4,B], "stats": int64[...]}``.

    The small per-row fields travel as one numpy array (pickled inline) rather than four tensors
    (each tensor crossing the worker boundary costs a shared-memory segment); the main process
    unpacks them (:func:`_unpack`). ``stats`` is this worker's running counters at the moment the
    batch was made: the main process keeps the last one it consumed per worker. With ``partial``
    (finite, exact-mode streams) the last short batch is emitted too, followed by a stats-only
    trailer ``{"stats": ...}`` so that the final counts arrive even from a worker that made no batch.

    In a DataLoader worker the images are stacked into recycled shared-memory buffers
    (:class:`_ShmPool`) instead of a fresh tensor per batch.
    """

    def __init__(self, batch_size: int, counters: _Counters, *, partial: bool):
        self.batch_size, self.counters, self.partial = batch_size, counters, partial
        self.pool: Optional[_ShmPool] = None

    def _emit(self, rows):
        meta = np.array([r[:4] for r in rows], dtype=np.int64).T.copy()  # rows contiguous
        xs = [r[4] for r in rows]
        out = {"meta": meta, "stats": self.counters.snapshot()}
        if torch.utils.data.get_worker_info() is not None:
            if self.pool is None:
                self.pool = _ShmPool(self.batch_size)
            slot, buf = self.pool.take(len(xs), xs[0])
            if buf is not None:
                torch.stack(xs, out=buf[:len(xs)])
                out.update(slot=slot, pool=self.pool.generation, rows=len(xs))
                if slot not in self.pool.sent:  # first use: the buffer itself travels (once)
                    self.pool.sent.add(slot)
                    out.update(image=buf, flags=self.pool.flags)
                return out
        out["image"] = torch.stack(xs)
        return out

    def __call__(self, src):
        rows: List[Any] = []
        for r in src:
            rows.append(r)
            if len(rows) == self.batch_size:
                yield self._emit(rows)
                rows = []
        if self.partial:
            if rows:
                yield self._emit(rows)
            yield {"stats": self.counters.snapshot()}


# Buffers per worker: the DataLoader keeps at most prefetch_factor (2) batches of a worker in flight,
# plus the one being built.
_POOL_SLOTS = 3


class _ShmPool:
    """A worker's recycled shared-memory batch buffers.

    A tensor sent from a worker goes through shared memory; a fresh segment per batch means the
    kernel maps and zeroes every page again, which measured ~3 ms per 3 MB batch (about as long as
    decoding 15 CIFAR JPEGs): 20% of a worker's time at 64 px. Instead each worker stacks into one of
    a few buffers that stay mapped in both processes; the main process copies the batch out and
    clears the slot's flag (:func:`_stream`), so a buffer is only refilled after it was copied. A
    buffer crosses the process boundary once (its first batch); later batches name it by
    ``(pool generation, slot)``: passing a tensor costs a file-descriptor hand-over each time. If
    no slot is free (it cannot happen with the DataLoader's prefetch limit) a fresh tensor is used.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.key: Optional[Tuple[Any, ...]] = None
        self.bufs: List[torch.Tensor] = []
        self.flags: Optional[torch.Tensor] = None
        self._flags_np: Optional[np.ndarray] = None
        self.generation = 0          # bumped when the buffers are replaced (new image shape)
        self.sent: set = set()       # slots whose buffer the main process already holds

    def take(self, n: int, x0: torch.Tensor) -> Tuple[Optional[int], Optional[torch.Tensor]]:
        key = (tuple(x0.shape), x0.dtype)
        if key != self.key:
            try:
                self.bufs = [torch.empty((self.batch_size,) + key[0], dtype=x0.dtype).share_memory_()
                             for _ in range(_POOL_SLOTS)]
            except RuntimeError:  # no shared memory to spare: plain tensors
                self.key = None
                return None, None
            self.flags = torch.zeros(_POOL_SLOTS, dtype=torch.int32).share_memory_()
            self._flags_np = self.flags.numpy()
            self.key = key
            self.generation += 1
            self.sent = set()
        flags = self._flags_np
        for j in range(_POOL_SLOTS):
            if flags[j] == 0:
                flags[j] = 1
                return j, self.bufs[j]
        return None, None


def _identity(x):
    return x


def _unpack(b: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    meta = b["meta"]
    return {
        "image": b["image"],
        "idx": torch.from_numpy(meta[_M_IDX]),
        "cls": torch.from_numpy(meta[_M_CLS]),
        "clean": torch.from_numpy(meta[_M_CLEAN]),
        "ok": torch.from_numpy(meta[_M_OK].astype(bool)),
    }


def _stream(pipeline: wds.DataPipeline, num_workers: int, *, generator: Optional[torch.Generator] = None,
            mp_context: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """The pipeline's batches, in this process (``num_workers == 0``) or from DataLoader workers.

    With workers, batches come round-robin from worker 0, 1, ...; a worker whose stream ends is
    skipped. Closing this generator (the loaders stop at ``.steps``) shuts the workers down.
    """
    if num_workers == 0:
        it = iter(pipeline)
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
        persistent_workers=False, prefetch_factor=2, generator=generator,
        multiprocessing_context=mp_context,
    )
    it = iter(loader)
    # The workers' pool buffers, by (worker, pool generation, slot): see _ShmPool.
    held: Dict[Tuple[int, int, int], Any] = {}
    try:
        for b in it:
            slot = b.pop("slot", None)
            if slot is not None:
                key = (int(b["stats"][0]), b.pop("pool"), slot)
                if "flags" in b:  # the first batch in this buffer brings the buffer itself
                    held[key] = (b.pop("image"), b.pop("flags"))
                buf, flags = held[key]
                b["image"] = buf[:b.pop("rows")].clone()  # copy out, then hand the buffer back
                flags[slot] = 0
            yield b
    finally:
        held.clear()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _sum_stats(last: Dict[int, np.ndarray]) -> Dict[str, int]:
    out = {f: 0 for f in _STAT_FIELDS if f != "worker"}
    for snap in last.values():
        for f, v in zip(_STAT_FIELDS, snap.tolist()):
            if f == "passes":
                out[f] = max(out[f], v)
            elif f != "worker":
                out[f] += v
    return out
