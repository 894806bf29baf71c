"""Pieces shared by the methods that train on cached (frozen) features: DivideMix-LP, UNICON-LP
(whose common loop is turnctl/methods/twohead.py) and NMTune.

Everything here is local to one process (the runner calls the methods on rank 0, like the linear
probe, and broadcasts the resulting head).

Views of a frozen feature (our choice; docs/PROTOCOL.md section 4)
------------------------------------------------------------------
DivideMix and UNICON need several augmented views of each sample, but the features are extracted
once, without augmentation, and the backbone never runs again. We augment **in feature space**:

    view(f) = f * m / (1 - p) + s * sigma * e,   m ~ Bernoulli(1 - p), e ~ N(0, I)

with ``p`` the view dropout, ``s`` the jitter and ``sigma`` the per-dimension standard deviation of
the train features (so the jitter is scale-free across backbones). MixMatch's mixup is applied to
the features themselves: for a linear head on frozen features, mixing the features *is* mixing the
inputs. Why not several augmented feature copies: that multiplies the (already dominant) cost of
feature extraction and the feature cache by the number of copies, and still gives a fixed, finite
set of views; feature-space views are fresh every step and cost nothing.

>>> import torch
>>> views = FeatureViews(torch.ones(4, 3) * torch.tensor([1.0, 2.0, 3.0]), dropout=0.0, noise=0.0)
>>> views(torch.ones(2, 3), generator=torch.Generator().manual_seed(0)).tolist()
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from turnctl.errors import DataError
from turnctl.probe import EVAL_CHUNK, init_head, resident


class FeatureViews:
    """Random views of frozen features: dropout plus Gaussian jitter scaled per dimension.

    ``train_features`` only provide the per-dimension standard deviation (computed once, float32).
    ``strength`` multiplies both the dropout rate (capped at 0.9) and the jitter (strong views).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> v = FeatureViews(torch.randn(100, 8, generator=g), dropout=0.5, noise=0.0)
    >>> out = v(torch.ones(1000, 8), generator=g)
    >>> sorted(set(out.flatten().tolist()))  # dropped (0) or rescaled by 1 / (1 - p)
    [0.0, 2.0]
    """

    def __init__(self, train_features: torch.Tensor, *, dropout: float, noise: float):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.dropout, self.noise = float(dropout), float(noise)
        self.std = _column_std(train_features)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
        x = x.float()
        p = min(self.dropout * strength, 0.9)
        s = self.noise * strength
        # Random numbers from a CPU generator, then moved: the same draws on any device.
        if p > 0:
            keep = torch.rand(x.shape, generator=generator).to(x.device) >= p
            x = x * keep / (1.0 - p)
        if s > 0:
            x = x + s * self.std.to(x.device) * torch.randn(x.shape, generator=generator).to(x.device)
        return x


def _column_std(x: torch.Tensor) -> torch.Tensor:
    """Per-column std in float64 chunks (the features may be fp16 and large)."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros(x.shape[1], dtype=torch.float32)
    s1 = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for s in range(0, n, EVAL_CHUNK):
        c = x[s:s + EVAL_CHUNK].double().cpu()
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    var = (s2 - s1 * s1 / n) / (n - 1)
    return var.clamp_min(0).sqrt().float()


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's temperature sharpening ``p^(1/T) / sum(p^(1/T))`` (rows).

    >>> sharpen(torch.tensor([[0.25, 0.75]]), 0.5).tolist()  # (1/16, 9/16) / (10/16)
    [[0.10000000149011612, 0.8999999761581421]]
    """
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def linear_rampup(current: float, *, warmup: float, length: float, weight: float) -> float:
    """``weight * clip((current - warmup) / length, 0, 1)``: DivideMix's and UNICON's ``lambda_u``.

    >>> linear_rampup(7.0, warmup=5, length=16, weight=32.0)
    4.0
    """
    return float(weight) * float(np.clip((current - warmup) / length, 0.0, 1.0))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean_i sum_c t_ic log softmax(z_i)_c`` (MixMatch's labeled loss, soft targets).

    >>> round(float(soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]))), 4)  # log 2
    0.6931
    """
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def uniform_prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """``sum_c pi_c log(pi_c / mean_i p_ic)`` with the uniform prior pi = 1/C: KL(pi || mean prediction).

    DivideMix and UNICON add it so that mixup on noisy data does not collapse onto a few classes.

    >>> float(uniform_prior_penalty(torch.zeros(3, 4)))  # the mean prediction is uniform
    0.0
    """
    c = logits.shape[1]
    mean = torch.softmax(logits.float(), dim=1).mean(0)
    prior = torch.full_like(mean, 1.0 / c)
    return (prior * torch.log(prior / mean)).sum()


def mixup(inputs: torch.Tensor, targets: torch.Tensor, *, alpha: float, rng: np.random.Generator,
          generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """MixMatch's mixup: ``l ~ Beta(a, a)``, ``l = max(l, 1 - l)``, mix with a random permutation.

    ``l >= 0.5`` keeps every mixed row closer to its own input, so the first rows stay "labeled".

    >>> import numpy as np, torch
    >>> x, t = torch.eye(2), torch.eye(2)
    >>> mx, mt, l = mixup(x, t, alpha=4.0, rng=np.random.default_rng(0),
    ...                   generator=torch.Generator().manual_seed(0))
    >>> bool(l >= 0.5) and torch.allclose(mx, mt)
    True
    """
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    return (lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm], lam)


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_c p_ic log p_ic``: DivideMix's and UNICON's confidence penalty (``NegEntropy``).

    Added to the warm-up CE where the originals do (``warmup_penalty``): it rewards high-entropy
    predictions, so the heads do not become over-confident on a systematically flipped label.

    >>> round(float(neg_entropy(torch.zeros(1, 4))), 4)  # uniform over 4: -log 4
    -1.3863
    """
    p = torch.softmax(logits.float(), dim=1)
    return (p * torch.log(p)).sum(dim=1).mean()


@torch.no_grad()
def co_guess(net: "Head", other: "Head", u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Label co-guessing: sharpen the mean of both heads' softmax on two views of the unlabeled rows."""
    pu = (torch.softmax(net(u1), 1) + torch.softmax(net(u2), 1)
          + torch.softmax(other(u1), 1) + torch.softmax(other(u2), 1)) / 4
    return sharpen(pu, temperature)


@torch.no_grad()
def refine_labels(net: "Head", x1: torch.Tensor, x2: torch.Tensor, y_onehot: torch.Tensor, w: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Label (co-)refinement: ``sharpen(w y + (1 - w) mean(softmax(net(x1)), softmax(net(x2))), T)``."""
    px = (torch.softmax(net(x1), 1) + torch.softmax(net(x2), 1)) / 2
    return sharpen(w[:, None] * y_onehot + (1 - w[:, None]) * px, temperature)


def mixmatch_batch(net: "Head", other: "Head", guess_x: Tuple[torch.Tensor, torch.Tensor],
                   guess_u: Tuple[torch.Tensor, torch.Tensor], mix_x: Tuple[torch.Tensor, torch.Tensor],
                   mix_u: Tuple[torch.Tensor, torch.Tensor], y_onehot: torch.Tensor, w: torch.Tensor,
                   temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's ``(inputs, targets)`` for :func:`mixmatch_terms`: labels co-refined (``net``) on the
    two labeled guess views, co-guessed (both heads) on the two unlabeled guess views, attached to
    the mix views (DivideMix: the same views; UNICON: the other pair); no unlabeled rows when ``u``
    is empty."""
    tx = refine_labels(net, *guess_x, y_onehot, w, temperature)
    if guess_u[0].shape[0]:
        tu = co_guess(net, other, *guess_u, temperature)
        return torch.cat([*mix_x, *mix_u]), torch.cat([tx, tx, tu, tu])
    return torch.cat(mix_x), torch.cat([tx, tx])


def mixmatch_terms(net: "Head", inputs: torch.Tensor, targets: torch.Tensor, n_labeled: int, *, alpha: float,
                   rows: str, rng: np.random.Generator,
                   generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup and the three MixMatch terms ``(Lx, Lu, penalty)`` as the originals compute them.

    ``inputs``/``targets``: the labeled rows first (``n_labeled`` of them: two views of x), then the
    unlabeled rows (two views of u). Every row is mixed with a random partner from all of them.

    * ``rows="all"`` (DivideMix's and UNICON's CIFAR scripts): the net sees every mixed row;
      ``Lx`` = soft CE on the labeled part, ``Lu`` = mean squared error of the softmax on the
      unlabeled part, the uniform-prior penalty on all rows.
    * ``rows="labeled"`` (their Clothing1M and WebVision scripts): only the first ``n_labeled`` mixed
      rows are kept (their partners still come from all rows); ``Lu`` is 0 and the penalty uses those
      rows only.
    """
    mixed_x, mixed_t, _ = mixup(inputs, targets, alpha=alpha, rng=rng, generator=generator)
    if rows == "labeled":
        mixed_x, mixed_t = mixed_x[:n_labeled], mixed_t[:n_labeled]
    logits = net(mixed_x)
    lx = soft_cross_entropy(logits[:n_labeled], mixed_t[:n_labeled])
    if logits.shape[0] > n_labeled:
        lu = torch.mean((torch.softmax(logits[n_labeled:], 1) - mixed_t[n_labeled:]) ** 2)
    else:
        lu = logits.new_zeros(())
    return lx, lu, uniform_prior_penalty(logits)


def ramp_position(epoch: int, step: int, n_labeled: int, batch_size: int) -> float:
    """The ``current`` of the originals' ``linear_rampup``: ``epoch + batch_idx / num_iter`` with
    ``num_iter = n_labeled // batch_size + 1`` (their count, one more than the full batches).

    >>> ramp_position(5, 1, 256, 128)
    5.333333333333333
    """
    return epoch + step / (n_labeled // batch_size + 1)


class Head:
    """A linear head ``W f + b`` with its own torch optimizer (SGD or AdamW, the probe's settings)."""

    def __init__(self, dim: int, num_classes: int, *, seed: int, optimizer: str, lr: float,
                 weight_decay: float, momentum: float, device: torch.device):
        w, b = init_head(dim, num_classes, torch.Generator().manual_seed(int(seed)))
        self.W = w.to(device).requires_grad_(True)
        self.b = b.to(device).requires_grad_(True)
        params = [self.W, self.b]
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.float(), self.W.t())

    def step(self, loss: torch.Tensor, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.W.detach().float().cpu().clone(), "bias": self.b.detach().float().cpu().clone()}


def prepare_eval_sets(eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]],
                      dev: torch.device) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    return {name: (resident(f, dev), y.to(dev, torch.long)) for name, (f, y) in (eval_sets or {}).items()}


def warmup_epoch(head: Head, X: torch.Tensor, Y: torch.Tensor, *, batch_size: int, generator: torch.Generator,
                 lr_at, penalty: bool = False) -> float:
    """One CE epoch of ``head`` over all samples (DivideMix's and UNICON's warm-up); mean CE.

    ``lr_at(fraction_of_epoch_done)`` gives the learning rate of each step. ``penalty`` adds the
    confidence penalty :func:`neg_entropy` to the loss (the originals' asymmetric-noise and
    Clothing1M warm-up); the returned mean is of the CE alone, as the originals log it.
    """
    n = X.shape[0]
    perm = torch.randperm(n, generator=generator).to(X.device)
    steps = max(1, math.ceil(n / batch_size))
    total = 0.0
    for k in range(steps):
        rows = perm[k * batch_size:(k + 1) * batch_size]
        logits = head(X.index_select(0, rows))
        ce = F.cross_entropy(logits, Y.index_select(0, rows))
        head.step(ce + neg_entropy(logits) if penalty else ce, lr_at(k / steps))
        total += float(ce.detach()) * rows.numel()
    return total / max(n, 1)


def check_inputs(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """One-line :class:`~turnctl.errors.DataError` for features and labels that cannot be trained on."""
    if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise DataError(f"features must be [N, D] with labels [N]; got {tuple(features.shape)} and "
                        f"{tuple(labels.shape)}")
    if features.shape[0] < 2:
        raise DataError(f"need at least 2 train samples, got {features.shape[0]}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes}), found {lo}..{hi}")
