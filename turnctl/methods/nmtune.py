"""NMTune on cached features (nmtune; step 1 of turn-nmtune).

NMTune (Chen et al., ICLR 2024, "Understanding and Mitigating the Label Noise in Pre-training on
Downstream Tasks") tunes the *features* of a frozen (black-box) backbone with a small residual MLP
and trains the classifier on the tuned features, jointly (DESIGN.md §4)::

    z = s * MLP(f) + f,   MLP = Linear(D, 4D) - BatchNorm - ReLU - Linear(4D, D),  s in R^D (init 1)
    logits = Linear(D, C)(z)
    L = CE(logits, y) + 1.0 * MSE(normalize(z), normalize(f))
        + 0.04 * sum(offdiag(Cov(z))^2) / D - 0.001 * mean_k(sigma_k(z) / sum_j sigma_j(z)),  k <= 5

AdamW (lr 1e-3, wd 1e-4 on every parameter), 30 epochs, batch 64, cosine per step; the inputs are
the raw (not normalised) features. Definitions, where the formula leaves room:

* ``MSE`` is the mean over the batch and the D dimensions of the squared difference of the
  L2-normalised rows (``F.mse_loss`` of ``F.normalize(., dim=1)``): keeps z's directions close to f's.
* ``Cov(z)`` is the batch covariance, centred, divided by ``B - 1``; the term is the sum of its
  squared off-diagonal entries divided by D (VICReg's covariance term): decorrelates z's dimensions.
* The singular values are those of the batch matrix z (B x D, not centred), descending; the term
  is the mean over the top ``k = min(5, rank)`` of ``sigma_k / sum of ALL singular values`` (the sum
  over the top five only would make the term a constant 1/5). It enters with a minus sign, so
  training *increases* the share of the dominant singular values (NMTune's spectrum regulariser).
* A last batch of one sample is skipped (BatchNorm cannot normalise a single row in training).

What goes into the Backbone (``head_state``): the Backbone's head is one ``nn.Linear(D, C)`` on
``f``, and its export format has no place for the MLP, so the trained model is **folded** into one
linear head: the best (ridge-regularised least-squares) affine approximation ``z ~ f A + a`` over the
train features, composed with NMTune's head, ``W' = W A^T, b' = W a + b``. The fold is exact when the
MLP acts linearly on the data and otherwise the closest linear classifier in this sense. The ridge
(``nmtune.fold_ridge``; relative to the mean eigenvalue of the features' Gram matrix) is by default
chosen from 1e-4 ... 1 as the one whose fold agrees best (top-1) with the NMTune model on the
``val`` features (train when there is no val split): with fewer samples than dimensions the
least-squares problem is underdetermined and a tiny ridge copies the train set but not the model.
No label is used. The fold's top-1 agreement with the model (train and every eval set) is reported
as ``fold_agreement``, the ridge as ``fold_ridge``.
The per-epoch accuracies in ``history`` are the NMTune model's own (what the nmtune baseline is);
the full model is returned as ``model_state`` (the runner saves it in ``method_state.pt``).

>>> import torch
>>> from turnctl.recipe import NMTuneSection
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(128) % 2
>>> x = torch.randn(128, 8, generator=g) + 4 * torch.nn.functional.one_hot(y, 8).float()
>>> res = train_nmtune(x, y, num_classes=2, seed=0, config=NMTuneSection(epochs=10, lr=1e-2),
...                    eval_sets={"train": (x, y)}, log_every_epoch=False)
>>> len(res.history), res.history[-1]["train_acc"] > 0.9, res.fold_agreement["train"] > 0.9
(10, True, True)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from turnctl.methods.common import EVAL_CHUNK, check_inputs, pick_device, prepare_eval_sets, resident
from turnctl.probe import lr_schedule
from turnctl.recipe import NMTuneSection

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


def nmtune_loss(logits: torch.Tensor, y: torch.Tensor, z: torch.Tensor, f: torch.Tensor, *,
                config: NMTuneSection) -> Tuple[torch.Tensor, Dict[str, float]]:
    """NMTune's objective and its four parts (``ce``, ``mse``, ``cov``, ``svd``)."""
    ce = F.cross_entropy(logits.float(), y)
    mse = mse_regulariser(z, f)
    cov = covariance_regulariser(z)
    svd = spectrum_term(z, top_k=config.svd_top_k)
    loss = ce + config.mse_weight * mse + config.cov_weight * cov - config.svd_weight * svd
    return loss, {"ce": float(ce.detach()), "mse": float(mse.detach()), "cov": float(cov.detach()),
                  "svd": float(svd.detach())}


@dataclass
class NMTuneResult:
    """What :func:`train_nmtune` returns.

    ``head_state``: the folded ``nn.Linear(D, C)`` state (float32, CPU) for the Backbone's head.
    ``model_state``: the NMTune model's state dict (MLP, scale, head; CPU) with ``dim``,
    ``num_classes`` and ``hidden_mult`` to rebuild it (:func:`load_model`). ``history``: one dict per
    epoch: ``phase`` ("nmtune"), ``epoch`` (1-based), ``train_loss`` and its parts ``ce``, ``mse``,
    ``cov``, ``svd`` (epoch means), ``lr``, ``<name>_acc`` per eval set (the NMTune model's),
    ``wall_s``. ``fold_agreement``: ``{name: fraction}`` top-1 agreement of the folded head with the
    model, on the train features and every eval set.
    """

    head_state: Dict[str, torch.Tensor]
    model_state: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    fold_agreement: Dict[str, float] = field(default_factory=dict)
    fold_ridge: Optional[float] = None


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


@torch.no_grad()
def fold_head(model: NMTuneModel, features: torch.Tensor, *, ridge: Union[float, Sequence[float]] = 1e-3,
              select_on: Optional[torch.Tensor] = None) -> Tuple[Dict[str, torch.Tensor], float]:
    """One linear head ``W A^T, W a + b`` from the ridge least-squares fit ``z ~ f A + a`` on
    ``features``; returns ``(head_state, ridge used)``.

    The ridge is ``ridge`` times the mean eigenvalue of the (uncentred) Gram matrix of f, on the
    weights only (not the intercept); solved in float64. Given several ridges, the one whose head
    agrees best with the model's top-1 on ``select_on`` (default ``features``) wins; ties go to the
    larger ridge.

    >>> m = NMTuneModel(3, 2).eval()
    >>> _ = torch.nn.init.zeros_(m.mlp[3].weight), torch.nn.init.zeros_(m.mlp[3].bias)  # MLP = 0: z = f
    >>> h, r = fold_head(m, torch.randn(50, 3), ridge=1e-9)
    >>> torch.allclose(h["weight"], m.head.weight, atol=1e-5), r
    (True, 1e-09)
    """
    model.eval()
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
    W = model.head.weight.detach().double().cpu()
    b = model.head.bias.detach().double().cpu()
    scale = float(torch.diagonal(G)[:d].mean()) if d else 0.0
    ridges = [float(ridge)] if isinstance(ridge, (int, float)) else [float(r) for r in ridge]
    target = predict(model, select_on if select_on is not None else features).argmax(1).cpu()
    best = None
    for r in sorted(ridges, reverse=True):
        reg = torch.full((d + 1,), r * scale, dtype=torch.float64)
        reg[d] = 0.0
        A = torch.linalg.solve(G + torch.diag(reg), R)  # [D + 1, D]
        head = {"weight": (W @ A[:d].t()).float(), "bias": (W @ A[d] + b).float()}
        agree = float((_linear_logits(head, select_on if select_on is not None else features).argmax(1).cpu()
                       == target).float().mean()) if len(ridges) > 1 else 1.0
        if best is None or agree > best[0]:
            best = (agree, head, r)
    return best[1], best[2]


def _linear_logits(head: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    out = [torch.addmm(head["bias"].to(features.device), features[s:s + EVAL_CHUNK].float(),
                       head["weight"].to(features.device).t()) for s in range(0, features.shape[0], EVAL_CHUNK)]
    return torch.cat(out) if out else torch.empty(0, head["bias"].numel())


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
) -> NMTuneResult:
    """Train NMTune on raw frozen features; see the module docstring.

    Args:
        features: ``[N, D]`` raw train features (any float dtype; kept resident, cast per batch).
        labels: ``[N]`` given labels in ``[0, num_classes)``.
        config: the recipe's ``nmtune`` section (epochs, batch size, AdamW lr / weight decay,
            schedule, MLP width, the three regulariser weights, top-k, fold ridge).
        seed: seeds the initialisation (without touching the global RNG) and the batch order.
        eval_sets: ``{name: (features, labels)}`` evaluated after every epoch as ``<name>_acc``.
    """
    check_inputs(features, labels, num_classes)
    dev = pick_device(device)
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
    step = 0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        sums = {"train_loss": 0.0, "ce": 0.0, "mse": 0.0, "cov": 0.0, "svd": 0.0}
        seen = 0
        for s, e in batches:
            rows = perm[s:e]
            f = X.index_select(0, rows).float()
            logits, z = model(f)
            loss, parts = nmtune_loss(logits, Y.index_select(0, rows), z, f, config=config)
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            m = e - s
            seen += m
            sums["train_loss"] += float(loss.detach()) * m
            for k, v in parts.items():
                sums[k] += v * m
        row: Dict[str, Any] = {"phase": "nmtune", "epoch": epoch + 1,
                               **{k: v / max(seen, 1) for k, v in sums.items()},
                               "lr": lrs[step - 1] if step else config.lr}
        for name, (fe, la) in evals.items():
            row[f"{name}_acc"] = float((predict(model, fe).argmax(1) == la).float().mean()) if fe.shape[0] else None
        row["wall_s"] = time.perf_counter() - t0
        history.append(row)
        if log_every_epoch:
            accs = "  ".join(f"{k[:-4]} {100 * v:.2f}%" for k, v in row.items() if k.endswith("_acc") and v is not None)
            log.info("NMTune epoch %d/%d  loss %.4f (ce %.4f mse %.4f cov %.4f svd %.4f)  %s  %.1fs", epoch + 1,
                     config.epochs, row["train_loss"], row["ce"], row["mse"], row["cov"], row["svd"], accs,
                     row["wall_s"])
    held_out = evals["val"][0] if "val" in evals and evals["val"][0].shape[0] else None
    head, ridge = fold_head(model, X, ridge=FOLD_RIDGES if config.fold_ridge is None else config.fold_ridge,
                            select_on=held_out)
    agreement = {}
    for name, fe in [("train", X)] + [(k, v[0]) for k, v in evals.items() if k != "train"]:
        if fe.shape[0]:
            agreement[name] = float((_linear_logits(head, fe).argmax(1).cpu()
                                     == predict(model, fe).argmax(1).cpu()).float().mean())
    model_state = {"dim": dim, "num_classes": num_classes, "hidden_mult": config.hidden_mult,
                   "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    return NMTuneResult(head_state=head, model_state=model_state, history=history, fold_agreement=agreement,
                        fold_ridge=ridge)
