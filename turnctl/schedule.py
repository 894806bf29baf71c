"""The one learning-rate schedule: the LR at a point of training *progress*.

Every trainer in turnctl asks it: the linear probe and NMTune (a per-step table, :func:`lr_schedule`),
DivideMix's and UNICON's heads and full fine-tuning (:func:`lr_at` at the fraction of training done).
Progress, not a step count, because after their warm-up the epochs of DivideMix and UNICON, and
every epoch of TURN (a clean subset redrawn each time), have data-dependent lengths: the total
number of steps is not known when training starts, the fraction of epochs done is
(turnctl/finetune.py says how fine-tuning counts it).

Shape: optional linear warmup over the first ``warmup_ratio`` of the progress (Hugging Face's
cosine schedule with warmup), then cosine from the base LR to 0, or constant, over the rest. The
legacy ``warmup_steps`` of older fine-tuning recipes (a ramp over the first N optimizer steps,
multiplied into the cosine) is kept so that their runs reproduce.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_at(*, base_lr: float, schedule: str, progress: float, warmup_ratio: float = 0.0,
          warmup_steps: int = 0, global_step: int = 0) -> float:
    """The learning rate at ``progress`` (the fraction of training done, clipped to [0, 1]).

    ``warmup_ratio`` > 0: linear from 0 to ``base_lr`` over the first ``warmup_ratio`` of the
    progress, then ``schedule`` over the rest. ``warmup_steps`` > 0 (legacy): the schedule over all
    of the progress times a linear ramp over the first ``warmup_steps`` optimizer steps of the run
    (``global_step`` counts them from 0).

    >>> round(lr_at(base_lr=1.0, schedule="cosine", progress=0.5), 6), lr_at(base_lr=1.0, schedule="constant", progress=0.5)
    (0.5, 1.0)
    >>> lr_at(base_lr=1.0, schedule="cosine", progress=0.05, warmup_ratio=0.1)
    0.5
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be constant or cosine, got {schedule!r}")
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return base_lr * progress / warmup_ratio
    rest = (progress - warmup_ratio) / (1.0 - warmup_ratio)
    scale = 0.5 * (1.0 + math.cos(math.pi * rest)) if schedule == "cosine" else 1.0
    if warmup_steps > 0 and global_step < warmup_steps:
        scale *= (global_step + 1) / warmup_steps
    return base_lr * scale


def lr_schedule(lr: float, total_steps: int, schedule: str) -> torch.Tensor:
    """Per-step learning rates (float32) of a run of ``total_steps`` equal steps: step ``t`` trains at
    :func:`lr_at` of progress ``t / total_steps``, so the cosine runs from ``lr`` towards 0.

    >>> lr_schedule(1.0, 4, "cosine").tolist()
    [1.0, 0.8535534143447876, 0.5, 0.1464466154575348]
    """
    total = max(total_steps, 1)
    return torch.tensor([lr_at(base_lr=lr, schedule=schedule, progress=t / total) for t in range(total)],
                        dtype=torch.float64).to(torch.float32)
