"""Loss hooks for full fine-tuning: FFT-GCE and FFT-ELR (FineTuner.train_epoch's ``loss_fn``).

``FineTuner.train_epoch(..., loss_fn=hook)`` calls ``hook(logits, y, batch)`` for every micro-batch
of every rank and expects per-sample losses ``[B]`` (it averages them). :func:`fft_loss_hook` builds
the hook for a loss name; CE keeps the tuner's built-in loss (``None``).

ELR under several ranks (our choice)
-------------------------------------------------------------
ELR keeps one running target per sample, ``t_i <- beta t_i + (1 - beta) p_i / sum(p_i)``, and each
rank sees different samples. :class:`SyncedELR` keeps the **full** target table (N x C, float32,
on the CPU: host memory is larger than a GPU's, and a step only moves B rows) on **every** rank and
keeps the copies identical by exchanging every micro-step's updates:

1. the rank computes its batch's new rows ``beta * t[idx] + (1 - beta) * p`` from its table (which
   holds every rank's updates up to the previous step) and uses them in the loss, exactly as the
   single-process ELR does;
2. all ranks all-gather their ``(idx, p)`` (one collective of ``B x (C + 1)`` floats per rank and
   micro-step; every rank takes the same number of steps, so the collective is always matched);
3. every rank applies all ranks' updates in rank order to its table.

Why per step and not a reduction of the epoch's deltas at the epoch end: the training reader may
repeat a sample within an epoch (it cycles short shards to keep step counts equal), possibly on two
ranks; summing deltas would then be wrong, and a sample's second visit would not see its first.
Per step, a sample seen on rank 0 at step 3 and on rank 1 at step 5 sees its step-3 update, as in
one process. With one rank, the table and losses equal :class:`turnctl.losses.ELRTargets`'.
At every epoch end the ranks compare a SHA-256 of their tables (:meth:`SyncedELR.check_consistent`);
a difference is an error. The table is checkpointed next to the DeepSpeed checkpoint
(``<checkpoints>/epoch_E/elr_targets.pt``, written by rank 0 before the engine's checkpoint, so a
``latest`` tag always has it) and loaded by every rank on ``--resume``, so a resumed run continues
with exactly the targets an uninterrupted one would have.

>>> import torch
>>> elr = SyncedELR(4, 2, beta=0.5, lam=1.0)
>>> losses = elr(torch.zeros(2, 2), torch.tensor([0, 1]), {"idx": torch.tensor([3, 1])})
>>> elr.targets[3].tolist(), tuple(losses.shape)
([0.25, 0.25], (2,))
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from turnctl import distributed as dist
from turnctl.errors import DistributedError, TurnctlError
from turnctl.losses import ELR_CLAMP, ELRTargets, elr_regulariser, gce_loss, per_sample_ce
from turnctl.recipe import LossSection
from turnctl.rundir import atomic_path
from turnctl.safeload import torch_load

ELR_FILE = "elr_targets.pt"

Gather = Callable[[torch.Tensor], List[torch.Tensor]]


def gce_hook(*, q: float = 0.7, form: str = "literal") -> Callable:
    """``loss_fn`` for FFT-GCE: per-sample GCE (``losses.gce_q``, ``losses.gce_form``).

    >>> hook = gce_hook(q=0.5)
    >>> [round(v, 4) for v in hook(torch.zeros(1, 2), torch.tensor([0]), {}).tolist()]  # (1 - 0.5 ** 0.5) / 0.5
    [0.5858]
    """

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return gce_loss(logits, y, q=q, form=form, reduction="none")

    return loss_fn


def elr_apply_updates(targets: torch.Tensor, updates: Sequence[Tuple[torch.Tensor, torch.Tensor]], *,
                      beta: float) -> None:
    """Apply ``t[idx] <- beta * t[idx] + (1 - beta) * p`` for each ``(idx, p)`` in order, in place.

    ``p`` rows are already clamped and normalised. Within one update a repeated idx takes its last
    row (like ``ELRTargets.update``); across updates they compound in the given (rank) order.

    >>> t = torch.zeros(3, 2)
    >>> elr_apply_updates(t, [(torch.tensor([0]), torch.tensor([[1.0, 0.0]])),
    ...                       (torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [0.5, 0.5]]))], beta=0.5)
    >>> t.tolist()  # row 0: 0.5 * (0.5 * 0 + 0.5 * (1, 0)) + 0.5 * (0, 1)
    [[0.25, 0.5], [0.0, 0.0], [0.25, 0.25]]
    """
    for idx, p in updates:
        if idx.numel() == 0:
            continue
        idx = idx.long().cpu()
        rows = beta * targets.index_select(0, idx) + (1.0 - beta) * p.to(targets.dtype).cpu()
        targets[idx] = rows


def normalised_probs(logits: torch.Tensor) -> torch.Tensor:
    """ELR's ``p / sum(p)`` with ``p = clamp(softmax(z), 1e-4, 1 - 1e-4)``, detached, float32."""
    p = torch.softmax(logits.detach().float(), dim=1).clamp(*ELR_CLAMP)
    return p / p.sum(dim=1, keepdim=True)


def _all_gather_rows(t: torch.Tensor) -> List[torch.Tensor]:
    return [part.cpu() for part in dist.all_gather_variable(t)]


class SyncedELR(ELRTargets):
    """ELR targets for every sample on every rank, kept identical across ranks (module docstring).

    The table, its validation and its state dict are :class:`turnctl.losses.ELRTargets`'s (kept on
    the CPU here); what differs is the update, which applies every rank's batch, and the call
    signature, which is FineTuner's ``loss_fn(logits, y, batch)``.

    Use as FineTuner's ``loss_fn``: ``elr(logits, y, batch)`` returns per-sample
    ``CE_i + lam * log(1 - <t_i, p_i>)`` and updates the table with every rank's batch. ``gather``
    (tests) replaces the all-gather: it receives this rank's ``[B, C + 1]`` float64 rows (idx, p)
    and returns every rank's, in rank order.
    """

    def __init__(self, num_samples: int, num_classes: int, *, beta: float, lam: float,
                 gather: Optional[Gather] = None):
        super().__init__(num_samples, num_classes, beta=beta, lam=lam, device=torch.device("cpu"))
        self.gather = gather or _all_gather_rows

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        idx = torch.as_tensor(batch["idx"]).long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise TurnctlError(f"ELR: batch idx outside [0, {self.num_samples}); the shards do not match the run")
        p = normalised_probs(logits)
        # 1. this batch's rows, from the table as of the previous step (all ranks' updates in it)
        rows = self.beta * self.targets.index_select(0, idx) + (1.0 - self.beta) * p.cpu()
        values = per_sample_ce(logits, y) + self.lam * elr_regulariser(
            logits, rows.to(logits.device), reduction="none")
        # 2.-3. everyone's (idx, p), applied in rank order (float64 carries idx exactly to 2^53)
        mine = torch.cat([idx.double()[:, None], p.double().cpu()], dim=1)
        parts = self.gather(mine)
        elr_apply_updates(self.targets, [(part[:, 0].long(), part[:, 1:].float()) for part in parts],
                          beta=self.beta)
        return values

    # ---- consistency and checkpoints -----------------------------------------------------------
    def digest(self) -> str:
        return hashlib.sha256(self.targets.contiguous().numpy().tobytes()).hexdigest()[:16]

    def check_consistent(self) -> None:
        """All ranks compare table digests (collective); a difference raises on every rank."""
        digests = dist.all_gather_object(self.digest())
        if len(set(digests)) > 1:
            raise DistributedError("ELR targets differ between ranks (" + ", ".join(
                f"rank {r}: {d}" for r, d in enumerate(digests)) + "); the per-step exchange lost an update")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        t = state["targets"]
        if tuple(t.shape) != (self.num_samples, self.num_classes):
            raise TurnctlError(f"ELR targets of shape {tuple(t.shape)} do not fit this run "
                               f"({self.num_samples} x {self.num_classes})")
        self.targets = t.to(torch.float32).cpu().clone()

    def save(self, tag_dir: Path) -> None:
        """Rank 0 writes ``tag_dir/elr_targets.pt`` (temp name, then rename); others do nothing."""
        if dist.rank() != 0:
            return
        with atomic_path(Path(tag_dir) / ELR_FILE) as tmp:
            torch.save(self.state_dict(), tmp)

    def load(self, tag_dir: Path) -> None:
        """Every rank reads ``tag_dir/elr_targets.pt`` (the checkpoint directory is shared, as
        DeepSpeed's own checkpoint requires); a missing file is an error, not a silent reset."""
        path = Path(tag_dir) / ELR_FILE
        if not path.is_file():
            raise TurnctlError(f"--resume: {path} is missing; the ELR targets of that checkpoint are lost, "
                               "start the run again")
        # weights_only: a tensor table needs nothing else, and a planted pickle is refused, one line.
        state = torch_load(path, what="the ELR targets of that checkpoint are unusable")
        if not isinstance(state, Mapping) or not isinstance(state.get("targets"), torch.Tensor):
            raise TurnctlError(f"{path}: not an ELR targets file (no 'targets' tensor)")
        self.load_state_dict(state)


def fft_loss_hook(name: str, *, losses: LossSection, num_samples: int, num_classes: int):
    """``(loss_fn, elr_state)`` for a fine-tuning loss name: ``ce`` -> ``(None, None)`` (the tuner's
    CE), ``gce`` -> a :func:`gce_hook`, ``elr`` -> a :class:`SyncedELR` (both roles).

    >>> fft_loss_hook("ce", losses=LossSection(), num_samples=3, num_classes=2)
    (None, None)
    """
    if name == "ce":
        return None, None
    if name == "gce":
        return gce_hook(q=losses.gce_q, form=losses.gce_form), None
    if name == "elr":
        elr = SyncedELR(num_samples, num_classes, beta=losses.elr_beta, lam=losses.elr_lambda)
        return elr, elr
    raise ValueError(f"unknown fine-tuning loss {name!r} (expected ce, gce or elr)")
