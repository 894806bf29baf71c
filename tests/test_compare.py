"""turnctl.compare in-process, with the runner replaced by a fake that returns known figures: the
table's means and standard deviations, the reference wall time, which runs count as TURN's
selection, and the files it writes."""

from __future__ import annotations

import json
import statistics

import pytest

import turnctl.runner
from turnctl.compare import COLUMNS, check_methods, compare_methods
from turnctl.errors import RecipeError
from turnctl.recipe import load_recipe

FIGURES = {  # (method, seed) -> (best, last, max_over_epochs, wall time)
    ("turn", 0): (0.80, 0.78, 0.82, 30.0), ("turn", 1): (0.84, 0.80, 0.86, 34.0),
    ("fft-ce", 0): (0.70, 0.66, 0.72, 20.0), ("fft-ce", 1): (None, 0.64, 0.70, 22.0),
    ("lp-ce", 0): (None, 0.50, 0.55, 2.0), ("lp-ce", 1): (None, 0.52, 0.57, 2.0),
}


@pytest.fixture
def fake_runs(monkeypatch):
    calls = []

    def train_from_recipe(recipe, *, resume=False, stop_after=None):
        calls.append((recipe.method, recipe.seed, recipe.output.dir, resume))
        best, last, top, wall = FIGURES[(recipe.method, recipe.seed)]
        sel = {"kept": 10, "selected": 6} if recipe.method == "turn" else None
        return {"run_dir": recipe.output.dir, "test_accuracy": {"best": best, "last": last, "max_over_epochs": top},
                "best_selected_on": "val" if best is not None else None, "wall_time_s": wall,
                "selection": sel, "feature_cache": {"train": "hit"}}

    monkeypatch.setattr(turnctl.runner, "train_from_recipe", train_from_recipe)
    return calls


def test_table_means_stds_and_the_files_written(tmp_path, fake_runs):
    recipe = load_recipe("tiny")
    out = tmp_path / "cmp"
    result = compare_methods(recipe, methods=["turn", "fft-ce", "lp-ce"], seeds=[0, 1], out=out)
    # Every method x seed once, in its own directory, never resumed.
    assert [(m, s) for m, s, _, _ in fake_runs] == [(m, s) for m in ("turn", "fft-ce", "lp-ce") for s in (0, 1)]
    assert all(d == str(out / f"{m}-seed{s}") and not r for m, s, d, r in fake_runs)
    table = result["table"]
    for method in ("turn", "fft-ce", "lp-ce"):
        for col, i in (("best", 0), ("last", 1), ("max_over_epochs", 2), ("wall_time_s", 3)):
            vals = [FIGURES[(method, s)][i] for s in (0, 1) if FIGURES[(method, s)][i] is not None]
            want_mean = statistics.fmean(vals) if vals else None
            got = table[method][col]
            assert got["mean"] == pytest.approx(want_mean) if vals else got["mean"] is None
            if len(vals) == 2:
                assert got["std"] == pytest.approx(statistics.pstdev(vals))
            elif len(vals) == 1:
                assert got["std"] == 0.0  # one seed with a val-selected epoch: no spread to report
    # Wall time relative to FFT-CE's mean.
    assert table["turn"]["wall_time_vs_fft_ce"] == pytest.approx(32.0 / 21.0)
    assert table["fft-ce"]["wall_time_vs_fft_ce"] == pytest.approx(1.0)
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["columns"] == COLUMNS and on_disk["methods"] == ["turn", "fft-ce", "lp-ce"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"]["lp_ce"] == pytest.approx(0.51)
    assert summary["test_accuracy_best"]["lp_ce"] is None
    assert summary["selection"] == {"kept": 10, "selected": 6}  # only a cleansing method has one


def test_without_a_fft_ce_run_there_is_no_relative_wall_time(tmp_path, fake_runs):
    result = compare_methods(load_recipe("tiny"), methods=["lp-ce"], seeds=[0], out=tmp_path / "c")
    assert result["table"]["lp-ce"]["wall_time_vs_fft_ce"] is None
    assert result["summary"]["selection"] is None


def test_unknown_methods_are_refused_before_anything_runs(tmp_path, fake_runs):
    with pytest.raises(RecipeError, match="unknown method 'lp-nope'"):
        compare_methods(load_recipe("tiny"), methods=["turn", "lp-nope"], seeds=[0], out=tmp_path / "c")
    assert fake_runs == [] and not (tmp_path / "c").exists()
    check_methods(["turn", "fft-ce"])  # known names pass


def test_top5_sits_beside_top1_where_runs_record_it(tmp_path, monkeypatch):
    """A run that records ``test_top5_accuracy`` (more than 5 classes) gets top-5 columns beside its top-1
    ones; a run without it (an old run, a probe) gets None there, and its top-1 figures are untouched."""
    top5 = {0: {"best": 0.95, "last": 0.93, "max_over_epochs": 0.96},
            1: {"best": 0.97, "last": 0.91, "max_over_epochs": 0.98}}

    def train_from_recipe(recipe, *, resume=False, stop_after=None):
        res = {"run_dir": recipe.output.dir, "test_accuracy": {"best": 0.8, "last": 0.7, "max_over_epochs": 0.9},
               "best_selected_on": "val", "wall_time_s": 1.0, "selection": None, "feature_cache": {}}
        if recipe.method == "fft-ce":
            res["test_top5_accuracy"] = top5[recipe.seed]
        return res

    monkeypatch.setattr(turnctl.runner, "train_from_recipe", train_from_recipe)
    result = compare_methods(load_recipe("tiny"), methods=["fft-ce", "lp-ce"], seeds=[0, 1], out=tmp_path / "c")
    fft, lp = result["table"]["fft-ce"], result["table"]["lp-ce"]
    for col in COLUMNS:
        assert fft[f"top5_{col}"]["mean"] == pytest.approx((top5[0][col] + top5[1][col]) / 2)
        assert lp[f"top5_{col}"] == {"mean": None, "std": None}
        assert fft[col]["mean"] == pytest.approx({"best": 0.8, "last": 0.7, "max_over_epochs": 0.9}[col])
    assert [r["test_top5_last"] for r in result["runs"]] == [0.93, 0.91, None, None]
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["test_top5_accuracy"] == {"fft_ce": pytest.approx(0.92), "lp_ce": None}
    assert summary["test_accuracy"] == {"fft_ce": pytest.approx(0.7), "lp_ce": pytest.approx(0.7)}
