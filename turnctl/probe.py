"""Linear probing on cached features (TURN step 1 and the LP baselines), on one rank.

The caller picks the rank (rank 0 in ``train``) and broadcasts the resulting head; everything here
is local. The probe is ``g(z) = W z + b`` trained for ``probe.epochs`` epochs with CE, GCE or ELR
(``probe.loss``; constants in ``losses``), mini-batches of ``probe.batch_size`` drawn from one
seeded permutation per epoch, SGD with momentum or AdamW, constant or per-step cosine learning rate.

Why it is fast (20 epochs over 2.4M x 1024 features, i.e. 375k steps, in well under a minute on one
GPU):

* the features are moved to the device once and stay in their dtype (fp16 halves the memory);
  each batch is an ``index_select`` of a resident tensor, cast to float32 there;
* no Python per sample and no host sync per step: the learning-rate schedule
  (turnctl/schedule.py) is a device tensor indexed by a device step counter, the loss is summed on the device and read once per epoch;
* the optimizer update is written out (the same arithmetic as ``torch.optim.SGD``/``AdamW``,
  checked against them in the tests) so that on CUDA one whole step - gather, forward, loss,
  backward, update - is captured once as a CUDA graph and replayed: one launch per step instead
  of ~40 small kernels (``cuda_graph=False`` turns this off; a failed capture falls back to eager).

>>> import torch
>>> from turnctl.recipe import LossSection, ProbeSection
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(200) % 2
>>> x = torch.randn(200, 8, generator=g) + 3 * y[:, None].float()
>>> res = train_linear_probe(x, y, num_classes=2, seed=0, log_every_epoch=False,
...                          probe=ProbeSection(epochs=5, loss="ce", optimizer="adamw", lr=0.1,
...                                            batch_size=20),
...                          losses=LossSection(), eval_sets={"train": (x, y)})
>>> res.history[-1]["train_acc"] > 0.9
True
>>> predict(res.head_state, x).shape
torch.Size([200, 2])
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl import metrics
from turnctl.errors import DataError
from turnctl.losses import ELRTargets, gce_loss
from turnctl.recipe import LossSection, ProbeSection
from turnctl.logger import track
from turnctl.schedule import lr_schedule

log = logging.getLogger("turnctl")

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults
ADAM_EPS = 1e-8
EVAL_CHUNK = 65536
_WARMUP_STEPS = 3  # eager steps on a side stream before capture, as torch.cuda.graphs requires


@dataclass
class ProbeResult:
    """What :func:`train_linear_probe` returns.

    ``head_state`` is an ``nn.Linear(D, C)`` state dict (``weight`` [C, D], ``bias`` [C], float32,
    CPU). ``history`` holds one dict per epoch: ``phase`` ("lp"), ``epoch`` (1-based),
    ``train_loss`` (mean over the epoch's samples), ``lr`` (the last step's), one ``<name>_acc``
    (a fraction) per eval set, ``wall_s`` (the epoch, eval included) and ``samples_per_s``
    (training only). ``elr_state`` is the ELR target table when ``probe.loss == "elr"``.
    """

    head_state: Dict[str, torch.Tensor]
    history: List[Dict[str, Any]] = field(default_factory=list)
    elr_state: Optional[Dict[str, Any]] = None
    device: str = "cpu"
    cuda_graph: bool = False


def resident(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Move once, keeping half precision (half the memory) but nothing exotic; batches are cast to
    float32 when used."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    return x.to(dev).contiguous()


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> None:
    if features.dim() != 2:
        raise DataError(f"{what}: features must be [N, D], got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise DataError(f"{what}: {features.shape[0]} feature rows but labels of shape {tuple(labels.shape)}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{what}: labels must lie in [0, {num_classes}), found {lo}..{hi}")


def init_head(dim: int, num_classes: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation (uniform in +-1/sqrt(D)), from a seeded generator."""
    bound = 1.0 / math.sqrt(dim) if dim > 0 else 0.0
    w = torch.empty(num_classes, dim).uniform_(-bound, bound, generator=generator)
    b = torch.empty(num_classes).uniform_(-bound, bound, generator=generator)
    return w, b


class _Trainer:
    """The probe's state on the device and one training step that needs no host sync."""

    def __init__(self, X, Y, keys, *, num_classes, probe: ProbeSection, losses: LossSection,
                 w0, b0, total_steps: int):
        dev = X.device
        self.X, self.Y, self.keys, self.probe, self.losses = X, Y, keys, probe, losses
        self.W = w0.to(dev).requires_grad_(True)
        self.b = b0.to(dev).requires_grad_(True)
        self.lr_table = lr_schedule(probe.lr, total_steps, probe.schedule).to(dev)
        self.gstep = torch.zeros(1, dtype=torch.long, device=dev)  # optimizer steps taken so far
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        self.bufs = {n: [torch.zeros_like(p.detach()) for p in (self.W, self.b)]
                     for n in (("mom",) if probe.optimizer == "sgd" else ("m", "v"))}
        self.elr = None
        if probe.loss == "elr":
            n_keys = int(keys.max()) + 1 if keys is not None and keys.numel() else X.shape[0]
            self.elr = ELRTargets(n_keys, num_classes, beta=losses.elr_beta, lam=losses.elr_lambda,
                                  device=dev)

    def loss(self, logits, y, rows):
        name = self.probe.loss
        if name == "ce":
            return F.cross_entropy(logits, y)
        if name == "gce":
            return gce_loss(logits, y, q=self.losses.gce_q, form=self.losses.gce_form)
        key = self.keys.index_select(0, rows) if self.keys is not None else rows
        return self.elr(logits, y, key)

    def step(self, rows: torch.Tensor) -> None:
        x = self.X.index_select(0, rows).float()
        y = self.Y.index_select(0, rows)
        logits = torch.addmm(self.b, x, self.W.t())
        loss = self.loss(logits, y, rows)
        grads = torch.autograd.grad(loss, (self.W, self.b))
        with torch.no_grad():
            # index_select, not lr_table[gstep]: a 0-d tensor index would call .item() (a sync).
            lr = self.lr_table.index_select(0, self.gstep)
            wd, params = self.probe.weight_decay, (self.W, self.b)
            if self.probe.optimizer == "sgd":
                # torch.optim.SGD: g += wd * p; buf = m * buf + g (buf starts as g); p -= lr * buf
                mu = self.probe.momentum
                for p, g, buf in zip(params, grads, self.bufs["mom"]):
                    g = g.add(p, alpha=wd) if wd else g
                    if mu:
                        buf.mul_(mu).add_(g)
                        g = buf
                    p.sub_(lr * g)
            else:
                # torch.optim.AdamW: p *= 1 - lr * wd; bias-corrected Adam step, eps outside sqrt
                b1, b2 = ADAM_BETAS
                # bias corrections in float64, as torch.optim does them in Python floats
                t = (self.gstep + 1).to(torch.float64)
                bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
                bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t)).to(torch.float32)
                for p, g, m, v in zip(params, grads, self.bufs["m"], self.bufs["v"]):
                    p.mul_(1.0 - lr * wd)
                    m.mul_(b1).add_(g, alpha=1.0 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                    p.sub_((lr / bc1) * m / (v.sqrt() / bc2_sqrt + ADAM_EPS))
            self.gstep.add_(1)
            self.loss_sum.add_(loss.detach() * rows.numel())

    def head_state(self) -> Dict[str, torch.Tensor]:
        return {"weight": self.W.detach().float().cpu().clone(), "bias": self.b.detach().float().cpu().clone()}


class _GraphStep:
    """One full-batch step captured as a CUDA graph; batch rows come from a device permutation."""

    def __init__(self, trainer: _Trainer, perm: torch.Tensor, batch_size: int):
        self.t, self.perm, self.B = trainer, perm, batch_size
        self.pos = torch.zeros((), dtype=torch.long, device=perm.device)
        self.ar = torch.arange(batch_size, device=perm.device)
        self.graph = None

    def _body(self) -> None:
        rows = self.perm.index_select(0, self.pos * self.B + self.ar)
        self.t.step(rows)
        self.pos.add_(1)

    def warmup_and_capture(self) -> None:
        """Run the next few *real* steps eagerly on a side stream, then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # records only (pos and gstep do not advance); thread_local: a DataLoader pin-memory
        # thread touching CUDA meanwhile must not invalidate the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()
        self.graph = graph

    def __call__(self) -> None:
        self.graph.replay()


def _accuracy_on(W, b, X, Y) -> Tuple[float, float]:
    """(top-1, top-5) accuracy of the head on features ``X``; logits in chunks, never all at once."""
    pred, top5 = [], []
    for s in range(0, X.shape[0], EVAL_CHUNK):
        logits = torch.addmm(b, X[s:s + EVAL_CHUNK].float(), W.t())
        pred.append(logits.argmax(1))
        top5.append(metrics.topk_hits(logits, Y[s:s + EVAL_CHUNK], metrics.TOP_K))
    if not pred:
        return 0.0, 0.0
    return (metrics.accuracy(torch.cat(pred), Y, empty=0.0),
            metrics.hit_rate(torch.cat(top5).cpu().numpy(), empty=0.0))


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    probe: ProbeSection,
    losses: LossSection,
    seed: int,
    device: Union[None, str, torch.device] = None,
    idx: Optional[torch.Tensor] = None,
    eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    log_every_epoch: bool = True,
    cuda_graph: Optional[bool] = None,
) -> ProbeResult:
    """Train ``nn.Linear(D, C)`` on frozen features with the recipe's probe settings.

    Args:
        features: ``[N, D]`` fp16/bf16/fp32, any device; moved to ``device`` once.
        labels: ``[N]`` given (possibly noisy) labels in ``[0, num_classes)``.
        probe, losses: the recipe sections (loss ce/gce/elr, optimizer sgd/adamw, lr, weight decay,
            momentum, batch size, constant/cosine schedule, epochs; GCE q and form, ELR beta and
            lambda).
        seed: seeds the head initialisation and the per-epoch permutations (one CPU generator,
            so the sample order is the same on any device).
        device: ``None``/"auto" = this rank's GPU when there is one, else CPU (``distributed.compute_device``).
        idx: ``[N]`` the samples' dataset idx; ELR targets are keyed by it (default ``arange(N)``).
        eval_sets: ``{name: (features, labels)}`` evaluated after every epoch as ``<name>_acc``.
        cuda_graph: capture the step as a CUDA graph (default: on CUDA). Falls back to eager
            steps, with a warning, if the capture fails.

    The last partial batch of an epoch is trained too (eagerly, outside the graph). Returns a
    :class:`ProbeResult`; the history is also logged per epoch unless ``log_every_epoch=False``.
    """
    _check_inputs(features, labels, num_classes, "linear probe")
    if idx is not None and (idx.dim() != 1 or idx.shape[0] != features.shape[0]):
        raise DataError(f"linear probe: idx must be [N] = [{features.shape[0]}], got {tuple(idx.shape)}")
    dev = dist.compute_device(device)
    n, dim = features.shape
    B = min(probe.batch_size, max(n, 1))
    steps_per_epoch = math.ceil(n / B) if n else 0
    total = steps_per_epoch * probe.epochs

    gen = torch.Generator().manual_seed(int(seed))
    w0, b0 = init_head(dim, num_classes, gen)
    X, Y = resident(features, dev), labels.to(dev, torch.long)
    keys = idx.to(dev, torch.long) if idx is not None else None
    evals = {}
    for name, (fe, la) in (eval_sets or {}).items():
        _check_inputs(fe, la, num_classes, f"eval set '{name}'")
        evals[name] = (resident(fe, dev), la.to(dev, torch.long))

    trainer = _Trainer(X, Y, keys, num_classes=num_classes, probe=probe, losses=losses,
                       w0=w0, b0=b0, total_steps=total)
    use_graph = (dev.type == "cuda") if cuda_graph is None else bool(cuda_graph and dev.type == "cuda")
    full, rem = (n // B, n % B) if n else (0, 0)
    perm_dev = torch.empty(n, dtype=torch.long, device=dev)
    graph_step = _GraphStep(trainer, perm_dev, B) if use_graph and full > _WARMUP_STEPS else None

    history: List[Dict[str, Any]] = []
    for epoch in range(probe.epochs):
        t0 = time.perf_counter()
        perm_dev.copy_(torch.randperm(n, generator=gen))
        trainer.loss_sum.zero_()
        done = 0  # full batches of this epoch already trained
        if graph_step is not None:
            graph_step.pos.zero_()
            if graph_step.graph is None:
                try:
                    graph_step.warmup_and_capture()  # trains the first few batches for real
                except Exception as err:  # a failed capture costs speed, never correctness
                    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                    log.warning("linear probe: CUDA graph capture failed (%s); running eagerly", msg)
                    done, graph_step = int(graph_step.pos), None
            if graph_step is not None:
                for _ in range(int(graph_step.pos), full):
                    graph_step()
                done = full
        # A CPU probe on millions of features can take minutes per epoch: a log file gets progress.
        steps = track(range(done, full), f"LP epoch {epoch + 1}/{probe.epochs}", total=full - done,
                      batch_size=B) if log_every_epoch else range(done, full)
        for k in steps:
            trainer.step(perm_dev[k * B:(k + 1) * B])
        if rem:
            trainer.step(perm_dev[full * B:])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_s = time.perf_counter() - t0
        row: Dict[str, Any] = {"phase": "lp", "epoch": epoch + 1,
                               "train_loss": float(trainer.loss_sum) / max(n, 1),
                               "lr": float(trainer.lr_table[min(int(trainer.gstep) - 1, total - 1)]) if total else probe.lr}
        with torch.no_grad():
            for name, (fe, la) in evals.items():
                row[f"{name}_acc"], top5 = _accuracy_on(trainer.W, trainer.b, fe, la)
                if num_classes > metrics.TOP_K:  # with fewer classes every label is in the top 5
                    row[f"{name}_top5"] = top5
        row["wall_s"] = time.perf_counter() - t0
        row["samples_per_s"] = n / train_s if train_s > 0 else float("inf")
        history.append(row)
        if log_every_epoch:
            accs = "  ".join(f"{k[:-4]} {100 * v:.2f}%" for k, v in row.items() if k.endswith("_acc"))
            log.info("LP epoch %d/%d  %s loss %.4f  %s  %.1fs  %.0f samples/s", epoch + 1,
                     probe.epochs, probe.loss, row["train_loss"], accs, row["wall_s"], row["samples_per_s"])

    return ProbeResult(
        head_state=trainer.head_state(), history=history,
        elr_state=trainer.elr.state_dict() if trainer.elr is not None else None,
        device=str(dev), cuda_graph=graph_step is not None and graph_step.graph is not None,
    )


def _head_tensors(head_state: Mapping[str, torch.Tensor], dev: torch.device):
    try:
        w, b = head_state["weight"], head_state["bias"]
    except KeyError:
        raise DataError("head_state must be an nn.Linear state dict with 'weight' and 'bias'") from None
    return w.to(dev, torch.float32), b.to(dev, torch.float32)


@torch.no_grad()
def predict(head_state: Mapping[str, torch.Tensor], features: torch.Tensor, *,
            device: Union[None, str, torch.device] = None) -> torch.Tensor:
    """Logits ``[N, C]`` (float32) of a probe head on features, returned on the features' device.

    Computed in chunks on ``device`` (default: the features' own device).

    >>> import torch
    >>> predict({"weight": torch.eye(2), "bias": torch.zeros(2)}, torch.tensor([[1.0, 2.0]]))
    tensor([[1., 2.]])
    """
    dev = torch.device(device) if device is not None else features.device
    w, b = _head_tensors(head_state, dev)
    out = []
    for s in range(0, features.shape[0], EVAL_CHUNK):
        out.append(torch.addmm(b, features[s:s + EVAL_CHUNK].to(dev).float(), w.t()).to(features.device))
    return torch.cat(out) if out else torch.empty(0, w.shape[0], device=features.device)


@torch.no_grad()
def accuracy(head_state: Mapping[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, *,
             device: Union[None, str, torch.device] = None) -> float:
    """Top-1 accuracy (a fraction) of a probe head on features.

    >>> import torch
    >>> accuracy({"weight": torch.eye(2), "bias": torch.zeros(2)},
    ...          torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    0.5
    """
    dev = torch.device(device) if device is not None else features.device
    w, b = _head_tensors(head_state, dev)
    return _accuracy_on(w, b, features.to(dev), labels.to(dev, torch.long))[0]


# ---- input standardisation, folded into the head -------------------------------------------

def standardizer(features: torch.Tensor, *, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float32, CPU) of train features, for :func:`standardize`.

    A dimension with (near) zero variance gets std 1, so it stays constant instead of exploding.
    Computed in float64 chunks: fp16 features summed over millions of rows would lose precision.

    >>> import torch
    >>> m, s = standardizer(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    >>> m.tolist(), s.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    """
    n = features.shape[0]
    if n == 0:
        d = features.shape[1]
        return torch.zeros(d), torch.ones(d)
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for s in range(0, n, EVAL_CHUNK):
        x = features[s:s + EVAL_CHUNK].to("cpu", torch.float64)
        total += x.sum(0)
        sq += (x * x).sum(0)
    mean = total / n
    var = (sq / n - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > eps, std, torch.ones_like(std))
    return mean.float(), std.float()


def standardize(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(features - mean) / std`` in float32 (on the features' device)."""
    return (features.float() - mean.to(features.device)) / std.to(features.device)


def fold_standardization(head_state: Mapping[str, torch.Tensor], mean: torch.Tensor,
                         std: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The head on raw features equal to ``head_state`` on standardised ones.

    ``W (x - m) / s + b = (W / s) x + (b - (W / s) m)``, computed in float64.

    >>> import torch
    >>> h = {"weight": torch.tensor([[2.0, -1.0]]), "bias": torch.tensor([0.5])}
    >>> m, s = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    >>> x = torch.tensor([[3.0, 10.0]])
    >>> f = fold_standardization(h, m, s)
    >>> bool(torch.allclose(predict(f, x), predict(h, standardize(x, m, s))))
    True
    """
    w, b = _head_tensors(head_state, torch.device("cpu"))
    w_raw = w.double() / std.double()[None, :]
    b_raw = b.double() - w_raw @ mean.double()
    return {"weight": w_raw.float(), "bias": b_raw.float()}
