"""TURN end to end with the `tiny` recipe on two CPU ranks (ZeRO-2 and ZeRO-3), eval, --stop-after."""

import json
from pathlib import Path

import numpy as np
import pytest

from launch import check, deepspeed_cmd, last_json, run, turnctl_cmd

pytestmark = pytest.mark.multirank

NUM_CLASSES = 4


def _train(shards, out, *extra, stage=2, timeout=420):
    args = ["train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--json",
            "--set", f"deepspeed.zero_stage={stage}", "--set", "deepspeed.stage3_param_persistence_threshold=0",
            "--set", "data.num_workers=0", *extra]
    return check(run(deepspeed_cmd(args), timeout=timeout))


def _metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _check_run(run_dir, num_train):
    lines = _metrics(run_dir)
    lp = [l for l in lines if l["phase"] == "lp"]
    fft = [l for l in lines if l["phase"] == "fft"]
    assert len(lp) == 5 and len(fft) == 2
    for e, line in enumerate(fft):
        assert line["epoch"] == e
        sel = np.load(Path(run_dir) / "selection" / f"epoch_{e}.npz")
        # Every idx exactly once, in order.
        assert np.array_equal(np.sort(sel["idx"]), np.arange(num_train))
        assert len(sel["idx"]) == num_train
        selected = sel["selected"].astype(bool)
        assert selected.sum() == line["selected"] > 0
        # Class-balanced (no fallback class in this data): the same count for every class.
        per_class = np.bincount(sel["given"][selected], minlength=NUM_CLASSES)
        if not line["fallback_classes"]:
            assert len(set(per_class.tolist())) == 1, per_class
        assert set(selected.nonzero()[0]) <= set(sel["keep"].nonzero()[0]) | set()
        assert 0.0 <= line["selected_purity"] <= 1.0
        assert "test_accuracy" in line and "val_accuracy" in line
    assert (Path(run_dir) / "final" / "config.json").is_file()
    assert (Path(run_dir) / "final" / "model.safetensors").is_file()
    assert (Path(run_dir) / "recipe.yaml").is_file()
    return lines


@pytest.mark.parametrize("stage", [2, 3])
def test_turn_two_ranks_then_eval_reproduces_the_last_accuracy(run_shards, tiny_reference_run, tmp_path, stage):
    if stage == 2:
        out, result = tiny_reference_run  # conftest: ZeRO-2, shared with the fault tests
    else:
        out = tmp_path / f"run-z{stage}"
        result = last_json(_train(run_shards, out, stage=stage).stdout)
    lines = _check_run(out, 117)
    assert result["test_accuracy"]["last"] == pytest.approx(lines[-1]["test_accuracy"])
    ev = last_json(check(run(turnctl_cmd(["eval", "--checkpoint", str(out / "final"), "--json"]),
                             timeout=180)).stdout)
    assert ev["accuracy"] == pytest.approx(lines[-1]["test_accuracy"], abs=1e-6)


def test_stop_after_then_resume_refuses_a_different_recipe(run_shards, tmp_path):
    # Resuming with the same recipe and ending where an uninterrupted run ends: tests/test_faults.py.
    out = tmp_path / "r"
    stopped = last_json(_train(run_shards, out, "--stop-after", "0").stdout)
    assert stopped["stopped_after_epoch"] == 0
    assert (out / "selection" / "epoch_0.npz").is_file() and not (out / "selection" / "epoch_1.npz").exists()
    assert (out / "checkpoints" / "latest").read_text() == "epoch_0000"
    res = run(turnctl_cmd(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(out),
                           "--resume", "--set", "finetune.lr=0.5"]), timeout=120)
    assert res.returncode == 2
    assert "recipe differs" in res.stderr


def test_num_classes_mismatch_is_a_clear_error(run_shards, tmp_path):
    res = run(turnctl_cmd(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(tmp_path / "x"),
                           "--set", "data.num_classes=7"]), timeout=120)
    assert res.returncode == 2
    assert "data.num_classes=7 but the shards" in res.stderr
