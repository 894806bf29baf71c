"""The training loop DivideMix-LP and UNICON-LP share: two linear heads on cached features.

Both methods run the same schedule (turnctl/methods/dividemix.py and turnctl/methods/unicon.py
describe each): ``warmup_epochs`` epochs of CE for both heads, then every epoch, for head A and then
head B, a split of the train set into labeled rows (with label-refinement weights) and unlabeled
rows, and one MixMatch pass of that head over its labeled rows with unlabeled batches alongside; the
pair is evaluated after every epoch by the mean of its logits.

:class:`TwoHeadMethod` holds that loop: the setup (resident features, seeded generators, views,
heads), the epochs, the pass over a split, the per-head statistics and the evaluation. A method is
a subclass that says only what differs: how a head's split is made (:meth:`~TwoHeadMethod.split`,
with :meth:`~TwoHeadMethod.begin_epoch` for what is computed once per epoch), how many views a batch
has (``view_strengths``), whether short batches are dropped (``drop_last``) and the per-batch loss
(:meth:`~TwoHeadMethod.batch_loss`). One torch generator and one numpy generator, seeded once, give
every random draw in a fixed order: the views, the permutations, mixup.

>>> import torch
>>> from turnctl.methods.dividemix import DivideMix
>>> from turnctl.methods.unicon import Unicon
>>> from turnctl.recipe import DivideMixSection, ProbeSection, UniconSection
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(120) % 3
>>> x = torch.randn(120, 6, generator=g) + 4 * torch.nn.functional.one_hot(y, 6).float()
>>> probe = ProbeSection(epochs=3, optimizer="adamw", lr=0.05, batch_size=32)
>>> for method, section in ((DivideMix, DivideMixSection), (Unicon, UniconSection)):
...     res = method.train(x, y, num_classes=3, seed=0, probe=probe, config=section(warmup_epochs=1),
...                        eval_sets={"train": (x, y)}, log_every_epoch=False)
...     print(method.name, [h["stage"] for h in res.history], res.history[-1]["train_acc"] > 0.9)
dividemix ['warmup', 'ssl', 'ssl'] True
unicon ['warmup', 'ssl', 'ssl'] True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl import metrics
from turnctl.methods.common import (
    FeatureViews, Head, check_inputs, linear_rampup, prepare_eval_sets, ramp_position,
)
from turnctl.probe import EVAL_CHUNK, resident
from turnctl.recipe import ProbeSection
from turnctl.schedule import lr_at as scheduled_lr

log = logging.getLogger("turnctl")


@dataclass
class HeadPairResult:
    """What :meth:`TwoHeadMethod.fit` returns (shaped like the probe's ``ProbeResult``).

    ``head_state``: one ``nn.Linear(D, C)`` state dict (float32, CPU), the mean of the two heads,
    which predicts exactly what the pair predicts (see :func:`mean_head`); it goes into the
    Backbone's ``head``. ``heads``: the two heads' states. ``history``: one dict per epoch with
    ``phase`` ("lp"), ``epoch`` (1-based), ``stage`` ("warmup" or "ssl"), ``train_loss``, ``lr``,
    ``<name>_acc`` per eval set (the pair's accuracy), ``wall_s`` and method-specific selection
    statistics. ``state``: per-sample arrays of the last selection (numpy), for reports.
    """

    head_state: Dict[str, torch.Tensor]
    heads: List[Dict[str, torch.Tensor]]
    history: List[Dict[str, Any]] = field(default_factory=list)
    state: Dict[str, Any] = field(default_factory=dict)


def mean_head(heads: Iterable[Head]) -> Dict[str, torch.Tensor]:
    """One ``nn.Linear`` state equal to the mean of the heads' logits.

    DivideMix and UNICON predict with the sum of their two networks' outputs; for linear heads that
    sum is itself a linear head, so the averaged head predicts exactly what the pair predicts.
    """
    states = [h.state() for h in heads]
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in ("weight", "bias")}


@torch.no_grad()
def pair_accuracy(heads: List[Head], X: torch.Tensor, Y: torch.Tensor) -> float:
    """Top-1 accuracy of the heads' mean logits on ``X`` (chunked); NaN without samples."""
    pred = [(sum(h(X[s:s + EVAL_CHUNK].float()) for h in heads) / len(heads)).argmax(1)
            for s in range(0, X.shape[0], EVAL_CHUNK)]
    return metrics.accuracy(torch.cat(pred) if pred else Y, Y)


def selection_stats(labeled: torch.Tensor, n: int, labels: torch.Tensor, clean: Optional[torch.Tensor],
                    prefix: str) -> Dict[str, Any]:
    """Size of a head's labeled set (row numbers among ``n``) and, when true labels are known, its
    purity (:func:`turnctl.metrics.selection_quality`).

    >>> selection_stats(torch.tensor([0, 1]), 3, torch.tensor([0, 1, 1]), torch.tensor([0, 0, -1]), "head0_")
    {'head0_labeled': 2, 'head0_labeled_purity': 0.5}
    """
    mask = np.zeros(n, dtype=bool)
    mask[labeled.cpu().numpy()] = True
    out: Dict[str, Any] = {f"{prefix}labeled": int(mask.sum())}
    if clean is not None:
        quality = metrics.selection_quality(mask, labels.cpu().numpy(), clean.cpu().numpy(), np.ones(n, dtype=bool))
        if quality:
            out[f"{prefix}labeled_purity"] = quality["purity"]
    return out


def cycle_batches(idx: torch.Tensor, batch_size: int, generator: torch.Generator, *, drop_last: bool = False):
    """Endless batches of ``idx``, reshuffled at every pass (an unlabeled loader that restarts).

    ``drop_last``: skip each pass's short last batch (UNICON's loaders); needs ``batch_size <= len(idx)``.

    >>> g = torch.Generator().manual_seed(0)
    >>> it = cycle_batches(torch.arange(5), 2, g, drop_last=True)
    >>> [len(next(it)) for _ in range(4)]
    [2, 2, 2, 2]
    """
    if drop_last and not 0 < batch_size <= idx.numel():
        raise ValueError(f"drop_last needs 0 < batch_size <= {idx.numel()}, got {batch_size}")
    while True:
        perm = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
        stop = perm.numel() - perm.numel() % batch_size if drop_last else perm.numel()
        for s in range(0, stop, batch_size):
            yield perm[s:s + batch_size]


def log_epoch(name: str, row: Dict[str, Any], epochs: int) -> None:
    """One log line per epoch of a two-head method (stage, loss, accuracies, labeled-set sizes)."""
    accs = "  ".join(f"{k[:-4]} {100 * v:.2f}%" for k, v in row.items() if k.endswith("_acc"))
    extra = "  ".join(f"{k} {v}" for k, v in row.items() if k.endswith("labeled"))
    log.info("%s epoch %d/%d [%s] loss %.4f  %s  %s  %.1fs", name, row["epoch"], epochs, row["stage"],
             row["train_loss"], accs, extra, row["wall_s"])


class TwoHeadMethod:
    """Two linear heads on frozen features, trained by the loop of the module docstring.

    A split (what :meth:`split` returns first) is any object with ``labeled`` (long row numbers),
    ``weights`` (their label-refinement weights) and ``unlabeled`` (long row numbers).

    ``config`` is the method's recipe section; the loop reads its ``warmup_epochs``,
    ``warmup_batch_factor``, ``warmup_penalty``, ``rampup_epochs``, ``lambda_u``, ``view_dropout``
    and ``view_noise``.
    """

    name = "two-head"  # in log lines
    divides = "split"  # what the warm-up-only warning says is skipped
    view_strengths: Tuple[float, ...] = (1.0, 1.0)  # views per sample, by strength (FeatureViews)
    drop_last = False  # only full batches, labeled and unlabeled (a labeled set under one batch is one)

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, probe: ProbeSection,
                 config: Any, seed: int, device: Union[None, str, torch.device] = None,
                 eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                 clean: Optional[torch.Tensor] = None):
        check_inputs(features, labels, num_classes)
        dev = dist.compute_device(device)
        self.X, self.Y = resident(features, dev), labels.to(dev, torch.long)
        self.n, dim = self.X.shape
        self.batch_size = min(probe.batch_size, max(self.n, 1))
        # The originals' warm-up loaders use a larger batch: 2x (CIFAR), 4x (UNICON's WebVision).
        self.warmup_batch = min(self.batch_size * config.warmup_batch_factor, self.n)
        self.evals = prepare_eval_sets(eval_sets, dev)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rng = np.random.default_rng(int(seed))
        self.views = FeatureViews(features, dropout=config.view_dropout, noise=config.view_noise)
        self.heads = [Head(dim, num_classes, seed=int(seed) + k, optimizer=probe.optimizer, lr=probe.lr,
                           weight_decay=probe.weight_decay, momentum=probe.momentum, device=dev) for k in (0, 1)]
        self.onehot = F.one_hot(self.Y, num_classes).float()
        self.labels, self.clean, self.num_classes = labels, clean, num_classes
        self.probe, self.config = probe, config
        self.state: Dict[str, Any] = {}

    @classmethod
    def train(cls, features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, probe: ProbeSection,
              config: Any, seed: int, device: Union[None, str, torch.device] = None,
              eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
              clean: Optional[torch.Tensor] = None, log_every_epoch: bool = True) -> HeadPairResult:
        """Set up and :meth:`fit` in one call.

        Args:
            features: ``[N, D]`` train features (any float dtype; kept resident, cast per batch).
            labels: ``[N]`` given labels in ``[0, num_classes)``.
            probe: epochs, optimizer, lr, weight decay, momentum, batch size, schedule of the heads.
            config: the method's recipe section.
            seed: seeds both heads' initialisation, the views, the permutations and mixup.
            device: ``None``/"auto" = this rank's GPU when there is one, else the CPU.
            eval_sets: ``{name: (features, labels)}`` evaluated after every epoch as ``<name>_acc``.
            clean: ``[N]`` true labels (-1 unknown), only for the labeled-set purity in the history.
        """
        method = cls(features, labels, num_classes=num_classes, probe=probe, config=config, seed=seed,
                     device=device, eval_sets=eval_sets, clean=clean)
        return method.fit(log_every_epoch=log_every_epoch)

    # ---- what a method says ----------------------------------------------------------------------
    def warm_up(self, head: Head, lr_at) -> float:
        """One CE epoch of ``head`` (its mean CE): :func:`turnctl.methods.common.warmup_epoch` with
        ``warmup_batch``, ``gen`` and the section's ``warmup_penalty``, called from the method's own
        module (tests/test_methods_fidelity.py checks there what each method passes)."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """What a method computes once per SSL epoch, before either head trains."""

    def split(self, k: int, epoch: int, row: Dict[str, Any]) -> Tuple[Any, int]:
        """Head ``k``'s split for this epoch and its unlabeled batch size (0: no unlabeled rows);
        method-specific statistics go into ``row``, per-sample arrays for reports into ``state``."""
        raise NotImplementedError

    def batch_loss(self, net: Head, other: Head, xv: List[torch.Tensor], y_onehot: torch.Tensor, w: torch.Tensor,
                   uv: List[torch.Tensor], lambda_u: float) -> torch.Tensor:
        """The loss of ``net`` on one batch: ``xv``/``uv`` the views of the labeled and unlabeled rows
        (``uv`` may have zero rows), ``y_onehot`` and ``w`` the labeled rows' labels and weights."""
        raise NotImplementedError

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self, *, log_every_epoch: bool = True) -> HeadPairResult:
        E = self.probe.epochs
        if self.config.warmup_epochs >= E > 0:
            log.warning("%s: warmup_epochs=%d >= probe.epochs=%d: only CE warm-up, no %s", self.name,
                        self.config.warmup_epochs, E, self.divides)
        history: List[Dict[str, Any]] = []
        for epoch in range(E):
            t0 = time.perf_counter()
            row: Dict[str, Any] = {"phase": "lp", "epoch": epoch + 1}

            def lr_at(frac: float, e: int = epoch) -> float:
                return scheduled_lr(base_lr=self.probe.lr, schedule=self.probe.schedule, progress=(e + frac) / E)

            if epoch < self.config.warmup_epochs:
                losses = [self.warm_up(h, lr_at) for h in self.heads]
                row.update(stage="warmup", train_loss=float(np.mean(losses)))
            else:
                loss = self.ssl_epoch(epoch, row, lr_at)
                row.update(stage="ssl", train_loss=loss)
            row["lr"] = lr_at(1.0)
            for name, (fe, la) in self.evals.items():
                row[f"{name}_acc"] = pair_accuracy(self.heads, fe, la)
            row["wall_s"] = time.perf_counter() - t0
            history.append(row)
            if log_every_epoch:
                log_epoch(self.name, row, E)
        return HeadPairResult(head_state=mean_head(self.heads), heads=[h.state() for h in self.heads],
                              history=history, state=self.state)

    def ssl_epoch(self, epoch: int, row: Dict[str, Any], lr_at) -> float:
        """Head 0 on its split, then head 1 on its split (the other head guesses alongside); the mean
        loss over the samples trained on. A head whose split labels nothing skips the epoch."""
        self.begin_epoch(epoch)
        total, count = 0.0, 0
        h0, h1 = self.heads
        for k, (net, other) in enumerate(((h0, h1), (h1, h0))):
            sel, unlabeled_batch = self.split(k, epoch, row)
            row.update(selection_stats(sel.labeled, self.n, self.labels, self.clean, f"head{k}_"))
            if sel.labeled.numel() == 0:
                continue
            loss_sum, seen = self.labeled_pass(net, other, sel, unlabeled_batch, epoch=epoch, lr_at=lr_at)
            total, count = total + loss_sum, count + seen
        return total / max(count, 1)

    def views_of(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.views(x, generator=self.gen, strength=s) for s in self.view_strengths]

    def labeled_pass(self, net: Head, other: Head, sel: Any, unlabeled_batch: int, *, epoch: int,
                     lr_at) -> Tuple[float, int]:
        """One pass of ``net`` over the labeled rows of ``sel`` in batches of ``batch_size``, unlabeled
        batches of ``unlabeled_batch`` cycling alongside; (loss sum, samples trained on)."""
        dev, B, cfg = self.X.device, self.batch_size, self.config
        lab, w = sel.labeled.to(dev), sel.weights.to(dev)
        n_l = lab.numel()
        order = torch.randperm(n_l, generator=self.gen).to(dev)
        steps = max(1, n_l // B if self.drop_last else math.ceil(n_l / B))
        unl = (cycle_batches(sel.unlabeled.to(dev), unlabeled_batch, self.gen, drop_last=self.drop_last)
               if unlabeled_batch > 0 else None)
        total, seen = 0.0, 0
        for k in range(steps):
            pick = order[k * B:(k + 1) * B]
            rows = lab.index_select(0, pick)
            xv = self.views_of(self.X.index_select(0, rows))
            uv = self.views_of(self.X.index_select(0, next(unl))) if unl is not None else [v[:0] for v in xv]
            lam_u = linear_rampup(ramp_position(epoch, k, n_l, B), warmup=cfg.warmup_epochs,
                                  length=cfg.rampup_epochs, weight=cfg.lambda_u)
            loss = self.batch_loss(net, other, xv, self.onehot.index_select(0, rows), w.index_select(0, pick), uv,
                                   lam_u)
            net.step(loss, lr_at(k / steps))
            total += float(loss.detach()) * rows.numel()
            seen += rows.numel()
        return total, seen
