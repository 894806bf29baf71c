"""`turnctl report --pred-probs`: out-of-sample probabilities from a K-fold probe on a run's cached
features, checked with the real cleanlab.

A real tiny TURN run (one process, ~30 s) on toy shards whose true labels are known (30% symmetric
noise, one undecodable image, 10% of train held out for validation); cleanlab's flags on our
pred_probs must find the planted noise. Out-of-fold is checked twice: one fold recomputed by hand
with the probe's public functions, and a memorising probe on label-free random features, where
in-sample probabilities would betray themselves.
"""

import shutil

import numpy as np
import pytest
import torch

from launch import check, last_json, run, turnctl_cmd
from turnctl.cli import run as cli_run
from turnctl.recipe import LossSection, ProbeSection
from turnctl.report.pred_probs import cached_run_features, kfold_pred_probs, stratified_folds

NUM_CLASSES = 4
CORRUPT_IDX = 5
NOISE = 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(toy shards, run dir) of a real TURN run with a validation hold-out and an undecodable image."""
    from shardgen import write_toy_shards

    base = tmp_path_factory.mktemp("pred-probs")
    toy = write_toy_shards(base / "toy", counts={"train": [100, 100, 100, 100], "test": [40]},
                           num_classes=NUM_CLASSES, image_size=16, seed=1, noise_rate=NOISE,
                           corrupt={"train": [CORRUPT_IDX]})
    out = base / "run"
    check(run(turnctl_cmd(["train", "--recipe", "tiny", "--shards", str(toy.root), "--out", str(out),
                           "--set", "data.num_workers=0", "--set", "finetune.epochs=1",
                           "--set", "data.val_fraction=0.1"]), timeout=300))
    return toy, out


def _held_out(run_dir):
    with np.load(run_dir / "validation_holdout.npz") as z:
        return set(z["idx"].tolist())


def test_pred_probs_feed_cleanlab_which_finds_the_planted_noise(trained):
    from cleanlab.filter import find_label_issues
    from safetensors.torch import load_file

    toy, out = trained
    res = check(run(turnctl_cmd(["report", str(out), "--pred-probs", "--export-features", "--top", "0", "--json"]),
                    timeout=180))
    summary = last_json(res.stdout)
    rep = out / "report"
    pred_probs, labels, idx, folds = (np.load(rep / f"{n}.npy", allow_pickle=False)
                                      for n in ("pred_probs", "labels", "idx", "folds"))
    given, clean = toy.labels["train"]["cls"], toy.labels["train"]["clean"]

    # Rows: the samples the run's probe could train on, in idx order; the rest said in the summary.
    held = _held_out(out)
    assert len(held) == 40
    expected = [i for i in range(400) if i != CORRUPT_IDX and i not in held]
    assert idx.tolist() == expected
    assert pred_probs.dtype == np.float32 and pred_probs.shape == (len(expected), NUM_CLASSES)
    assert np.allclose(pred_probs.sum(1), 1.0, atol=1e-5)
    assert labels.dtype == np.int64 and np.array_equal(labels, given[idx])
    assert sorted(np.unique(folds).tolist()) == [0, 1, 2, 3, 4]
    pp = summary["pred_probs"]
    assert (pp["rows"], pp["excluded_undecodable"], pp["excluded_held_out"], pp["folds"]) == (len(expected), 1, 40, 5)
    assert summary["files"]["pred_probs"] == str(rep / "pred_probs.npy")

    # The exported features are the cached ones of those rows.
    exported = load_file(str(rep / "features.safetensors"))
    _, _, fs = cached_run_features(out)
    assert exported["idx"].tolist() == expected
    assert torch.equal(exported["features"], fs.features[torch.tensor(expected)])

    # The real cleanlab on our pred_probs against the planted noise. Measured: precision 1.0 and
    # recall 1.0 (109 real issues among 359 rows); chance precision is the noise rate, 0.3.
    issues = find_label_issues(labels, pred_probs)
    real = labels != clean[idx]
    assert real.sum() > 80
    tp = int((issues & real).sum())
    precision, recall = tp / max(int(issues.sum()), 1), tp / int(real.sum())
    assert precision >= 0.85 and recall >= 0.85, (precision, recall, int(issues.sum()), int(real.sum()))


def test_each_row_is_predicted_by_the_probe_that_left_its_fold_out(trained):
    """Fold 0 recomputed by hand: the run's probe settings, trained on folds 1..4 only, standardised
    with their statistics, seeded seed + 0, gives exactly the pred_probs rows of fold 0."""
    from turnctl.probe import predict, standardize, standardizer, train_linear_probe
    from turnctl.recipe import load_recipe

    toy, out = trained
    rep = out / "report"
    if not (rep / "folds.npy").is_file():
        check(run(turnctl_cmd(["report", str(out), "--pred-probs", "--top", "0"]), timeout=180))
    pred_probs, idx, folds = (np.load(rep / f"{n}.npy") for n in ("pred_probs", "idx", "folds"))
    recipe = load_recipe(str(out / "recipe.yaml"))
    _, _, fs = cached_run_features(out)
    x, y = fs.features[torch.from_numpy(idx)], fs.labels[torch.from_numpy(idx)]
    assert np.array_equal(folds, stratified_folds(y.numpy(), 5, recipe.seed))
    test = torch.from_numpy(folds == 0)
    mean, std = standardizer(x[~test])
    res = train_linear_probe(standardize(x[~test], mean, std).to(x.dtype), y[~test], num_classes=NUM_CLASSES,
                             probe=recipe.probe, losses=recipe.losses, seed=recipe.seed + 0, log_every_epoch=False,
                             idx=torch.from_numpy(idx)[~test])
    mine = torch.softmax(predict(res.head_state, standardize(x[test], mean, std)), 1).numpy()
    assert np.allclose(pred_probs[folds == 0], mine, atol=1e-5)


def test_out_of_fold_probabilities_do_not_memorise():
    """Random features, random labels, more dimensions than samples: a probe memorises its training
    rows (p(given) ~ 1 in sample), so in-sample probabilities would show; out of fold they are ~chance."""
    from turnctl.probe import predict, train_linear_probe

    g = torch.Generator().manual_seed(0)
    n, d, c = 120, 256, 3
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    probe = ProbeSection(epochs=60, loss="ce", optimizer="adamw", lr=0.05, weight_decay=0.0, batch_size=32,
                         standardize=False)
    full = train_linear_probe(x, y, num_classes=c, probe=probe, losses=LossSection(), seed=0, log_every_epoch=False)
    in_sample = torch.softmax(predict(full.head_state, x), 1)[torch.arange(n), y].mean().item()
    assert in_sample > 0.95  # the setup does memorise
    folds = stratified_folds(y.numpy(), 5, seed=0)
    oof = kfold_pred_probs(x, y, folds, num_classes=c, probe=probe, losses=LossSection(), seed=0)
    assert oof.shape == (n, c) and np.isfinite(oof).all()
    assert oof[np.arange(n), y.numpy()].mean() < 0.6


def test_stratified_folds():
    labels = np.repeat(np.arange(3), [10, 7, 3])
    f = stratified_folds(labels, 4, seed=3)
    assert np.array_equal(f, stratified_folds(labels, 4, seed=3))
    assert not np.array_equal(f, stratified_folds(labels, 4, seed=4))
    sizes = np.bincount(f, minlength=4)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount(f[labels == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("turnctl: error: ")
    return err[0]


def test_uncached_features_and_misused_options_are_one_line(trained, tmp_path, capsys):
    toy, out = trained
    # The same shards without their .features: nothing cached; nothing is written either.
    bare = tmp_path / "toy"
    shutil.copytree(toy.root, bare, ignore=shutil.ignore_patterns(".features"))
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report", "checkpoints"))
    assert cli_run(["report", str(copy), "--pred-probs", "--shards", str(bare)]) == 2
    line = _one_error_line(capsys)
    assert "features are not cached" in line and "turnctl train --recipe" in line
    assert not (copy / "report").exists()

    assert cli_run(["report", str(copy), "--folds", "3"]) == 2
    assert "go with --pred-probs" in _one_error_line(capsys)
    assert cli_run(["report", str(copy), "--pred-probs", "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err
