"""NMTune on cached features: the ``nmtune`` baseline, and step 1 of ``turn-nmtune``.

NMTune (Chen et al., ICLR 2024, "Understanding and Mitigating the Label Noise in Pre-training on
Downstream Tasks") tunes the *features* of a frozen (black-box) backbone with a small residual MLP
and trains the classifier on the tuned features, jointly::

    z = s * MLP(f) + f,   MLP = Linear(D, 4D) - BatchNorm - ReLU - Linear(4D, D),  s in R^D (init 1)
    logits = Linear(D, C)(z)
    L = LABEL(logits, y) + 1.0 * MSE(normalize(z), normalize(f))
        + 0.04 * sum(offdiag(Cov(z))^2) / D - 0.001 * mean_k(sigma_k(z) / sum_j sigma_j(z)),  k <= 5

AdamW (lr 1e-3, wd 1e-4 on every parameter), 30 epochs, batch 64, cosine per step, on the
features it is given (the runner standardises them per dimension when ``probe.standardize`` and
folds that map into the returned head). Definitions, where the formula leaves room:

* ``MSE`` is the mean over the batch and the D dimensions of the squared difference of the
  L2-normalised rows (``F.mse_loss`` of ``F.normalize(., dim=1)``): keeps z's directions close to f's.
* ``Cov(z)`` is the batch covariance, centred, divided by ``B - 1``; the term is the sum of its
  squared off-diagonal entries divided by D (VICReg's covariance term): decorrelates z's dimensions.
* The singular values are those of the batch matrix z (B x D, not centred), descending; the term
  is the mean over the top ``k = min(5, rank)`` of ``sigma_k / sum of ALL singular values`` (the sum
  over the top five only would make the term a constant 1/5). It enters with a minus sign, so
  training *increases* the share of the dominant singular values (NMTune's spectrum regulariser).
* A last batch of one sample is skipped (BatchNorm cannot normalise a single row in training).

Baseline and step 1 differ in two settings (``loss`` and ``select`` of :func:`train_nmtune`;
:func:`turnctl.methods.train_on_features` sets them from the recipe):

* **nmtune** (the baseline) is NMTune as published: ``LABEL`` = CE, the model after the last epoch.
  NMTune targets noise in the *pre-training* data and assumes clean downstream labels; with noisy
  ones its MLP (8 D^2 weights) memorises them: on digits with 60% symmetric noise it ends fitting
  every flipped train label.
* **turn-nmtune step 1** must resist the noise the way TURN's GCE probe does, because its head's
  per-sample losses drive the first cleansing and fine-tuning starts from it. So ``LABEL`` is
  ``nmtune.step1_loss`` (default GCE with ``losses.gce_q``, ``losses.gce_form``), and the model kept
  is the one of the epoch with the best top-1 accuracy on the ``val`` features (``nmtune.step1_select:
  best_val``; given labels, the earliest epoch on ties; the last epoch without a val split). GCE
  alone only slows the memorisation (the MLP fits most flipped labels by epoch 30 either way);
  the kept epoch is the early-learning one, before it. Selecting by accuracy on noisy val labels is
  sound for symmetric noise (below (C-1)/C the noisy accuracy is an increasing affine function of
  the clean one) and what a user of real noisy data can do (see turnctl/holdout.py). On digits at
  60% noise the kept model fits 27% of the flipped train labels against 100% for the baseline and
  97% for GCE's last epoch (docs/PROTOCOL.md has the measurements; TURN's GCE probe fits 7%).

What goes into the Backbone (``head_state``): the Backbone's head is one ``nn.Linear(D, C)`` on
``f``, and its export format has no place for the MLP, so the kept model is **folded** into one
linear head: the ridge-regularised least-squares affine approximation ``z ~ f A + a`` over the
train features, composed with NMTune's head, ``W' = W A^T, b' = W a + b`` (equivalently the ridge
regression of the model's logits on ``[f, 1]``). It is exact when the MLP acts linearly on the data
and otherwise the closest linear map in this sense. It is well-posed for any N and D: the ridge
(on the weights, not the intercept) is ``nmtune.fold_ridge`` times the mean non-zero eigenvalue of
the features' Gram matrix (its trace over ``min(N, D)``), so it is scale-free and keeps the system
positive definite when N < D, where plain least squares has infinitely many solutions. By default
the ridge is chosen from 1e-4 ... 1 as the one whose fold agrees best (top-1) with the model on the
``val`` features, or, without a val split, on a seeded fifth of the train features left out of that
fit (the fold is then refitted on all of them); a tiny ridge would copy the train points rather
than the model. No label is used, so the fold cannot fit a flipped label the model does not (a
larger ridge smooths the model, and fits fewer). Why not distil the logits into a linear head by
gradient descent instead: on digits' 1280-d EfficientNet-Lite0 features (N = 1258 < D, 60% noise,
the step-1 model) a distilled head agreed with the kept model on 93.6-93.9% of the test set
against 94.2% for the ridge fold, at the cost of an optimiser and its settings. The fold's top-1
agreement with the model (train and every eval set) is reported as ``fold_agreement``, the ridge
as ``fold_ridge``.

The per-epoch accuracies in ``history`` are the NMTune model's own (what the nmtune baseline is);
the kept model is returned as ``model_state`` (the runner saves it in ``method_state.pt``) and its
epoch as ``epoch``.

>>> import torch
>>> from turnctl.recipe import NMTuneSection
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(128) % 2
>>> x = torch.randn(128, 8, generator=g) + 4 * torch.nn.functional.one_hot(y, 8).float()
>>> res = train_nmtune(x, y, num_classes=2, seed=0, config=NMTuneSection(epochs=10, lr=1e-2),
...                    eval_sets={"train": (x, y)}, log_every_epoch=False)
>>> len(res.history), res.epoch, res.history[-1]["train_acc"] > 0.9, res.fold_agreement["train"] > 0.9
(10, 10, True, True)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl import metrics
from turnctl.losses import cross_entropy, gce_loss
from turnctl.methods.common import check_inputs, prepare_eval_sets
from turnctl.probe import EVAL_CHUNK, resident
from turnctl.recipe import NMTuneSection
from turnctl.schedule import lr_schedule

log = logging.getLogger("turnctl")


class NMTuneModel(nn.Module):
    """``z = s * MLP(f) + f`` and a linear head; ``forward`` returns ``(logits, z)``.

    >>> m = NMTuneModel(4, 3).eval()
    >>> logits, z = m(torch.zeros(2, 4))
    >>> tuple(logits.shape), tuple(z.shape)
    ((2, 3), (2, 4))
    """

    def __init__(self, dim: int, num_classes: int, *, hidden_mult: int = 4):
        super().__init__()
        hidden = hidden_mult * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.scale = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, num_classes)

    def tune(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * self.mlp(f) + f

    def forward(self, f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.tune(f)
        return self.head(z), z


def mse_regulariser(z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``mean((normalize(z) - normalize(f))^2)`` over rows and dimensions.

    >>> float(mse_regulariser(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])))  # (1 + 1) / 2
    1.0
    """
    return F.mse_loss(F.normalize(z.float(), dim=1), F.normalize(f.float(), dim=1))


def covariance_regulariser(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal entries of the batch covariance of z (divided by B - 1), over D.

    >>> round(float(covariance_regulariser(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))), 4)  # cov 2: (4 + 4) / 2
    4.0
    """
    z = z.float()
    b, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.t() @ zc / max(b - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return (off ** 2).sum() / d


def spectrum_term(z: torch.Tensor, *, top_k: int = 5) -> torch.Tensor:
    """Mean over the top ``k`` singular values of z of ``sigma_k / sum_j sigma_j`` (enters with a minus).

    >>> round(float(spectrum_term(torch.diag(torch.tensor([3.0, 1.0])), top_k=1)), 4)  # 3 / (3 + 1)
    0.75
    """
    s = torch.linalg.svdvals(z.float())
    k = min(int(top_k), s.numel())
    return (s[:k] / s.sum().clamp_min(1e-12)).mean()


CLS_LOSSES = ("ce", "gce")


def classification_loss(logits: torch.Tensor, y: torch.Tensor, *, loss: str = "ce", gce_q: float = 0.7,
                        gce_form: str = "literal") -> torch.Tensor:
    """The label term of NMTune's objective: CE (NMTune's) or GCE (TURN's step-1 loss), batch mean.

    >>> round(float(classification_loss(torch.zeros(1, 2), torch.tensor([0]), loss="gce", gce_q=1.0)), 4)  # 1 - 1/2
    0.5
    """
    if loss == "ce":
        return cross_entropy(logits, y)
    if loss == "gce":
        return gce_loss(logits, y, q=gce_q, form=gce_form)
    raise ValueError(f"loss must be one of {CLS_LOSSES}, got {loss!r}")


def nmtune_loss(logits: torch.Tensor, y: torch.Tensor, z: torch.Tensor, f: torch.Tensor, *,
                config: NMTuneSection, loss: str = "ce", gce_q: float = 0.7,
                gce_form: str = "literal") -> Tuple[torch.Tensor, Dict[str, float]]:
    """NMTune's objective and its four parts: the label term (named ``ce`` or ``gce`` after
    ``loss``), ``mse``, ``cov`` and ``svd``."""
    cls = classification_loss(logits, y, loss=loss, gce_q=gce_q, gce_form=gce_form)
    mse = mse_regulariser(z, f)
    cov = covariance_regulariser(z)
    svd = spectrum_term(z, top_k=config.svd_top_k)
    total = cls + config.mse_weight * mse + config.cov_weight * cov - config.svd_weight * svd
    return total, {loss: float(cls.detach()), "mse": float(mse.detach()), "cov": float(cov.detach()),
                   "svd": float(svd.detach())}


@dataclass
class NMTuneResult:
    """What :func:`train_nmtune` returns.

    ``head_state``: the folded ``nn.Linear(D, C)`` state (float32, CPU) for the Backbone's head.
    ``model_state``: the NMTune model's state dict (MLP, scale, head; CPU) with ``dim``,
    ``num_classes`` and ``hidden_mult`` to rebuild it (:func:`load_model`). ``history``: one dict per
    epoch: ``phase`` ("nmtune"), ``epoch`` (1-based), ``train_loss`` and its parts (``ce`` or ``gce``,
    ``mse``, ``cov``, ``svd``; epoch means), ``lr``, ``<name>_acc`` per eval set (the NMTune model's),
    ``wall_s``. ``epoch``: the epoch whose model was kept (and folded); 0 when no epoch ran.
    ``fold_agreement``: ``{name: fraction}`` top-1 agreement of the folded head with the kept
    model, on the train features and every eval set.
    """

    head_state: Dict[str, torch.Tensor]
    model_state: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    fold_agreement: Dict[str, float] = field(default_factory=dict)
    fold_ridge: Optional[float] = None
    epoch: int = 0

    def fold_summary(self) -> Dict[str, Any]:
        """The kept epoch and the fold's facts, for the run summary (JSON-able)."""
        return {"nmtune_epoch": self.epoch, "nmtune_fold_agreement": self.fold_agreement,
                "nmtune_fold_ridge": self.fold_ridge}


def load_model(model_state: Mapping[str, Any]) -> NMTuneModel:
    """Rebuild an (eval-mode) :class:`NMTuneModel` from :attr:`NMTuneResult.model_state`."""
    m = NMTuneModel(int(model_state["dim"]), int(model_state["num_classes"]),
                    hidden_mult=int(model_state["hidden_mult"]))
    m.load_state_dict(model_state["state_dict"])
    return m.eval()


@torch.no_grad()
def predict(model: NMTuneModel, features: torch.Tensor) -> torch.Tensor:
    """Logits of an NMTune model (eval mode: BatchNorm running statistics), chunked."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(features[s:s + EVAL_CHUNK].to(dev).float())[0] for s in range(0, features.shape[0], EVAL_CHUNK)]
    return torch.cat(out) if out else torch.empty(0, model.head.out_features)


FOLD_RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FOLD_HOLDOUT = 5  # without select_on, one train row in FOLD_HOLDOUT chooses the ridge


@torch.no_grad()
def _fold_moments(model: NMTuneModel, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``X^T X`` and ``X^T Z`` (float64, CPU) with ``X = [f, 1]`` and ``Z = tune(f)``, chunked."""
    dev = next(model.parameters()).device
    d = features.shape[1]
    G = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    R = torch.zeros(d + 1, d, dtype=torch.float64)
    for s in range(0, features.shape[0], EVAL_CHUNK):
        f = features[s:s + EVAL_CHUNK].to(dev).float()
        z = model.tune(f).double().cpu()
        x = torch.cat([f.double().cpu(), torch.ones(f.shape[0], 1, dtype=torch.float64)], 1)
        G += x.t() @ x
        R += x.t() @ z
    return G, R


def _gram_scale(G: torch.Tensor, n: int) -> float:
    """Mean non-zero eigenvalue of the features' Gram matrix: its trace over its rank bound min(N, D)."""
    d = G.shape[0] - 1
    scale = float(torch.diagonal(G)[:d].sum()) / max(min(n, d), 1)
    return scale if scale > 0 else 1.0  # all-zero features: any positive ridge (A = 0) will do


def _solve_fold(model: NMTuneModel, G: torch.Tensor, R: torch.Tensor, ridge: float) -> Dict[str, torch.Tensor]:
    """The head ``W A^T, W a + b`` of the ridge solution ``(G + ridge I_D) [A; a] = R`` (no ridge on a)."""
    d = R.shape[1]
    reg = torch.full((d + 1,), float(ridge), dtype=torch.float64)
    reg[d] = 0.0
    A = torch.linalg.solve(G + torch.diag(reg), R)  # [D + 1, D]
    W = model.head.weight.detach().double().cpu()
    b = model.head.bias.detach().double().cpu()
    return {"weight": (W @ A[:d].t()).float(), "bias": (W @ A[d] + b).float()}


def _agreement(head: Mapping[str, torch.Tensor], model: NMTuneModel, features: torch.Tensor) -> float:
    """Fraction of rows where the linear head's top-1 equals the model's (1 without rows)."""
    if not features.shape[0]:
        return 1.0
    return metrics.accuracy(_linear_logits(head, features).argmax(1).cpu(), predict(model, features).argmax(1).cpu())


@torch.no_grad()
def fold_head(model: NMTuneModel, features: torch.Tensor, *, ridge: Union[float, Sequence[float]] = 1e-3,
              select_on: Optional[torch.Tensor] = None, seed: int = 0) -> Tuple[Dict[str, torch.Tensor], float]:
    """One linear head ``W A^T, W a + b`` from the ridge least-squares fit ``z ~ f A + a`` on
    ``features``; returns ``(head_state, ridge used)``.

    The ridge is ``ridge`` times the mean non-zero eigenvalue of the (uncentred) Gram matrix of f
    (:func:`_gram_scale`), on the weights only (not the intercept); solved in float64, so the
    system is positive definite for any N and D. Given several ridges, the one whose head agrees
    best with the model's top-1 on ``select_on`` wins (ties go to the larger ridge); without
    ``select_on``, each candidate is fitted on all but a seeded ``1 / FOLD_HOLDOUT`` of
    ``features`` and judged on that part, and the winner is refitted on all of them.

    >>> m = NMTuneModel(3, 2).eval()
    >>> _ = torch.nn.init.zeros_(m.mlp[3].weight), torch.nn.init.zeros_(m.mlp[3].bias)  # MLP = 0: z = f
    >>> h, r = fold_head(m, torch.randn(50, 3), ridge=1e-9)
    >>> torch.allclose(h["weight"], m.head.weight, atol=1e-5), r
    (True, 1e-09)
    """
    model.eval()
    n = features.shape[0]
    G, R = _fold_moments(model, features)
    ridges = [float(ridge)] if isinstance(ridge, (int, float)) else sorted((float(r) for r in ridge), reverse=True)
    if len(ridges) == 1:
        return _solve_fold(model, G, R, ridges[0] * _gram_scale(G, n)), ridges[0]
    G_fit, R_fit, n_fit, judge = G, R, n, select_on
    if judge is None:
        held = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:n // FOLD_HOLDOUT]
        judge = features.index_select(0, held.to(features.device)) if held.numel() else features
        if held.numel():  # fit without the judged rows, so a tiny ridge cannot win by copying them
            G_held, R_held = _fold_moments(model, judge)
            G_fit, R_fit, n_fit = G - G_held, R - R_held, n - held.numel()
    scores = [(_agreement(_solve_fold(model, G_fit, R_fit, r * _gram_scale(G_fit, n_fit)), model, judge), r)
              for r in ridges]
    best = max(scores, key=lambda t: t[0])[1]  # max keeps the first (largest ridge) of equal scores
    return _solve_fold(model, G, R, best * _gram_scale(G, n)), best


def _linear_logits(head: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    out = [torch.addmm(head["bias"].to(features.device), features[s:s + EVAL_CHUNK].float(),
                       head["weight"].to(features.device).t()) for s in range(0, features.shape[0], EVAL_CHUNK)]
    return torch.cat(out) if out else torch.empty(0, head["bias"].numel())


SELECTIONS = ("last", "best_val")


class _KeptEpoch:
    """The model to keep: the last epoch's (``last``), or the one of the epoch with the best ``val_acc``
    (``best_val``; strictly better, so the earliest of equal epochs, the least trained, is kept)."""

    def __init__(self, select: str):
        self.select, self.epoch, self.acc, self.state = select, 0, None, None

    def offer(self, model: NMTuneModel, row: Mapping[str, Any]) -> None:
        acc = row.get("val_acc")
        if self.select == "last" or acc is None:
            self.epoch = int(row["epoch"])
            return
        if self.acc is None or acc > self.acc:
            self.epoch, self.acc = int(row["epoch"]), float(acc)
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: NMTuneModel) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def _train_epoch(model: NMTuneModel, opt: torch.optim.Optimizer, X: torch.Tensor, Y: torch.Tensor,
                 perm: torch.Tensor, batches: Sequence[Tuple[int, int]], lrs: Sequence[float], step: int, *,
                 config: NMTuneSection, loss: str, gce_q: float, gce_form: str) -> Dict[str, float]:
    """One pass over ``batches`` of ``perm``; the epoch means of the loss and its parts."""
    model.train()
    sums = {"train_loss": 0.0, loss: 0.0, "mse": 0.0, "cov": 0.0, "svd": 0.0}
    seen = 0
    for s, e in batches:
        rows = perm[s:e]
        f = X.index_select(0, rows).float()
        logits, z = model(f)
        total, parts = nmtune_loss(logits, Y.index_select(0, rows), z, f, config=config, loss=loss,
                                   gce_q=gce_q, gce_form=gce_form)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
        seen += e - s
        sums["train_loss"] += float(total.detach()) * (e - s)
        for k, v in parts.items():
            sums[k] += v * (e - s)
    return {k: v / max(seen, 1) for k, v in sums.items()}


def _log_epoch(row: Mapping[str, Any], epochs: int, loss: str) -> None:
    accs = "  ".join(f"{k[:-4]} {100 * v:.2f}%" for k, v in row.items() if k.endswith("_acc") and v is not None)
    log.info("NMTune epoch %d/%d  loss %.4f (%s %.4f mse %.4f cov %.4f svd %.4f)  %s  %.1fs", row["epoch"], epochs,
             row["train_loss"], loss, row[loss], row["mse"], row["cov"], row["svd"], accs, row["wall_s"])


def _fold_with_agreement(
    model: NMTuneModel, X: torch.Tensor, evals: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], *,
    config: NMTuneSection, seed: int,
) -> Tuple[Dict[str, torch.Tensor], float, Dict[str, float]]:
    """The folded head (ridge chosen on val when there is one), its ridge, and its top-1 agreement
    with the model on the train features and every non-empty eval set."""
    held_out = evals["val"][0] if "val" in evals and evals["val"][0].shape[0] else None
    head, ridge = fold_head(model, X, ridge=FOLD_RIDGES if config.fold_ridge is None else config.fold_ridge,
                            select_on=held_out, seed=seed)
    agreement = {name: _agreement(head, model, fe)
                 for name, fe in [("train", X)] + [(k, v[0]) for k, v in evals.items() if k != "train"]
                 if fe.shape[0]}
    return head, ridge, agreement


def train_nmtune(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    config: NMTuneSection,
    seed: int,
    device: Union[None, str, torch.device] = None,
    eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    log_every_epoch: bool = True,
    loss: str = "ce",
    gce_q: float = 0.7,
    gce_form: str = "literal",
    select: str = "last",
) -> NMTuneResult:
    """Train NMTune on frozen features, keep one epoch's model, fold it; see the module docstring.

    Args:
        features: ``[N, D]`` train features (any float dtype; kept resident, cast per batch).
        labels: ``[N]`` given labels in ``[0, num_classes)``.
        config: the recipe's ``nmtune`` section (epochs, batch size, AdamW lr / weight decay,
            schedule, MLP width, the three regulariser weights, top-k, fold ridge).
        seed: seeds the initialisation (without touching the global RNG), the batch order and the
            fold's hold-out when there is no val set.
        eval_sets: ``{name: (features, labels)}`` evaluated after every epoch as ``<name>_acc``;
            ``val`` also chooses the fold's ridge and, with ``select="best_val"``, the epoch.
        loss: the label term, ``"ce"`` (NMTune's; the nmtune baseline) or ``"gce"`` (TURN's step-1
            loss, with ``gce_q`` and ``gce_form`` as in :func:`turnctl.losses.gce_loss`).
        select: ``"last"`` (NMTune's) or ``"best_val"``: keep the model of the epoch with the best
            ``val_acc`` (the last epoch's when there is no non-empty ``val`` set).
    """
    if loss not in CLS_LOSSES:
        raise ValueError(f"loss must be one of {CLS_LOSSES}, got {loss!r}")
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    check_inputs(features, labels, num_classes)
    dev = dist.compute_device(device)
    X, Y = resident(features, dev), labels.to(dev, torch.long)
    n, dim = X.shape
    B = min(config.batch_size, n)
    evals = prepare_eval_sets(eval_sets, dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = NMTuneModel(dim, num_classes, hidden_mult=config.hidden_mult)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches = [(s, min(s + B, n)) for s in range(0, n, B)]
    if batches and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()  # BatchNorm cannot normalise a single row in training mode
    lrs = lr_schedule(config.lr, len(batches) * config.epochs, config.schedule).tolist()
    gen = torch.Generator().manual_seed(int(seed))
    history: List[Dict[str, Any]] = []
    kept = _KeptEpoch(select)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(dev)
        means = _train_epoch(model, opt, X, Y, perm, batches, lrs, epoch * len(batches), config=config, loss=loss,
                             gce_q=gce_q, gce_form=gce_form)
        last_step = (epoch + 1) * len(batches) - 1
        row: Dict[str, Any] = {"phase": "nmtune", "epoch": epoch + 1, **means,
                               "lr": lrs[last_step] if batches else config.lr}
        for name, (fe, la) in evals.items():
            row[f"{name}_acc"] = metrics.accuracy(predict(model, fe).argmax(1), la, empty=None)
        row["wall_s"] = time.perf_counter() - t0
        history.append(row)
        kept.offer(model, row)
        if log_every_epoch:
            _log_epoch(row, config.epochs, loss)
    kept.restore(model)
    if select == "best_val" and config.epochs and kept.acc is None:
        log.warning("NMTune: no val set to choose the epoch by; keeping the last, which may have fit the label noise")
    elif select == "best_val" and kept.epoch != config.epochs:
        log.info("NMTune: keeping epoch %d of %d (best val accuracy %.2f%%)", kept.epoch, config.epochs,
                 100 * kept.acc)
    head, ridge, agreement = _fold_with_agreement(model, X, evals, config=config, seed=seed)
    model_state = {"dim": dim, "num_classes": num_classes, "hidden_mult": config.hidden_mult,
                   "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return NMTuneResult(head_state=head, model_state=model_state, history=history, fold_agreement=agreement,
                        fold_ridge=ridge, epoch=kept.epoch)
