"""UNICON as a linear probe (lp-unicon): two linear heads on cached features, uniform selection.

UNICON (Karim et al., CVPR 2022), LP only as in the TURN paper. After ``warmup_epochs`` epochs of
CE for both heads (batches of ``warmup_batch_factor`` x B, plus the confidence penalty
``mean sum p log p`` when ``warmup_penalty``), every epoch, for head A then head B (the scores are
recomputed in between, as UNICON's training loop does):

1. **Score.** ``d_i = JSD(p_i, onehot(y_i))`` with ``p_i`` the mean of the two heads' softmax on the
   (unaugmented) feature, in **natural** logarithms as UNICON's code computes it:
   ``KL(a || m) = sum a ln((a + 1e-10) / (m + 1e-10))``, ``JSD = KL(p || m) / 2 + KL(q || m) / 2``,
   ``m = (p + q) / 2``; so ``0 <= d <= ln 2 = 0.693``.
2. **Uniform selection.** ``threshold = mean(d)``, lowered to ``mean - (mean - min(d)) / tau`` when
   the mean exceeds ``d_u`` (with natural-log JSD the mean cannot exceed UNICON's ``d_u = 0.7``, so
   in the original, as here, the cut never fires at that value); selection rate
   ``SR = |{d < threshold}| / N``; in every class c (of the given labels) keep the
   ``int(SR * N / C)`` samples with the lowest ``d`` (all of them when the class is smaller): the
   labeled set, the rest is unlabeled. Label-refinement weights ``w_i = 1 - d_i``, except ``w_i = 1``
   where ``d_i < 0.5`` (UNICON's "weight adjustment", the same 0.5 on the natural-log scale).
3. **Train** the head, one pass over the labeled set in batches of B (the short last batch dropped,
   as UNICON's loader) with unlabeled batches of ``int(B / (k * SR))`` (``k = unlabeled_batch_k``:
   2 in UNICON's CIFAR loader, 1 in its authors' high-noise setting; B when null, as its
   Clothing1M/WebVision loaders), four views per sample (two weak, two strong): co-guessing on two
   views of u with both heads, co-refinement on two views of x, MixMatch on the other two
   (``Lx + lambda_u * rampup * Lu + KL(uniform || mean prediction)``, or without ``Lu`` when
   ``mixmatch_rows`` is "labeled") plus ``lambda_c`` times the SimCLR (NT-Xent) loss between those
   two views of u at temperature 0.05. ``guess_views``: "weak" (CIFAR) guesses on the weak views and
   mixes/contrasts the strong ones; "strong" (Clothing1M/WebVision scripts) the reverse.

The per-dataset values the original uses are keys of the recipe section
(:class:`turnctl.recipe.UniconSection` lists them).

Where this differs from the original, and why:

* views are made in feature space (see :mod:`turnctl.methods.common`): weak = dropout ``p`` and
  jitter ``s``; strong = both multiplied by ``strong_factor`` (2); the backbone never runs again;
* **the contrastive embedding is the head's output** (the L2-normalised logits). UNICON puts a
  projection head on the encoder and the contrastive loss trains the encoder; here the encoder is
  frozen, so a separate projection head would receive the contrastive gradient alone and leave the
  classifier untouched (the loss would be a no-op). Applied to the logits, it asks the classifier
  to map two views of a sample to the same direction and different samples apart. The loss itself is
  UNICON's ``SupConLoss`` without labels (temperature = base temperature = 0.05);
* warm-up 5 of the 20 LP epochs and the probe's optimizer/lr/batch size/schedule, as for DivideMix
  (the original: 10 or 30 of 350 epochs, SGD 0.02, cosine over 280); the 16-epoch ramp-up of
  ``lambda_u`` does not complete within 15 SSL epochs;
* an unlabeled batch larger than the unlabeled set is cut to the set's size (the original's loader,
  which drops short batches, would have none and stop); a labeled set smaller than one batch is used
  as one short batch (the original's would train zero steps); an empty selection skips the head
  for the epoch (the original divides by SR = 0);
* the original fills its labeled index array with zeros where the per-class counts do not add up
  to ``int(SR * N)`` (sample 0 repeated in the labeled set); not reproduced.

The loop both methods share, with an example of each, is turnctl/methods/twohead.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from turnctl.methods.common import Head, mixmatch_batch, mixmatch_terms, warmup_epoch
from turnctl.methods.twohead import HeadPairResult, TwoHeadMethod
from turnctl.recipe import UniconSection

log = logging.getLogger("turnctl")

_KL_EPS = 1e-10  # UNICON's kl_divergence: p * ln((p + eps) / (q + eps))
# UNICON's "weight adjustment": a selected sample with JSD below this gets refinement weight 1.
_FULL_WEIGHT_BELOW = 0.5


def jsd_to_labels(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between each row of ``probs`` and its
    one-hot label, as UNICON's code: ``JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``.

    >>> [round(v, 4) for v in jsd_to_labels(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])).tolist()]
    [0.0, 0.6931]
    """
    p = probs.double()
    q = F.one_hot(labels.long(), p.shape[1]).double()
    m = (p + q) / 2

    def kl(a, b):
        return (a * torch.log((a + _KL_EPS) / (b + _KL_EPS))).sum(dim=1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).float()


def selection_threshold(jsd: torch.Tensor, *, d_u: Optional[float], filter_coefficient: float) -> float:
    """UNICON's cut-off: the mean JSD, lowered by ``(mean - min) / tau`` when the mean exceeds ``d_u``.

    >>> d = torch.tensor([0.25, 0.5, 0.75])  # mean 0.5, min 0.25
    >>> selection_threshold(d, d_u=0.3, filter_coefficient=5.0), selection_threshold(d, d_u=0.7, filter_coefficient=5.0)
    (0.45, 0.5)
    """
    d = jsd.float()
    threshold = float(d.mean())
    if d_u is not None and threshold > d_u:
        threshold = threshold - (threshold - float(d.min())) / filter_coefficient
    return threshold


@dataclass
class UniformSelection:
    """UNICON's selection: the labeled rows, their refinement weights and how they were chosen."""

    labeled: torch.Tensor  # long [n_l], sorted
    weights: torch.Tensor  # float [n_l]: 1 - d, or 1 where d < 0.5
    unlabeled: torch.Tensor  # long, sorted
    threshold: float
    selection_rate: float  # SR
    per_class: int  # int(SR * N / C)


def uniform_selection(jsd: torch.Tensor, labels: torch.Tensor, *, num_classes: int, d_u: Optional[float] = 0.7,
                      filter_coefficient: float = 5.0) -> UniformSelection:
    """Class-balanced selection of the lowest-JSD samples (UNICON's uniform selection).

    >>> d = torch.tensor([0.1, 0.6, 0.2, 0.3, 0.55, 0.05])
    >>> s = uniform_selection(d, torch.tensor([0, 0, 0, 1, 1, 1]), num_classes=2)
    >>> round(s.threshold, 4), s.selection_rate, s.per_class  # 4 of 6 below the mean: int(4/6*6/2) = 2
    (0.3, 0.6666666666666666, 2)
    >>> s.labeled.tolist(), s.weights.tolist()
    ([0, 2, 3, 5], [1.0, 1.0, 1.0, 1.0])
    """
    d = jsd.float().cpu()
    y = labels.long().cpu()
    n = d.numel()
    threshold = selection_threshold(d, d_u=d_u, filter_coefficient=filter_coefficient)
    sr = float((d < threshold).sum()) / max(n, 1)
    k = int(sr * n / num_classes)
    keep = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        rows = torch.nonzero(y == c).squeeze(1)
        if rows.numel():
            # stable: equal scores keep idx order, so the selection does not depend on the sort
            order = torch.sort(d[rows], stable=True).indices[:k]
            keep[rows[order]] = True
    labeled = torch.nonzero(keep).squeeze(1)
    w = 1.0 - d[labeled]
    w = torch.where(d[labeled] < _FULL_WEIGHT_BELOW, torch.ones_like(w), w)
    return UniformSelection(labeled=labeled, weights=w, unlabeled=torch.nonzero(~keep).squeeze(1),
                            threshold=threshold, selection_rate=sr, per_class=k)


def unlabeled_batch_size(batch_size: int, selection_rate: float, k: Optional[float], n_unlabeled: int) -> int:
    """UNICON's unlabeled batch per labeled batch: ``int(B / (k * SR))`` (``B`` when ``k`` is None),
    cut to the unlabeled set's size; 0 when there is no unlabeled sample.

    >>> unlabeled_batch_size(64, 0.3, 2.0, 10**6), unlabeled_batch_size(64, 0.3, 1.0, 10**6)  # 64/0.6, 64/0.3
    (106, 213)
    >>> unlabeled_batch_size(64, 0.3, None, 10**6), unlabeled_batch_size(64, 0.01, 2.0, 500)
    (64, 500)
    """
    if n_unlabeled <= 0:
        return 0
    if k is None or selection_rate <= 0:
        size = batch_size
    else:
        size = int(batch_size / (k * selection_rate))
    return max(1, min(size, n_unlabeled))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss between two views (rows of ``z1`` and ``z2`` are positive pairs).

    Rows are L2-normalised; anchors are all 2B rows; the other 2B - 1 rows are the candidates
    (UNICON's ``SupConLoss`` without labels, temperature = base temperature).

    >>> z = torch.eye(2)
    >>> round(float(nt_xent(z, z, temperature=1.0)), 4)  # -log(e / (e + 1 + 1))
    0.5514
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    pos = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, pos)


def split_views(views: List[torch.Tensor], guess_views: str) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(pair for guessing/refinement, pair for mixup and the contrastive loss)`` of the four views
    ``[weak, weak, strong, strong]``: UNICON's CIFAR script guesses on the weak pair, its
    Clothing1M/WebVision scripts on the strong pair."""
    weak, strong = views[:2], views[2:]
    return (weak, strong) if guess_views == "weak" else (strong, weak)


def unicon_step(net: Head, other: Head, xv: List[torch.Tensor], y_onehot: torch.Tensor, w: torch.Tensor,
                uv: List[torch.Tensor], *, config: UniconSection, lambda_u: float, rng: np.random.Generator,
                generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
    """UNICON's loss for ``net`` on one batch: ``xv``/``uv`` are the four views (weak, weak, strong,
    strong) of the labeled and unlabeled rows; ``uv`` may have zero rows."""
    (x1, x2), (x3, x4) = split_views(xv, config.guess_views)
    (u1, u2), (u3, u4) = split_views(uv, config.guess_views)
    bx, bu = x1.shape[0], u1.shape[0]
    inputs, targets = mixmatch_batch(net, other, (x1, x2), (u1, u2), (x3, x4), (u3, u4), y_onehot, w,
                                     config.temperature)
    lx, lu, penalty = mixmatch_terms(net, inputs, targets, 2 * bx, alpha=config.alpha, rows=config.mixmatch_rows,
                                     rng=rng, generator=generator)
    # the contrastive pair needs at least two samples (one negative)
    lc = nt_xent(net(u3), net(u4), temperature=config.contrastive_temperature) if bu > 1 else lx.new_zeros(())
    loss = lx + lambda_u * lu + config.lambda_c * lc + penalty
    return loss, {"lx": float(lx.detach()), "lu": float(lu.detach()), "lc": float(lc.detach()),
                  "penalty": float(penalty.detach())}


@torch.no_grad()
def pair_jsd(heads: List[Head], X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """JSD of every sample: mean of the heads' softmax vs the one-hot given label (CPU, float32)."""
    out = []
    for s in range(0, X.shape[0], chunk):
        x = X[s:s + chunk].float()
        p = sum(torch.softmax(h(x), 1) for h in heads) / len(heads)
        out.append(jsd_to_labels(p, Y[s:s + chunk]).cpu())
    return torch.cat(out) if out else torch.empty(0)


class Unicon(TwoHeadMethod):
    """UNICON's parts of the two-head loop: per head, the uniform selection by JSD of the pair's
    current predictions (recomputed after the first head has trained, as UNICON's loop does); two weak
    and two strong views per sample; only full batches; :func:`unicon_step` (MixMatch plus the
    contrastive term)."""

    name, divides = "unicon", "selection"
    drop_last = True  # UNICON's loaders drop the short last batch

    @property
    def view_strengths(self) -> Tuple[float, ...]:  # weak, weak, strong, strong
        strong = self.config.strong_factor
        return (1.0, 1.0, strong, strong)

    def warm_up(self, head: Head, lr_at) -> float:
        return warmup_epoch(head, self.X, self.Y, batch_size=self.warmup_batch, generator=self.gen, lr_at=lr_at,
                            penalty=self.config.warmup_penalty)

    def split(self, k: int, epoch: int, row: Dict[str, Any]) -> Tuple[UniformSelection, int]:
        cfg = self.config
        jsd = pair_jsd(self.heads, self.X, self.Y)
        sel = uniform_selection(jsd, self.Y, num_classes=self.num_classes, d_u=cfg.d_u,
                                filter_coefficient=cfg.filter_coefficient)
        bu = unlabeled_batch_size(self.batch_size, sel.selection_rate, cfg.unlabeled_batch_k, sel.unlabeled.numel())
        row.update({f"head{k}_selection_rate": sel.selection_rate, f"head{k}_threshold": sel.threshold,
                    f"head{k}_unlabeled_batch": bu})
        if sel.labeled.numel() == 0:
            log.warning("unicon epoch %d: the uniform selection is empty (SR %.3f); head %d skips this epoch",
                        epoch + 1, sel.selection_rate, k)
        else:
            self.state = {"jsd": jsd.numpy(), "labeled": sel.labeled.numpy()}
        return sel, bu

    def batch_loss(self, net: Head, other: Head, xv: List[torch.Tensor], y_onehot: torch.Tensor, w: torch.Tensor,
                   uv: List[torch.Tensor], lambda_u: float) -> torch.Tensor:
        loss, _ = unicon_step(net, other, xv, y_onehot, w, uv, config=self.config, lambda_u=lambda_u, rng=self.rng,
                              generator=self.gen)
        return loss


def train_unicon(features: torch.Tensor, labels: torch.Tensor, **options: Any) -> HeadPairResult:
    """Train UNICON's two linear heads on frozen features (see the module docstring); ``config`` is
    the recipe's ``unicon`` section, the other options as
    :meth:`turnctl.methods.twohead.TwoHeadMethod.train`."""
    return Unicon.train(features, labels, **options)
