"""One pass over a split, every rank its share, in lockstep, gathered by idx.

Feature extraction, TURN's per-sample loss pass and evaluation are the same loop: run a forward over
every sample of a split exactly once across ranks, collect per-sample outputs, and gather them keyed
by ``idx`` with a coverage check. Ranks run the *same number* of forwards (the reader pads short
ranks with rows whose idx is -1), because under ZeRO-3 a forward is itself a collective.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

from turnctl import distributed as dist
from turnctl.logger import track
from turnctl.data import SplitInfo, exact_loader

Collect = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


@torch.no_grad()
def per_sample_pass(
    forward: Callable[[torch.Tensor], torch.Tensor],
    info: SplitInfo,
    *,
    transform,
    batch_size: int,
    num_workers: int,
    collect: Collect,
    device: Optional[torch.device] = None,
    input_dtype: torch.dtype = torch.float32,
    dst: Optional[int] = None,
    what: str = "pass",
) -> Optional[Dict[str, np.ndarray]]:
    """Run ``forward`` over every sample of ``info`` once and gather ``collect``'s outputs by idx.

    ``collect(output, batch)`` returns per-row tensors; ``cls``, ``clean`` and ``ok`` from the
    shards are always gathered too. Returns numpy arrays in idx order on every rank (``dst=None``)
    or on rank ``dst`` only (None elsewhere).

    >>> out = per_sample_pass(model, info, transform=t, batch_size=256, num_workers=2,
    ...                       collect=lambda logits, b: {"pred": logits.argmax(1)})  # doctest: +SKIP
    >>> out["pred"].shape == (info.num_samples,)  # doctest: +SKIP
    """
    device = device or dist.compute_device()
    loader = exact_loader(info, transform=transform, batch_size=batch_size, rank=dist.rank(),
                          world_size=dist.world_size(), num_workers=num_workers)
    # The outputs go into buffers sized once for this rank's share (loader.steps full batches at
    # most), not into a list of small per-batch tensors: those stay alive in the holes the batch's
    # freed logits leave, so the heap could never reuse them and grew by ~5 KiB per sample (7.5 GiB
    # on a rank at 2.4M samples; benchmarks/RESULTS.md, bench_scale.py).
    capacity = loader.steps * batch_size
    buffers: Dict[str, torch.Tensor] = {}
    idx_buffer = torch.empty(capacity, dtype=torch.long)
    n = 0
    for batch in track(loader, f"{what} [{info.split}]", total=loader.steps, batch_size=batch_size * dist.world_size()):
        x = batch["image"].to(device=device, dtype=input_dtype, non_blocking=True)
        output = forward(x)
        real = batch["idx"] >= 0
        rows = int(real.sum())
        if not rows:
            continue  # a padding batch: its forward only kept ZeRO-3's collectives in step
        values = dict(collect(output, batch))
        values.update(cls=batch["cls"], clean=batch["clean"], ok=batch["ok"])
        if n + rows > capacity:  # more rows than the sizes promised (a bad shard): grow, and let the
            capacity = max(2 * capacity, n + rows)  # coverage check below name what is wrong
            idx_buffer = _grown(idx_buffer, n, capacity)
            buffers = {k: _grown(b, n, capacity) for k, b in buffers.items()}
        for k, v in values.items():
            v = v.detach().cpu()[real]
            if k not in buffers:
                buffers[k] = torch.empty((capacity,) + tuple(v.shape[1:]), dtype=v.dtype)
            buffers[k][n:n + rows] = v
        idx_buffer[n:n + rows] = batch["idx"][real]
        n += rows
    if n:
        idx = idx_buffer[:n]
        local = {k: b[:n] for k, b in buffers.items()}
    else:  # a rank that only padded (more ranks than shards) still joins every gather
        idx = torch.zeros(0, dtype=torch.long)
        local = None
    local = _agree_on_schema(local)
    return dist.gather_by_idx(idx, local, num_samples=info.num_samples, what=f"{what} [{info.split}]", dst=dst)


def _grown(buffer: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    out = torch.empty((capacity,) + tuple(buffer.shape[1:]), dtype=buffer.dtype)
    out[:filled] = buffer[:filled]
    return out


def _agree_on_schema(local: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A rank without samples needs empty tensors of the right shape and dtype for the gathers."""
    schema = None if local is None else {k: (tuple(v.shape[1:]), v.dtype) for k, v in local.items()}
    schemas = [s for s in dist.all_gather_object(schema) if s is not None]
    if not schemas:
        raise RuntimeError("no rank produced any sample")
    if local is not None:
        return local
    return {k: torch.zeros((0,) + shape, dtype=dtype) for k, (shape, dtype) in schemas[0].items()}
