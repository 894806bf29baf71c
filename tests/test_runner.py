"""turnctl.runner in-process with a fake fine-tuner: which samples each fine-tuning epoch is given,
what is checkpointed and exported, and how the figures are chosen, without DeepSpeed.

The fake computes real per-sample losses and predictions with the backbone (the same
``lockstep.per_sample_pass`` the engine uses) but its "training" only records what it was given,
so every epoch sees the same model: what the runner decides is then checkable by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn.functional as F

import turnctl.finetune
from shardgen import write_toy_shards
from turnctl.lockstep import per_sample_pass
from turnctl.recipe import load_recipe
from turnctl.rundir import RunLayout, checkpoint_tag
from turnctl.runner import train_from_recipe

NUM_CLASSES = 4



@pytest.fixture(autouse=True, scope="module")
def _leave_no_process_group():
    """These tests start a world of one in-process; later modules (test_finetune's engines) must
    find none, as after a CLI call."""
    yield
    from turnctl import distributed as dist

    dist.destroy()

class FakeTuner:
    built = []

    def __init__(self, backbone, recipe):
        self.backbone, self.recipe = backbone.eval(), recipe
        self.epochs, self.checkpoints, self.exports, self.heads = [], [], [], 0
        FakeTuner.built.append(self)

    @property
    def module(self):
        return self.backbone

    def set_head(self, head_state):
        self.backbone.head.load_state_dict({k.split("head.")[-1]: v for k, v in head_state.items()})
        self.heads += 1

    def per_sample_losses(self, info, *, transform, batch_size, num_workers):
        def collect(logits, batch):
            return {"loss": F.cross_entropy(logits.float(), batch["cls"], reduction="none"),
                    "pred": logits.argmax(1)}

        return per_sample_pass(self.backbone, info, transform=transform, batch_size=batch_size,
                               num_workers=num_workers, collect=collect)

    def predict(self, info, *, transform, batch_size, num_workers):
        return per_sample_pass(self.backbone, info, transform=transform, batch_size=batch_size,
                               num_workers=num_workers, collect=lambda logits, b: {"pred": logits.argmax(1)})

    def train_epoch(self, info, *, epoch, total_epochs, keep_idx, **_):
        self.epochs.append((epoch, total_epochs, None if keep_idx is None else np.sort(keep_idx)))
        return {"train_loss": 0.5, "steps": 1, "lr_per_step": [1e-3]}

    def save_checkpoint(self, root, *, tag, client_state, keep):
        self.checkpoints.append((tag, client_state["epoch"]))
        return tag

    def export(self, out_dir, *, class_names=()):
        self.exports.append(out_dir.name)
        self.backbone.save_pretrained(out_dir, class_names=list(class_names))


@pytest.fixture
def fake_tuner(monkeypatch):
    FakeTuner.built = []
    monkeypatch.setattr(turnctl.finetune, "FineTuner", FakeTuner)
    return FakeTuner


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner") / "toy"
    return write_toy_shards(root, counts={"train": [24, 20], "val": [12], "test": [12]}, num_classes=NUM_CLASSES,
                            image_size=16, noise_rate=0.3, seed=1)


def _recipe(toy, out, method, *extra):
    return load_recipe("tiny", [f"method={method}", f"data.shards={toy.root}", f"output.dir={out}",
                                "data.num_workers=0", "features.batch_size=32", "probe.epochs=2",
                                "finetune.epochs=2", "finetune.baseline_epochs=3", *extra])


def test_turn_fine_tunes_each_epoch_on_that_epochs_balanced_selection(tmp_path, toy, fake_tuner):
    out = tmp_path / "turn"
    result = train_from_recipe(_recipe(toy, out, "turn"))
    (tuner,) = fake_tuner.built
    assert tuner.heads == 1  # the probe's head went into the model once, before fine-tuning
    layout = RunLayout(out)
    assert [e for e, _, _ in tuner.epochs] == [0, 1] and all(t == 2 for _, t, _ in tuner.epochs)
    for epoch, _, keep_idx in tuner.epochs:
        sel = layout.load_selection(epoch)
        chosen = np.sort(sel.idx[sel.selected.astype(bool)])
        np.testing.assert_array_equal(keep_idx, chosen)  # trained on exactly what the file says
        assert set(chosen) <= set(sel.idx[sel.keep.astype(bool)])
        counts = np.bincount(sel.given[sel.selected.astype(bool)], minlength=NUM_CLASSES)
        assert len(set(counts.tolist())) == 1  # class-balanced
    assert tuner.checkpoints == [(checkpoint_tag(0), 1), (checkpoint_tag(1), 2)]
    # The model never changes, so validation accuracy ties and the first epoch stays best.
    assert tuner.exports == ["best", "final"]
    assert result["best_epoch"] == 0 and result["best_selected_on"] == "val"
    acc = result["test_accuracy"]
    assert acc["best"] == acc["last"] == acc["max_over_epochs"]
    summary = json.loads(layout.summary_file.read_text())
    assert summary["selection"]["selected"] == int(tuner.epochs[-1][2].size)


def test_a_baseline_fine_tunes_on_all_of_train_for_its_own_epochs(tmp_path, toy, fake_tuner):
    train_from_recipe(_recipe(toy, tmp_path / "fft", "fft-ce"))
    (tuner,) = fake_tuner.built
    assert tuner.heads == 0  # from a random head: no probe
    assert [(e, t) for e, t, _ in tuner.epochs] == [(0, 3), (1, 3), (2, 3)]
    assert all(k is None for _, _, k in tuner.epochs)  # every train sample, no selection file
    assert not RunLayout(tmp_path / "fft").selection_epochs()


def test_a_val_hold_out_is_never_given_to_fine_tuning(tmp_path, toy, fake_tuner):
    out = tmp_path / "held"
    recipe = _recipe(toy, out, "fft-ce", "data.val_split=none", "data.val_fraction=0.25")
    train_from_recipe(recipe)
    held = np.load(RunLayout(out).holdout_file)["idx"]
    assert abs(held.size - 0.25 * 44) <= NUM_CLASSES  # 25% of 44, rounded per class (stratified)
    for _, _, keep_idx in fake_tuner.built[0].epochs:
        assert keep_idx is not None and not set(keep_idx) & set(held.tolist())
        assert keep_idx.size == 44 - held.size


def test_an_lp_baseline_builds_no_fine_tuner(tmp_path, toy, fake_tuner):
    result = train_from_recipe(_recipe(toy, tmp_path / "lp", "lp-ce"))
    assert fake_tuner.built == []
    assert (tmp_path / "lp" / "final" / "model.safetensors").is_file()
    assert result["test_accuracy"]["last"] is not None


def test_summary_says_where_the_time_went_phase_by_phase(tmp_path, toy, fake_tuner, monkeypatch):
    import time

    def slow_epoch(self, info, *, epoch, total_epochs, keep_idx, **_):
        time.sleep(0.3)  # a fine-tuning epoch that costs something measurable
        self.epochs.append((epoch, total_epochs, keep_idx))
        return {"train_loss": 0.5, "steps": 1, "lr_per_step": [1e-3]}

    monkeypatch.setattr(FakeTuner, "train_epoch", slow_epoch)
    turn = train_from_recipe(_recipe(toy, tmp_path / "turn", "turn"))["phase_time_s"]
    assert set(turn) == {"extract", "probe", "loss_pass", "select", "finetune", "eval", "checkpoint", "other"}
    assert turn["finetune"] >= 0.6 and all(v >= 0 for v in turn.values())
    summary = json.loads(RunLayout(tmp_path / "turn").summary_file.read_text())
    assert abs(sum(summary["phase_time_s"].values()) - summary["wall_time_s"]) < 0.05  # nothing counted twice

    fft = train_from_recipe(_recipe(toy, tmp_path / "fft", "fft-ce"))["phase_time_s"]
    assert set(fft) == {"finetune", "eval", "checkpoint", "other"} and fft["finetune"] >= 0.9  # 3 epochs
    lp = train_from_recipe(_recipe(toy, tmp_path / "lp", "lp-ce"))["phase_time_s"]
    assert set(lp) == {"extract", "probe", "checkpoint", "other"}
