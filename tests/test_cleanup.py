"""Dead state removed in issue 14: a retired recipe key still loads (old runs resume), and a missing
optional extra changes nothing in the recipe a run holds."""

import sys

import yaml

from turnctl import rundir
from turnctl.cli import run
from turnctl.recipe import load_recipe


def test_an_old_runs_recipe_with_cleanse_balance_still_loads(tmp_path, capsys):
    # Every run's recipe.yaml holds the full resolved recipe, so runs made before cleanse.balance was
    # retired all carry it: --resume and eval read that file back.
    raw = yaml.safe_load(load_recipe("tiny").to_yaml())
    assert "balance" not in raw["cleanse"]
    raw["cleanse"]["balance"] = True
    old = tmp_path / "recipe.yaml"
    old.write_text(yaml.safe_dump(raw))
    assert load_recipe(str(old)).cleanse.model_dump() == load_recipe("tiny").cleanse.model_dump()
    capsys.readouterr()
    assert run(["train", "--recipe", str(old), "--dry-run", "--set", "cleanse.balance=false"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "cleanse.balance" in line]
    assert len(notices) == 1 and "no longer a setting and is ignored" in notices[0]


def test_a_missing_tensorboard_leaves_the_recipe_alone(tmp_path, monkeypatch):
    recipe = load_recipe("tiny", ["output.tensorboard=true"])
    said = []
    monkeypatch.setattr(rundir.log, "info", lambda *a: said.append(a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    run_dir = rundir.RunDir(tmp_path, recipe)
    for epoch in range(2):
        run_dir.log_metrics({"phase": "finetune", "epoch": epoch, "loss": 1.0})
    assert recipe.output.tensorboard is True
    assert [a for a in said if "tensorboard" in a[0]] == [("tensorboard is not installed; metrics go to "
                                                          "metrics.jsonl only",)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
