"""turnctl.rundir: the one home of a run's layout, its atomic writes and its selection files.

In-process and fast: no training. The run directory is opened from the tiny recipe in a world of one
(RunDir.open's broadcast and barrier are no-ops there).
"""

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from turnctl.errors import TurnctlError
from turnctl.recipe import load_recipe
from turnctl.rundir import (CHECKPOINT_TAG, MIXTURE_ARRAYS, PER_SAMPLE_ARRAYS, RunDir, RunLayout,
                            SelectionSettings, atomic_path, atomic_savez, atomic_write_json, atomic_write_text,
                            checkpoint_tag, load_selection_file, selection_arrays)

REPO = Path(__file__).resolve().parent.parent
N, C = 6, 2


def _recipe(out: Path, *overrides: str):
    r = load_recipe("tiny", list(overrides))
    r.output.dir = str(out)
    return r


def _arrays(**changes):
    a = dict(idx=np.arange(N), loss=np.linspace(0.1, 2.0, N), clean_prob=np.array([0.9, 0.1, 0.8, 0.7, 0.0, 0.3]),
             selected=np.array([1, 0, 1, 0, 0, 0], bool), keep=np.array([1, 0, 1, 1, 0, 0], bool),
             given=np.array([0, 0, 0, 1, 1, 1]), clean=np.array([0, 1, 0, 1, -1, 0]), pred=np.array([0, 1, 0, 1, 1, 0]),
             ok=np.array([1, 1, 1, 1, 0, 1], bool), means=np.array([[0.1, 0.8], [0.2, 0.9]]),
             variances=np.full((C, 2), 0.01), weights=np.array([[0.6, 0.4], [0.5, 0.5]]))
    a.update(changes)
    return a


def _leftovers(d: Path):
    return [p.name for p in Path(d).rglob("*") if ".tmp-" in p.name]


# ---- the layout ----------------------------------------------------------------------------------

def test_layout_names_every_file_of_a_run(tmp_path):
    run = RunLayout(tmp_path / "r")
    names = {"recipe_file": "recipe.yaml", "metrics_file": "metrics.jsonl", "summary_file": "summary.json",
             "holdout_file": "validation_holdout.npz", "method_state_file": "method_state.pt",
             "selection_dir": "selection", "checkpoints": "checkpoints", "best": "best", "final": "final",
             "report_dir": "report", "features_cache": "features-cache", "tensorboard_dir": "tensorboard"}
    for attr, name in names.items():
        assert getattr(run, attr) == tmp_path / "r" / name, attr
    assert run.selection_file(3) == tmp_path / "r" / "selection" / "epoch_3.npz"
    assert (checkpoint_tag(7), checkpoint_tag(7, step=12)) == ("epoch_0007", "epoch_0007_step_000012")
    assert all(CHECKPOINT_TAG.fullmatch(t) for t in (checkpoint_tag(0), checkpoint_tag(11, 3)))
    assert not CHECKPOINT_TAG.fullmatch("global_step5")
    assert not run.is_run() and run.selection_epochs() == []
    run.selection_dir.mkdir(parents=True)
    for name in ("epoch_10.npz", "epoch_2.npz", ".epoch_3.npz.tmp-9", "epoch_x.npz", "notes.txt"):
        (run.selection_dir / name).write_bytes(b"")
    assert run.selection_epochs() == [2, 10]  # numeric order; temporaries and strangers ignored


def test_no_core_module_imports_the_cli_package():
    """The core never depends on turnctl/commands (the CLI's): only cli.py reaches into it."""
    pkg = REPO / "turnctl"
    offenders = [str(p.relative_to(REPO)) for p in pkg.rglob("*.py")
                 if p.parent.name != "commands" and p.name != "cli.py"
                 and re.search(r"^\s*(from|import) turnctl\.commands", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


# ---- opening a run -------------------------------------------------------------------------------

def test_open_creates_resumes_and_refuses(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(_recipe(out), resume=False)
    assert run.path == out and run.is_run()
    saved = yaml.safe_load(run.recipe_file.read_text())
    assert saved["output"]["dir"] == str(out) and saved["name"] == "tiny"
    assert _leftovers(out) == []

    with pytest.raises(TurnctlError, match=r"is not empty; pass --resume"):
        RunDir.open(_recipe(out), resume=False)
    assert RunDir.open(_recipe(out), resume=True).path == out  # the same recipe continues
    with pytest.raises(TurnctlError, match=r"the recipe differs from the one saved in .*recipe\.yaml"):
        RunDir.open(_recipe(out, "cleanse.tau=0.5"), resume=True)
    # how often it prints and how many checkpoints it keeps are not the run's recipe
    assert RunDir.open(_recipe(out, "output.progress_every_s=5", "output.keep_checkpoints=1"), resume=True).path == out

    # --resume auto: starts where nothing is, continues a run, refuses anything else
    fresh = RunDir.open(_recipe(tmp_path / "auto"), resume="auto")
    assert not fresh.resuming and fresh.is_run()
    again = RunDir.open(_recipe(tmp_path / "auto"), resume="auto")
    assert again.resuming and again.path == fresh.path
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TurnctlError, match=r"--resume auto: .*foreign is not empty and holds no run"):
        RunDir.open(_recipe(foreign), resume="auto")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TurnctlError, match=r"holds no run \(no recipe\.yaml\)"):
        RunDir.open(_recipe(empty), resume=True)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(TurnctlError, match=r"is a file, not a directory"):
        RunDir.open(_recipe(afile), resume=False)
    assert afile.read_text() == "mine" and list(empty.iterdir()) == []
    r = _recipe(out)
    r.output.dir = None
    with pytest.raises(TurnctlError, match=r"--resume needs the run to continue"):
        RunDir.open(r, resume=True)


def test_rank0_writers(tmp_path):
    run = RunDir.open(_recipe(tmp_path / "run"), resume=False)
    run.log_metrics({"phase": "lp", "epoch": 0, "acc": np.float32(0.5), "nan": float("nan")})
    run.log_metrics({"phase": "fft", "epoch": 0})
    lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [(x["phase"], x["acc"] if "acc" in x else None) for x in lines] == [("lp", 0.5), ("fft", None)]
    assert lines[0]["nan"] is None  # JSON has no NaN: turnctl.jsonio.jsonable
    run.reset_history(lines[:1])
    assert len(run.metrics_file.read_text().splitlines()) == 1
    run.write_summary({"test_accuracy": {"last": np.float64(0.25)}})
    assert json.loads(run.summary_file.read_text()) == {"test_accuracy": {"last": 0.25}}
    run.save_holdout(np.array([3, 1]), fraction=0.25, seed=4)
    with np.load(run.holdout_file, allow_pickle=False) as z:
        assert z["idx"].tolist() == [3, 1] and float(z["fraction"]) == 0.25 and int(z["seed"]) == 4
    run.save_method_state({"method": "nmtune", "w": torch.ones(2)})
    state = torch.load(run.method_state_file, weights_only=True)
    assert state["method"] == "nmtune" and state["w"].tolist() == [1.0, 1.0]
    assert _leftovers(run.path) == []


# ---- atomic writes -------------------------------------------------------------------------------

def test_atomic_writes_replace_whole_files_and_leave_no_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.json"
    atomic_write_json(target, {"a": (1, np.int64(2))})
    assert json.loads(target.read_text()) == {"a": [1, 2]}

    # A failure inside the block (a signal, a bug): the old file stays, no temporary.
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"a": [1, 2]} and _leftovers(tmp_path) == []

    # The rename itself fails (a full disk shows up at any step): same.
    def refuse(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    with pytest.raises(OSError):
        atomic_savez(tmp_path / "a.npz", x=np.arange(3))
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": [1, 2]} and not (tmp_path / "a.npz").exists()
    assert _leftovers(tmp_path) == []

    atomic_savez(tmp_path / "a.npz", x=np.arange(3))  # np.savez given a name would add .npz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "sub"]


# ---- selection files -----------------------------------------------------------------------------

def test_selection_round_trip_stores_its_settings(tmp_path):
    run = RunDir.open(_recipe(tmp_path / "run", "cleanse.tau=0.45", "cleanse.normalize=none",
                              "cleanse.gmm_max_iter=7", "cleanse.fallback_k=3"), resume=False)
    held = np.array([0, 0, 0, 0, 0, 1], bool)
    path = run.save_selection(2, {**_arrays(), "heldout": held})
    assert path == run.selection_file(2) and run.selection_epochs() == [2]
    with np.load(path, allow_pickle=False) as z:  # plain arrays: nothing to unpickle
        assert all(z[k].dtype != object for k in z.files)
        assert z["tau"].shape == () and z["normalize"].item() == "none"

    f = run.load_selection(2)
    want = SelectionSettings(tau=0.45, normalize="none", gmm_max_iter=7, gmm_tol=run.recipe.cleanse.gmm_tol,
                             gmm_reg_covar=run.recipe.cleanse.gmm_reg_covar,
                             min_per_class=run.recipe.cleanse.min_per_class, fallback_k=3)
    assert f.settings == want
    for k, v in _arrays(heldout=held).items():
        np.testing.assert_allclose(getattr(f, k), v, rtol=1e-6, err_msg=k)
    assert f.idx.dtype == np.int64 and f.ok.dtype == bool and f.loss.dtype == np.float64
    # The settings travel with the file: a recipe.yaml edited since cannot change what it means.
    run.recipe_file.write_text(run.recipe_file.read_text().replace("tau: 0.45", "tau: 0.9"))
    assert RunLayout(run.path).load_selection(2).settings.tau == 0.45

    # Only what is asked is read; nothing held out when the runner passes no hold-out.
    path = run.save_selection(3, _arrays())
    part = load_selection_file(path, arrays=("idx", "selected", "heldout"))
    assert part.idx[part.selected].tolist() == [0, 2] and not part.heldout.any() and part.loss is None


def test_a_selection_file_of_an_older_turnctl_takes_its_settings_from_recipe_yaml(tmp_path):
    run_dir = tmp_path / "old"
    run = RunDir.open(_recipe(run_dir, "cleanse.tau=0.3"), resume=False)
    run.selection_dir.mkdir()
    old = run.selection_file(0)
    np.savez(old, **_arrays())  # no settings, no heldout: as turnctl wrote them before
    f = RunLayout(run_dir).load_selection(0)
    assert f.settings.tau == 0.3 and f.settings.normalize == run.recipe.cleanse.normalize
    assert f.heldout.shape == (N,) and not f.heldout.any()
    assert load_selection_file(old).settings is None  # without a fallback: unknown, not made up

    from turnctl.report import health_summary
    assert health_summary(run_dir)["tau"] == 0.3  # old runs stay reportable

    # A recipe.yaml whose value is not of its type: one line naming the file and the key.
    raw = yaml.safe_load(run.recipe_file.read_text())
    raw["cleanse"]["tau"] = "high"
    run.recipe_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(TurnctlError, match=r"recipe\.yaml: cleanse\.tau='high' is not a float"):
        RunLayout(run_dir).load_selection(0)


@pytest.mark.parametrize("damage, message", [
    (lambda p: np.savez(p, **{k: v for k, v in _arrays().items() if k != "keep"}), r"missing array\(s\) keep"),
    (lambda p: np.savez(p, **_arrays(), tau=np.array(0.6)), r"missing array\(s\) normalize"),
    (lambda p: np.savez(p, **_arrays(ok=np.ones(N + 1, bool))), r"array ok has shape \(7,\), expected \(6,\)"),
    (lambda p: np.savez(p, **_arrays(weights=np.ones((C + 1, 2)))), r"array weights has shape \(3, 2\)"),
    (lambda p: p.write_bytes(b"not a zip"), r"unreadable selection file"),
    (lambda p: np.savez(p, **_arrays(idx=np.array([object()] * N))), r"allow_pickle=False"),
    (lambda p: None, r"no such selection file"),
])
def test_a_bad_selection_file_is_one_line_naming_it(tmp_path, damage, message):
    path = tmp_path / "epoch_0.npz"
    damage(path)
    with pytest.raises(TurnctlError, match=message) as exc:
        load_selection_file(path, fallback=lambda: SelectionSettings.from_raw({}, tmp_path / "recipe.yaml"))
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_selection_arrays_must_be_complete():
    with pytest.raises(ValueError, match=r"missing \['keep'\]"):
        selection_arrays({k: v for k, v in _arrays().items() if k != "keep"},
                         SelectionSettings.from_raw({}, Path("recipe.yaml")))
    assert set(PER_SAMPLE_ARRAYS) >= {"idx", "heldout"} and MIXTURE_ARRAYS == ("means", "variances", "weights")
