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

>>> import torch
>>> from turnctl.recipe import DivideMixSection, ProbeSection
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(120) % 3
>>> x = torch.randn(120, 6, generator=g) + 4 * torch.nn.functional.one_hot(y, 6).float()
>>> res = train_dividemix(x, y, num_classes=3, seed=0, log_every_epoch=False,
...                       probe=ProbeSection(epochs=3, optimizer="adamw", lr=0.05, batch_size=32),
...                       config=DivideMixSection(warmup_epochs=1), eval_sets={"train": (x, y)})
>>> [h["stage"] for h in res.history], res.history[-1]["train_acc"] > 0.9
(['warmup', 'ssl', 'ssl'], True)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from turnctl.methods.common import (
    FeatureViews, Head, HeadPairResult, accuracy_of, check_inputs, cosine_lr, cycle_batches,
    linear_rampup, log_epoch, mean_head, mixmatch_batch, mixmatch_terms, pick_device, prepare_eval_sets, ramp_position,
    resident, row_mask, selection_stats, warmup_epoch,
)
from turnctl.recipe import DivideMixSection, ProbeSection

log = logging.getLogger("turnctl")


def minmax(losses: torch.Tensor) -> torch.Tensor:
    """``(l - min) / (max - min)`` over all samples (0 everywhere when all losses are equal).

    >>> minmax(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [0.0, 0.5, 1.0]
    """
    lo, hi = losses.min(), losses.max()
    span = hi - lo
    return (losses - lo) / span if float(span) > 0 else torch.zeros_like(losses)


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


def train_dividemix(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    probe: ProbeSection,
    config: DivideMixSection,
    seed: int,
    device: Union[None, str, torch.device] = None,
    eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    clean: Optional[torch.Tensor] = None,
    log_every_epoch: bool = True,
) -> HeadPairResult:
    """Train DivideMix's two linear heads on frozen features; see the module docstring.

    Args:
        features: ``[N, D]`` train features (any float dtype; kept resident, cast per batch).
        labels: ``[N]`` given labels in ``[0, num_classes)``.
        probe: epochs, optimizer, lr, weight decay, momentum, batch size, schedule of the heads.
        config: the recipe's ``dividemix`` section.
        seed: seeds both heads' initialisation, the views, the permutations and mixup.
        eval_sets: ``{name: (features, labels)}`` evaluated after every epoch as ``<name>_acc``.
        clean: ``[N]`` true labels (-1 unknown), only for the labeled-set purity in the history.

    Returns a :class:`~turnctl.methods.common.HeadPairResult`.
    """
    check_inputs(features, labels, num_classes)
    dev = pick_device(device)
    X, Y = resident(features, dev), labels.to(dev, torch.long)
    n, dim = X.shape
    B = min(probe.batch_size, max(n, 1))
    Bw = min(B * config.warmup_batch_factor, n)  # DivideMix's warm-up loaders use 2x the batch
    evals = prepare_eval_sets(eval_sets, dev)
    gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    views = FeatureViews(features, dropout=config.view_dropout, noise=config.view_noise)
    heads = [Head(dim, num_classes, seed=int(seed) + k, optimizer=probe.optimizer, lr=probe.lr,
                  weight_decay=probe.weight_decay, momentum=probe.momentum, device=dev) for k in (0, 1)]
    onehot = F.one_hot(Y, num_classes).float()
    E = probe.epochs
    history: List[Dict[str, Any]] = []
    windows: List[List[torch.Tensor]] = [[], []]
    state: Dict[str, Any] = {}
    if config.warmup_epochs >= E > 0:
        log.warning("dividemix: warmup_epochs=%d >= probe.epochs=%d: only CE warm-up, no co-division",
                    config.warmup_epochs, E)
    for epoch in range(E):
        t0 = time.perf_counter()
        row: Dict[str, Any] = {"phase": "lp", "epoch": epoch + 1}
        lr_at = (lambda frac, e=epoch: cosine_lr(probe.lr, probe.schedule, (e + frac) / E))
        if epoch < config.warmup_epochs:
            losses = [warmup_epoch(h, X, Y, batch_size=Bw, generator=gen, lr_at=lr_at, penalty=config.warmup_penalty)
                      for h in heads]
            row.update(stage="warmup", train_loss=float(np.mean(losses)))
        else:
            norm = []
            for k, h in enumerate(heads):
                windows[k] = (windows[k] + [minmax(per_sample_losses(h, X, Y))])[-config.loss_window:]
                norm.append(torch.stack(windows[k]).mean(0))
            divisions = co_divide(norm, p_threshold=config.p_threshold, max_iter=config.gmm_max_iter,
                                  tol=config.gmm_tol, reg_covar=config.gmm_reg_covar, fallback_k=B)
            total, count = 0.0, 0
            for k, (net, other) in enumerate(((heads[0], heads[1]), (heads[1], heads[0]))):
                d = divisions[k]
                if d.fallback:
                    log.warning("dividemix epoch %d: no sample passed p_threshold %.2f for head %d; using "
                                "the %d highest clean posteriors", epoch + 1, config.p_threshold, k, d.labeled.numel())
                row.update(selection_stats(row_mask(d.labeled, n), labels, clean, f"head{k}_"))
                l, c = _ssl_epoch(net, other, X, onehot, d, views=views, config=config, batch_size=B,
                                  epoch=epoch, rng=rng, generator=gen, lr_at=lr_at)
                total, count = total + l, count + c
            row.update(stage="ssl", train_loss=total / max(count, 1))
            state = {"clean_prob_head0": divisions[1].prob.numpy(), "clean_prob_head1": divisions[0].prob.numpy()}
        row["lr"] = lr_at(1.0)
        for name, (fe, la) in evals.items():
            row[f"{name}_acc"] = accuracy_of(heads, fe, la)
        row["wall_s"] = time.perf_counter() - t0
        history.append(row)
        if log_every_epoch:
            log_epoch("dividemix", row, E)
    return HeadPairResult(head_state=mean_head(heads), heads=[h.state() for h in heads], history=history,
                          state=state)


def _ssl_epoch(net: Head, other: Head, X, onehot, d: Division, *, views: FeatureViews, config: DivideMixSection,
               batch_size: int, epoch: int, rng, generator, lr_at) -> Tuple[float, int]:
    """One pass over ``net``'s labeled set (unlabeled batches cycle alongside); (loss sum, samples)."""
    dev = X.device
    lab, w = d.labeled.to(dev), d.weights.to(dev)
    order = torch.randperm(lab.numel(), generator=generator).to(dev)
    steps = max(1, math.ceil(lab.numel() / batch_size))
    unl = cycle_batches(d.unlabeled.to(dev), batch_size, generator) if d.unlabeled.numel() else None
    total = 0.0
    for k in range(steps):
        pick = order[k * batch_size:(k + 1) * batch_size]
        rows = lab.index_select(0, pick)
        x = X.index_select(0, rows)
        x1, x2 = views(x, generator=generator), views(x, generator=generator)
        if unl is not None:
            u = X.index_select(0, next(unl))
            u1, u2 = views(u, generator=generator), views(u, generator=generator)
        else:
            u1 = u2 = x1[:0]
        lam_u = linear_rampup(ramp_position(epoch, k, lab.numel(), batch_size), warmup=config.warmup_epochs,
                              length=config.rampup_epochs, weight=config.lambda_u)
        loss, _ = mixmatch_step(net, other, x1, x2, onehot.index_select(0, rows), w.index_select(0, pick), u1, u2,
                                temperature=config.temperature, alpha=config.alpha, lambda_u=lam_u, rng=rng,
                                generator=generator, rows=config.mixmatch_rows)
        net.step(loss, lr_at(k / steps))
        total += float(loss.detach()) * rows.numel()
    return total, int(lab.numel())
