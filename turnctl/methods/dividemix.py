"""DivideMix as a linear probe (lp-dividemix): two linear heads on cached features, co-divided.

DivideMix (Li, Socher, Hoi; ICLR 2020), as the TURN paper runs it: the backbone frozen, LP only.
Per epoch, after ``warmup_epochs`` epochs of CE for both heads (batches of ``warmup_batch_factor``
x the probe's batch, plus the confidence penalty ``mean sum p log p`` when ``warmup_penalty``):

1. **Division, per head.** Per-sample CE of each head over the whole train set (no augmentation),
   min-max normalised over all samples, averaged over the last ``loss_window`` epochs (DivideMix: 5
   at 90% noise, else 1), then ONE global two-component GMM
   (``GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4)``, fitted by
   :func:`turnctl.cleanse.select_clean` with a single class: scikit-learn's EM, deterministic 2-means
   start); ``w_i`` = posterior of the low-mean component; labeled = ``w > p_threshold``. Both heads'
   losses are taken before either head trains, as the original does.
2. **Co-division.** Head A trains on the division made by head B's losses and vice versa (each head
   filters the other's errors rather than confirming its own).
3. **MixMatch** for the head being trained (A), per batch of B labeled x and B unlabeled u, two
   views each: co-guessing ``q_u = sharpen(mean of A and B's softmax on both views of u, T)``;
   co-refinement ``q_x = sharpen(w y + (1 - w) mean of A's softmax on both views of x, T)``;
   mixup (``l ~ Beta(alpha, alpha)``, ``l = max(l, 1 - l)``) of all four view sets and targets;
   ``L = soft-CE(mixed x) + lambda_u * rampup * MSE(softmax(mixed u), targets) + KL(uniform ||
   mean prediction)`` (``mixmatch_rows: all``, the CIFAR script), or only the mixed x rows with
   ``L = soft-CE + KL`` (``mixmatch_rows: labeled``, the Clothing1M/WebVision scripts). The ramp is
   ``clip((epoch + step / (n_labeled // B + 1) - warmup) / rampup_epochs, 0, 1)``, as the original.

The pair predicts with the sum of the heads' logits; for linear heads that is one linear head (the
mean of the two is returned as ``head_state``). The per-noise-level values the original uses are
keys of the recipe section (:class:`turnctl.recipe.DivideMixSection` lists them per level).

Where this differs from the original, and why:

* views of a frozen feature are made in feature space (dropout + per-dimension Gaussian jitter;
  mixup of features), see :mod:`turnctl.methods.common`: the backbone never runs again;
* warm-up length 5 of the 20 LP epochs (the original: 10 or 30 of 300 on CIFAR), the ramp-up of
  16 epochs therefore never completes (15/16 of ``lambda_u`` at the last epoch), and the heads use
  the probe's optimizer, lr, weight decay, batch size and schedule (cosine over training progress),
  not 300 epochs of SGD at 0.02 with a step at 150: the LP's budget;
* a division that labels no sample keeps the ``batch_size`` samples with the highest clean
  posterior (logged), where the original would stop with an empty loader; an empty unlabeled set
  gives ``Lu = 0``;
* the GMM starts from a deterministic 2-means, not scikit-learn's random k-means start.

The loop both methods share, with an example of each, is turnctl/methods/twohead.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from turnctl.methods.common import Head, mixmatch_batch, mixmatch_terms, warmup_epoch
from turnctl.methods.twohead import HeadPairResult, TwoHeadMethod
from turnctl.metrics import minmax

log = logging.getLogger("turnctl")


def clean_posterior(norm_losses: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-2,
                    reg_covar: float = 5e-4) -> np.ndarray:
    """Posterior of the low-mean component of one 2-component GMM fitted to (normalised) losses.

    DivideMix's ``GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)`` on all
    samples at once, ``predict_proba[:, argmin(means)]``; fitted by :func:`turnctl.cleanse.select_clean`
    with every sample in one class (scikit-learn's EM with a deterministic 2-means start).

    >>> p = clean_posterior(torch.tensor([0.0, 0.02, 0.01, 0.03, 0.97, 1.0]))
    >>> (p > 0.5).tolist()
    [True, True, True, True, False, False]
    """
    from turnctl.cleanse import select_clean

    x = norm_losses.detach().double().cpu()
    sel = select_clean(x, torch.zeros(x.shape[0], dtype=torch.long), num_classes=1, tau=0.5,
                       max_iter=max_iter, tol=tol, reg_covar=reg_covar, normalize="none")
    return sel.clean_prob.astype(np.float64)


@dataclass
class Division:
    """One head's training split, made from the OTHER head's losses (co-division)."""

    labeled: torch.Tensor  # long [n_l]: row numbers of the labeled samples
    weights: torch.Tensor  # float [n_l]: their clean posterior w_i (label co-refinement)
    unlabeled: torch.Tensor  # long [n_u]
    prob: torch.Tensor  # float [N]: the clean posterior of every sample
    fallback: bool = False  # no sample passed p_threshold: the top-posterior samples were used


def divide(prob: Union[np.ndarray, torch.Tensor], *, p_threshold: float, fallback_k: int = 1) -> Division:
    """Labeled = ``prob > p_threshold`` (with their posteriors as weights), unlabeled = the rest.

    When no sample passes, the ``fallback_k`` highest posteriors are labeled (``fallback`` True).

    >>> d = divide(torch.tensor([0.9, 0.2, 0.6, 0.5]), p_threshold=0.5)
    >>> d.labeled.tolist(), d.unlabeled.tolist()
    ([0, 2], [1, 3])
    >>> divide(torch.tensor([0.1, 0.3, 0.2]), p_threshold=0.5, fallback_k=2).labeled.tolist()
    [1, 2]
    """
    p = torch.as_tensor(prob, dtype=torch.float32)
    mask = p > p_threshold
    fallback = not bool(mask.any())
    if fallback:
        mask = torch.zeros_like(mask)
        mask[torch.topk(p, min(max(int(fallback_k), 1), p.numel())).indices] = True
    labeled = torch.nonzero(mask).squeeze(1)
    return Division(labeled=labeled, weights=p[labeled], unlabeled=torch.nonzero(~mask).squeeze(1),
                    prob=p, fallback=fallback)


def co_divide(norm_losses: Sequence[torch.Tensor], *, p_threshold: float, max_iter: int = 10,
              tol: float = 1e-2, reg_covar: float = 5e-4, fallback_k: int = 1) -> List[Division]:
    """DivideMix's co-division for two heads: ``out[k]`` is head k's split, made from the OTHER
    head's (normalised) losses: head 0 trains on head 1's division and vice versa.

    >>> a = torch.tensor([0.0, 0.01, 0.02, 1.0, 0.99, 0.98])   # head 0: samples 0-2 look clean
    >>> b = torch.tensor([1.0, 0.99, 0.0, 0.01, 0.02, 0.98])   # head 1: samples 2-4 look clean
    >>> d0, d1 = co_divide([a, b], p_threshold=0.5)
    >>> d0.labeled.tolist(), d1.labeled.tolist()
    ([2, 3, 4], [0, 1, 2])
    """
    if len(norm_losses) != 2:
        raise ValueError(f"co_divide needs the losses of exactly two heads, got {len(norm_losses)}")
    probs = [clean_posterior(l, max_iter=max_iter, tol=tol, reg_covar=reg_covar) for l in norm_losses]
    return [divide(probs[1], p_threshold=p_threshold, fallback_k=fallback_k),
            divide(probs[0], p_threshold=p_threshold, fallback_k=fallback_k)]


@torch.no_grad()
def per_sample_losses(head: Head, X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """CE of every sample under ``head`` (no augmentation), float32 on CPU."""
    out = [F.cross_entropy(head(X[s:s + chunk]), Y[s:s + chunk], reduction="none").cpu()
           for s in range(0, X.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0)


def mixmatch_step(net: Head, other: Head, x1: torch.Tensor, x2: torch.Tensor, y_onehot: torch.Tensor,
                  w: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, *, temperature: float, alpha: float,
                  lambda_u: float, rng: np.random.Generator, generator: torch.Generator,
                  rows: str = "all") -> Tuple[torch.Tensor, Dict[str, float]]:
    """DivideMix's loss for ``net`` on one batch (two views of labeled x and of unlabeled u).

    Returns the loss (with graph) and its parts. ``u1``/``u2`` may have zero rows (no unlabeled
    sample left): the unlabeled term is then 0. ``rows``: see
    :func:`turnctl.methods.common.mixmatch_terms`.
    """
    bx = x1.shape[0]
    # co-refinement of the labels (net only) and co-guessing on unlabeled (both heads), same views
    inputs, targets = mixmatch_batch(net, other, (x1, x2), (u1, u2), (x1, x2), (u1, u2), y_onehot, w, temperature)
    lx, lu, penalty = mixmatch_terms(net, inputs, targets, 2 * bx, alpha=alpha, rows=rows, rng=rng,
                                     generator=generator)
    loss = lx + lambda_u * lu + penalty
    return loss, {"lx": float(lx.detach()), "lu": float(lu.detach()), "penalty": float(penalty.detach())}


class DivideMix(TwoHeadMethod):
    """DivideMix's parts of the two-head loop: per epoch, the GMM co-division of both heads'
    windowed, min-max normalised losses (before either head trains); two weak views per sample;
    :func:`mixmatch_step` with the section's MixMatch parameters."""

    name, divides = "dividemix", "co-division"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.windows: List[List[torch.Tensor]] = [[], []]  # each head's last loss_window normalised losses
        self.divisions: List[Division] = []

    def warm_up(self, head: Head, lr_at) -> float:
        return warmup_epoch(head, self.X, self.Y, batch_size=self.warmup_batch, generator=self.gen, lr_at=lr_at,
                            penalty=self.config.warmup_penalty)

    def begin_epoch(self, epoch: int) -> None:
        cfg, norm = self.config, []
        for k, h in enumerate(self.heads):
            self.windows[k] = (self.windows[k] + [minmax(per_sample_losses(h, self.X, self.Y))])[-cfg.loss_window:]
            norm.append(torch.stack(self.windows[k]).mean(0))
        self.divisions = co_divide(norm, p_threshold=cfg.p_threshold, max_iter=cfg.gmm_max_iter, tol=cfg.gmm_tol,
                                   reg_covar=cfg.gmm_reg_covar, fallback_k=self.batch_size)
        self.state = {"clean_prob_head0": self.divisions[1].prob.numpy(),
                      "clean_prob_head1": self.divisions[0].prob.numpy()}

    def split(self, k: int, epoch: int, row: Dict[str, Any]) -> Tuple[Division, int]:
        d = self.divisions[k]
        if d.fallback:
            log.warning("dividemix epoch %d: no sample passed p_threshold %.2f for head %d; using the %d highest "
                        "clean posteriors", epoch + 1, self.config.p_threshold, k, d.labeled.numel())
        return d, (self.batch_size if d.unlabeled.numel() else 0)

    def batch_loss(self, net: Head, other: Head, xv: List[torch.Tensor], y_onehot: torch.Tensor, w: torch.Tensor,
                   uv: List[torch.Tensor], lambda_u: float) -> torch.Tensor:
        cfg = self.config
        loss, _ = mixmatch_step(net, other, *xv, y_onehot, w, *uv, temperature=cfg.temperature, alpha=cfg.alpha,
                                lambda_u=lambda_u, rng=self.rng, generator=self.gen, rows=cfg.mixmatch_rows)
        return loss


def train_dividemix(features: torch.Tensor, labels: torch.Tensor, **options: Any) -> HeadPairResult:
    """Train DivideMix's two linear heads on frozen features (see the module docstring); ``config``
    is the recipe's ``dividemix`` section, the other options as
    :meth:`turnctl.methods.twohead.TwoHeadMethod.train`."""
    return DivideMix.train(features, labels, **options)
