"""Losses for noisy labels: CE, GCE and ELR, as flat functions on logits.

All losses compute in float32 whatever the logits' dtype (bf16 logits under DeepSpeed would lose
the small probabilities GCE and ELR depend on), and avoid host syncs and data-dependent shapes, so
they can run inside a captured CUDA graph (the linear probe does that).

GCE (Zhang & Sabuncu, 2018) with ``p_y`` the softmax probability of the given label:

* ``form="literal"`` (default, what the TURN paper writes): ``L = (1 - p_y^q) / q``, in [0, 1/q].
* ``form="surrogate"``: ``L = q * sg(p_y^q) * CE``, ``sg`` = stop-gradient (``detach``). Since
  ``d/dθ (1 - p^q)/q = -p^(q-1) dp = p^q * d(-log p) = p^q * dCE``, the surrogate's gradient is
  exactly ``q`` times the literal's; its *value* is not the GCE value (it is unbounded like CE),
  so report the literal for loss curves. Some code bases train with this form; it behaves like
  the literal loss with the learning rate multiplied by ``q``.

ELR (Liu et al., 2020): a per-sample running target ``t_i`` keyed by the sample's ``idx``;
see :class:`ELRTargets`.

>>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
>>> y = torch.tensor([0, 1])
>>> round(float(gce_loss(logits, y, q=1.0)), 4)  # q = 1: mean(1 - p_y)
0.3096
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
GCE_FORMS = ("literal", "surrogate")
ELR_CLAMP = (1e-4, 1.0 - 1e-4)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross entropy ``-log p_y``, computed in float32.

    >>> round(float(cross_entropy(torch.zeros(1, 4), torch.tensor([2]))), 4)  # log 4
    1.3863
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.cross_entropy(logits.float(), y, reduction=reduction)


def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE per sample, shape [B], float32: the input of the per-class GMM cleansing step.

    >>> per_sample_ce(torch.zeros(2, 2), torch.tensor([0, 1])).tolist() == [0.6931471824645996] * 2
    True
    """
    return F.cross_entropy(logits.float(), y, reduction="none")


def gce_loss(logits: torch.Tensor, y: torch.Tensor, *, q: float = 0.7, form: str = "literal",
             reduction: str = "mean") -> torch.Tensor:
    """Generalized cross entropy; ``form`` picks the literal value or the CE surrogate (module doc).

    ``p_y^q`` is evaluated as ``exp(q * log_softmax)`` and the literal as ``-expm1(q log p_y) / q``,
    which stays accurate when ``p_y`` is close to 1 (where ``1 - p^q`` cancels).

    >>> logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    >>> round(float(gce_loss(logits, y, q=0.5)), 4)  # (1 - 0.5 ** 0.5) / 0.5
    0.5858
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if form not in GCE_FORMS:
        raise ValueError(f"form must be one of {GCE_FORMS}, got {form!r}")
    logp_y = F.log_softmax(logits.float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    if form == "literal":
        values = -torch.expm1(q * logp_y) / q
    else:
        values = q * torch.exp(q * logp_y).detach() * (-logp_y)
    return _reduce(values, reduction)


def elr_regulariser(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """``log(1 - <t_i, p_i>)`` with ``p`` the softmax clamped to [1e-4, 1 - 1e-4] (ELR's code).

    ``targets`` are the rows ``t_i`` of this batch (already updated, no gradient). The clamp keeps
    ``1 - <t, p>`` away from 0; the gradient flows through ``p`` where it is not clamped.
    """
    p = torch.softmax(logits.float(), dim=1).clamp(*ELR_CLAMP)
    return _reduce(torch.log(1.0 - (targets * p).sum(dim=1)), reduction)


class ELRTargets:
    """Early-learning regularisation state: one running target per sample, keyed by ``idx``.

    For a batch with logits ``z``, labels ``y`` and sample keys ``idx``::

        p   = clamp(softmax(z), 1e-4, 1 - 1e-4)                 (detached for the update)
        t_i <- beta * t_i + (1 - beta) * p_i / sum(p_i)         (before the loss, as ELR's code)
        L   = CE(z, y) + lam * mean_i log(1 - <t_i, p_i>)

    Targets start at 0 (the first update gives ``(1 - beta) p``). Paper settings: CIFAR-100
    ``beta=0.9, lam=7``; CIFAR-10 ``beta=0.7, lam=3``. The table lives on the device of the first
    logits it sees; :meth:`state_dict` / :meth:`load_state_dict` carry it across a resume.

    Under several ranks each rank updates only the rows of its own samples; to checkpoint, gather
    rows by idx (``turnctl.distributed.gather_by_idx``) or save per rank.

    >>> elr = ELRTargets(4, 2, beta=0.5, lam=1.0)
    >>> loss = elr(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([3, 1]))
    >>> elr.targets[3].tolist()  # 0.5 * 0 + 0.5 * [0.5, 0.5]
    [0.25, 0.25]
    """

    def __init__(self, num_samples: int, num_classes: int, *, beta: float, lam: float,
                 device: Optional[torch.device] = None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.beta, self.lam = float(beta), float(lam)
        self.targets = torch.zeros(self.num_samples, self.num_classes, dtype=torch.float32,
                                   device=device)

    def to(self, device) -> "ELRTargets":
        self.targets = self.targets.to(device)
        return self

    @torch.no_grad()
    def update(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Move ``t_idx`` towards the batch's normalised, clamped softmax; return the new rows."""
        if self.targets.device != logits.device:
            self.targets = self.targets.to(logits.device)
        p = torch.softmax(logits.detach().float(), dim=1).clamp(*ELR_CLAMP)
        p = p / p.sum(dim=1, keepdim=True)
        idx = idx.to(logits.device)
        rows = self.beta * self.targets[idx] + (1.0 - self.beta) * p
        self.targets[idx] = rows
        return rows

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *,
                 reduction: str = "mean") -> torch.Tensor:
        """Update the targets of ``idx`` and return ``CE + lam * log(1 - <t, p>)``.

        With ``reduction="none"`` the per-sample values ``CE_i + lam * log(1 - <t_i, p_i>)``.
        """
        rows = self.update(logits, idx)
        values = per_sample_ce(logits, y) + self.lam * elr_regulariser(logits, rows, reduction="none")
        return _reduce(values, reduction)

    def state_dict(self) -> Dict[str, Any]:
        return {"targets": self.targets.detach().cpu(), "beta": self.beta, "lam": self.lam,
                "num_samples": self.num_samples, "num_classes": self.num_classes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        t = state["targets"]
        if tuple(t.shape) != (self.num_samples, self.num_classes):
            raise ValueError(
                f"ELR state has targets of shape {tuple(t.shape)}, expected "
                f"({self.num_samples}, {self.num_classes}): it belongs to another dataset"
            )
        self.targets = t.to(device=self.targets.device, dtype=torch.float32).clone()
        self.beta, self.lam = float(state.get("beta", self.beta)), float(state.get("lam", self.lam))
