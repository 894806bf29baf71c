"""FineTuner pieces that must hold on any ZeRO stage: the probe's head reaches the forward, the LR
schedule, whole optimizer steps per epoch."""

import math

import pytest
import torch

from turnctl import distributed as dist
from turnctl.models import load_backbone
from turnctl.finetune import FineTuner
from turnctl.metrics import accuracy_report
from turnctl.recipe import load_recipe
from turnctl.schedule import lr_at


@pytest.fixture(autouse=True)
def _clean_dist_env():
    """This module keeps its own world of one (below) across tests: leave its environment alone."""
    yield


@pytest.fixture(scope="module")
def world_of_one():
    # One process group for the module: DeepSpeed caches its groups in module globals, so a
    # destroyed and re-created default group breaks the next engine in the same process.
    import os

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    dist.init_distributed(5)
    yield
    dist.destroy()
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.mark.parametrize("stage", [2, 3])
def test_set_head_reaches_the_forward_before_any_step(world_of_one, stage):
    # Regression: setting only DeepSpeed's fp32 master left the module's head random until the
    # first optimizer step, so TURN's first loss pass and GMM ran on a random head.
    r = load_recipe("tiny", [f"deepspeed.zero_stage={stage}", "deepspeed.stage3_param_persistence_threshold=0",
                             "finetune.batch_size=4", "finetune.micro_batch_size=4"])
    dist.set_seed(0, per_rank=False)
    bb = load_backbone(r.model, num_classes=3, ds_config=r.deepspeed_config(1) if stage == 3 else None)
    tuner = FineTuner(bb, r)
    g = torch.Generator().manual_seed(1)
    state = {"weight": torch.randn(3, 32, generator=g), "bias": torch.randn(3, generator=g)}
    tuner.set_head(state)
    x = torch.randn(2, 3, 32, 32, generator=g)
    tuner.engine.eval()
    with torch.no_grad():
        feats = tuner.module.features(x)
        logits = tuner.engine(x)
    torch.testing.assert_close(logits, feats @ state["weight"].T + state["bias"], rtol=1e-5, atol=1e-5)
    from deepspeed.utils import safe_get_full_fp32_param

    torch.testing.assert_close(safe_get_full_fp32_param(tuner.module.head.weight), state["weight"])


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(base_lr=1.0, schedule="constant", warmup_steps=0, global_step=10, progress=0.5) == 1.0
    assert lr_at(base_lr=1.0, schedule="cosine", warmup_steps=0, global_step=0, progress=0.0) == 1.0
    assert lr_at(base_lr=1.0, schedule="cosine", warmup_steps=0, global_step=9, progress=0.5) == pytest.approx(0.5)
    assert lr_at(base_lr=2.0, schedule="cosine", warmup_steps=0, global_step=9, progress=1.0) == pytest.approx(0.0)
    # Warmup: step 0 of 4 gets a quarter, scaled by the cosine at that progress.
    assert lr_at(base_lr=1.0, schedule="cosine", warmup_steps=4, global_step=0, progress=0.25) == pytest.approx(
        0.25 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_micro_steps_are_whole_optimizer_steps(world_of_one):
    r = load_recipe("tiny")  # batch 16, micro 4, world 1 -> 4 micro-steps per optimizer step
    dist.set_seed(0, per_rank=False)
    tuner = FineTuner(load_backbone(r.model, num_classes=3), r)
    assert tuner.accum == 4
    assert tuner.micro_steps_for(100) == 24  # 25 micro-batches -> 6 whole optimizer steps
    assert tuner.micro_steps_for(3) == 4  # never zero: one optimizer step at least
    tuner.recipe = load_recipe("tiny", ["finetune.max_steps_per_epoch=2"])  # a rehearsal's cap
    assert tuner.micro_steps_for(100) == 8 and tuner.micro_steps_for(3) == 4


def test_accuracy_report_per_class_and_confusions():
    import numpy as np

    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 1, 1, 2])
    ok = np.array([1, 1, 1, 1, 1, 1, 0], dtype=bool)  # the last one could not be decoded
    rep = accuracy_report(pred, labels, ok, num_classes=3, class_names=["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(3 / 6)
    assert rep["per_class_accuracy"] == [0.5, 1.0, 0.0]
    assert rep["undecodable"] == 1
    assert rep["most_confused"][0] == {"true": "c", "predicted": "b", "count": 2}


def test_cosine_spans_the_methods_own_epochs(world_of_one, tmp_path):
    # Regression: FFT baselines run finetune.baseline_epochs (5) but the schedule spanned
    # finetune.epochs (4), so their last epoch trained at lr 0.
    from shardgen import write_toy_shards

    from turnctl.data import ToTensorResize, open_split

    write_toy_shards(tmp_path / "s", counts={"train": [24]}, num_classes=3, image_size=8, seed=0)
    info = open_split(tmp_path / "s", "train")
    r = load_recipe("tiny", ["finetune.batch_size=8", "finetune.micro_batch_size=8", "finetune.epochs=1",
                             "finetune.schedule=cosine", "finetune.warmup_steps=0"])
    dist.set_seed(0, per_rank=False)
    tuner = FineTuner(load_backbone(r.model, num_classes=3), r)
    tf = ToTensorResize(32)
    first = tuner.train_epoch(info, epoch=0, total_epochs=2, keep_idx=None, transform=tf, num_workers=0, seed=0)
    assert first["optimizer_steps"] == 3
    assert first["lr"] == pytest.approx(r.finetune.lr * 0.5)  # half-way through a 2-epoch cosine
    last = tuner.train_epoch(info, epoch=1, total_epochs=2, keep_idx=None, transform=tf, num_workers=0, seed=0)
    assert last["lr"] == pytest.approx(0.0, abs=1e-12)


def test_train_epoch_reports_where_its_time_went(world_of_one, tmp_path):
    # issue #15: the epoch's seconds split into data wait, forward, backward, step and turnctl's
    # own bookkeeping, covering the loop's wall time.
    from shardgen import write_toy_shards

    from turnctl.data import ToTensorResize, open_split

    write_toy_shards(tmp_path / "s", counts={"train": [24]}, num_classes=3, image_size=8, seed=0)
    info = open_split(tmp_path / "s", "train")
    r = load_recipe("tiny", ["finetune.batch_size=8", "finetune.micro_batch_size=8"])
    dist.set_seed(0, per_rank=False)
    tuner = FineTuner(load_backbone(r.model, num_classes=3), r)
    out = tuner.train_epoch(info, epoch=0, total_epochs=1, keep_idx=None, transform=ToTensorResize(32),
                            num_workers=0, seed=0)
    split = out["time_split_s"]
    assert set(split) == {"data", "forward", "backward", "step", "bookkeeping"}
    assert all(v >= 0 for v in split.values()) and split["forward"] > 0 and split["backward"] > 0, split
    assert 0.9 * out["wall_s"] - 0.005 <= sum(split.values()) <= out["wall_s"] + 0.005, (split, out["wall_s"])


def test_nonfinite_loss_and_stop_requests_are_agreed_per_step():
    """The per-micro-step check (one all-reduce on many ranks; here a world of one): a NaN/inf
    loss names epoch, step and sample idx; a pending stop request is returned, not raised."""
    from types import SimpleNamespace

    from turnctl.errors import TurnctlError
    from turnctl.finetune import FineTuner
    from turnctl.preempt import StopRequest

    me = SimpleNamespace(world=1)
    batch = {"idx": torch.tensor([5, 9, 11])}
    ok = torch.tensor([0.5, 1.0, 2.0])
    assert FineTuner._check_step(me, ok, batch, 1, 3, None) is False
    stop = StopRequest()
    assert FineTuner._check_step(me, ok, batch, 1, 3, stop) is False
    stop.signum = 15  # what the SIGTERM handler records
    assert FineTuner._check_step(me, ok, batch, 1, 3, stop) is True
    bad = torch.tensor([0.5, float("nan"), float("inf")])
    with pytest.raises(TurnctlError, match=r"non-finite loss at fine-tune epoch 1, step 3 \(idx \[9, 11\]\)"):
        FineTuner._check_step(me, bad, batch, 1, 3, stop)


def test_stop_request_handles_sigterm_once_and_restores_the_handler():
    import os
    import signal

    from turnctl.preempt import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's repeat: still alive, still one request
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
