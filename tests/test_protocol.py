"""The evaluation protocol (docs/PROTOCOL.md): nothing is chosen on test.

``best/`` and every "best" figure come from validation accuracy (a val split or a train-time
hold-out); without validation data there is no best; the papers' maximum over epochs is reported
under its own name. Single-process runs of the ``tiny`` recipe on toy shards without a val split.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from launch import check, last_json, run, turnctl_cmd
from turnctl.holdout import stratified_holdout

FAST = ["--set", "data.num_workers=0", "--set", "features.batch_size=32"]


@pytest.fixture(scope="module")
def no_val_shards(tmp_path_factory):
    from shardgen import write_toy_shards

    out = tmp_path_factory.mktemp("protocol") / "toy"
    toy = write_toy_shards(out, counts={"train": [40, 40, 37], "test": [20, 20]}, num_classes=4,
                           image_size=16, seed=3, noise_rate=0.4)
    toy.path = out
    return toy


def _train(shards, out, method, *extra, expect_ok=True):
    res = run(turnctl_cmd(["train", "--recipe", "tiny", "--method", method, "--shards", str(shards),
                           "--out", str(out), "--json", *FAST, *extra]), timeout=300)
    return (last_json(check(res).stdout), res) if expect_ok else res


def _lines(run_dir, phase):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == phase]


def _first_argmax(values):
    return int(np.argmax(np.asarray(values)))  # numpy: the first of equal maxima


def test_without_validation_there_is_no_best(no_val_shards, tmp_path):
    out = tmp_path / "turn"
    result, res = _train(no_val_shards.path, out, "turn")
    assert "no validation data" in res.stderr
    assert result["test_accuracy"]["best"] is None and result["best_selected_on"] is None
    assert result["best_epoch"] is None and result["best"] is None
    assert not (out / "best").exists()  # never a test-selected checkpoint
    fft = _lines(out, "fft")
    assert result["test_accuracy"]["last"] == pytest.approx(fft[-1]["test_accuracy"])
    assert result["test_accuracy"]["max_over_epochs"] == pytest.approx(max(l["test_accuracy"] for l in fft))
    assert all("val_accuracy" not in l for l in fft)


def test_turn_holds_out_validation_and_never_trains_or_selects_it(no_val_shards, tmp_path):
    out = tmp_path / "turn"
    result, _ = _train(no_val_shards.path, out, "turn", "--set", "data.val_fraction=0.25",
                       "--set", "finetune.epochs=3")
    held = np.load(out / "validation_holdout.npz")["idx"]
    want = np.flatnonzero(stratified_holdout(no_val_shards.labels["train"]["cls"], 0.25, seed=0))
    assert np.array_equal(held, want) and held.size == 29  # round(0.25 * n_c) per class, 117 samples
    fft = _lines(out, "fft")
    for line in fft:
        sel = np.load(out / "selection" / f"epoch_{line['epoch']}.npz")
        mask = sel["heldout"].astype(bool)
        assert np.array_equal(np.flatnonzero(mask), held)
        assert not (sel["selected"].astype(bool) & mask).any()
        assert not (sel["keep"].astype(bool) & mask).any()
        assert 0.0 <= line["val_accuracy"] <= 1.0
    vals = [l["val_accuracy"] for l in fft]
    best_i = _first_argmax(vals)
    assert result["best_selected_on"] == "val" and result["best_epoch"] == fft[best_i]["epoch"]
    assert result["test_accuracy"]["best"] == pytest.approx(fft[best_i]["test_accuracy"])
    assert result["val_accuracy"]["best"] == pytest.approx(max(vals))
    assert (out / "best" / "turnctl.json").is_file()
    # The LP lines of step 1 were validated on the same hold-out.
    assert all("val_acc" in l for l in _lines(out, "lp"))


def test_fft_baseline_trains_on_the_pool_only(no_val_shards, tmp_path):
    out = tmp_path / "fft"
    result, _ = _train(no_val_shards.path, out, "fft-ce", "--set", "data.val_fraction=0.25",
                       "--set", "finetune.baseline_epochs=2")
    fft = _lines(out, "fft")
    pool = 117 - 29
    # Whole optimizer steps of 16 over the 88 pool samples: 5 steps = 80 samples per epoch.
    assert all(l["samples"] == (pool // 16) * 16 for l in fft)
    assert result["best_selected_on"] == "val"
    best_i = _first_argmax([l["val_accuracy"] for l in fft])
    assert result["test_accuracy"]["best"] == pytest.approx(fft[best_i]["test_accuracy"])


@pytest.fixture(scope="module")
def contrary_val_shards(tmp_path_factory):
    """A val split whose labels are all wrong on purpose ((true + 1) mod C): validation accuracy then
    peaks at another epoch than test accuracy, so selecting on test would give another figure."""
    from shardgen import write_toy_shards

    out = tmp_path_factory.mktemp("protocol") / "contrary"
    write_toy_shards(out, counts={"train": [40, 40, 37], "val": [24], "test": [20, 20]}, num_classes=4,
                     image_size=16, seed=3, noise_rate=0.4, label_offset={"val": 1})
    return out


@pytest.mark.parametrize("method,extra,keys", [
    ("lp-ce", ["probe.epochs=8", "probe.lr=0.001", "probe.optimizer=sgd"], ("val_acc", "test_acc", "lp")),
    ("fft-ce", ["finetune.baseline_epochs=4"], ("val_accuracy", "test_accuracy", "fft")),
])
def test_best_is_chosen_on_validation_never_on_test(contrary_val_shards, tmp_path, method, extra, keys):
    val_key, test_key, phase = keys
    out = tmp_path / method
    result, _ = _train(contrary_val_shards, out, method, *[a for e in extra for a in ("--set", e)])
    rows = _lines(out, phase)
    vals, tests = [l[val_key] for l in rows], [l[test_key] for l in rows]
    best_i = _first_argmax(vals)
    assert tests[best_i] < max(tests), "the data no longer separates val- from test-selection"
    assert result["test_accuracy"]["best"] == pytest.approx(tests[best_i])
    assert result["test_accuracy"]["max_over_epochs"] == pytest.approx(max(tests))
    assert result["best_epoch"] == rows[best_i]["epoch"] and result["best_selected_on"] == "val"


def test_lr_search_picks_on_validation_for_every_step1(no_val_shards, tmp_path):
    out = tmp_path / "search"
    result, _ = _train(no_val_shards.path, out, "lp-gce", "--set", "data.val_fraction=0.25",
                       "--set", "probe.lr_search=[0.1,1.0,10.0]")
    rows = _lines(out, "lr_search")
    assert [r["lr_multiplier"] for r in rows] == [0.1, 1.0, 10.0]
    best = rows[_first_argmax([r["val_acc"] for r in rows])]
    assert result["step1_lr"] == pytest.approx(best["lr"])
    assert _lines(out, "lp")[-1]["val_acc"] == pytest.approx(best["val_acc"])


@pytest.mark.parametrize("extra,needle", [
    (["--set", "probe.lr_search=[1.0,2.0]"], "probe.lr_search"),
    (["--set", "probe.lr_search=[0]"], "probe.lr_search"),
])
def test_lr_search_without_validation_or_with_bad_values_is_refused(no_val_shards, tmp_path, extra, needle):
    res = _train(no_val_shards.path, tmp_path / "x", "lp-ce", *extra, expect_ok=False)
    assert res.returncode == 2 and needle in res.stderr
    assert "Traceback" not in res.stderr


def test_val_fraction_on_shards_with_a_val_split_is_refused(tmp_path):
    from shardgen import write_run_shards

    shards = write_run_shards(tmp_path / "withval")
    res = _train(shards, tmp_path / "x", "lp-ce", "--set", "data.val_fraction=0.1", expect_ok=False)
    assert res.returncode == 2 and "already has a val split" in res.stderr
    assert not (tmp_path / "x").exists()


def test_selection_quality_is_absent_not_zero_when_nothing_is_known():
    from turnctl.metrics import selection_quality

    given = np.array([0, 1, 0, 1])
    ok = np.ones(4, dtype=bool)
    assert selection_quality(np.ones(4, bool), given, np.full(4, -1), ok) == {}
    # Only samples 2 and 3 have a known true label, and none of them is kept: purity unknown.
    q = selection_quality(np.array([True, True, False, False]), given, np.array([-1, -1, 0, 0]), ok)
    assert q["purity"] is None and q["recall"] == 0.0 and q["noise_rate"] == 0.5
