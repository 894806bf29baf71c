"""turnctl.evaluate in-process: what a --checkpoint argument resolves to, and the accuracy of a model
whose answer is known without running it the same way (its head predicts one class whatever the
image, so its accuracy is that class's share of the decodable test samples)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shardgen import write_toy_shards
from turnctl.data import open_split
from turnctl.errors import TurnctlError
from turnctl.evaluate import evaluate_checkpoint, resolve_targets
from turnctl.recipe import load_recipe

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64)



@pytest.fixture(autouse=True, scope="module")
def _leave_no_process_group():
    """These tests start a world of one in-process; later modules (test_finetune's engines) must
    find none, as after a CLI call."""
    yield
    from turnctl import distributed as dist

    dist.destroy()

def _constant_export(path, k: int, num_classes: int = 3):
    from turnctl.models import load_backbone
    from turnctl.recipe import ModelSection

    bb = load_backbone(ModelSection(family="vit", config=TINY_VIT), num_classes=num_classes)
    with torch.no_grad():
        bb.head.weight.zero_()
        bb.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(k), num_classes).float() * 10)
    # The toy shards' names: --shards must have the model's classes, names included (check_same_classes).
    return bb.save_pretrained(path, class_names=[f"class{i}" for i in range(num_classes)])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate") / "toy"
    return write_toy_shards(root, counts={"train": [6], "test": [7, 6]}, num_classes=3, corrupt={"test": [2]})


def _share(toy, k):
    cls = toy.labels["test"]["cls"]
    ok = np.ones(len(cls), bool)
    ok[toy.corrupt["test"]] = False
    return float((cls[ok] == k).mean()), int(ok.sum())


@pytest.mark.parametrize("k", [0, 2])
def test_a_constant_model_scores_its_class_share(tmp_path, toy, k):
    export = _constant_export(tmp_path / "final", k)
    res = evaluate_checkpoint(str(export), shards=str(toy.root), split="test", num_workers=0)
    want, n_ok = _share(toy, k)
    rep = res["results"]["final"]
    assert res["accuracy"] == pytest.approx(want)
    assert rep["num_samples"] == n_ok and rep["undecodable"] == 1
    per_class = rep["per_class_accuracy"]
    assert per_class[k] == 1.0 and all(per_class[c] == 0.0 for c in range(3) if c != k)
    names = open_split(toy.root, "test").class_names  # eval names classes as the shards do
    assert {p["predicted"] for p in rep["most_confused"]} == {names[k]}


def test_a_run_directory_evaluates_best_and_last_and_says_how_best_was_chosen(tmp_path, toy):
    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe("tiny", [f"data.shards={toy.root}"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    _constant_export(run / "final", 0)
    _constant_export(run / "best", 1)
    (run / "summary.json").write_text(json.dumps({"best_selected_on": "val", "best_epoch": 3}))
    assert [label for label, _ in resolve_targets(run)] == ["best", "last"]
    res = evaluate_checkpoint(str(run), split="test", num_workers=0)  # the run says which shards
    assert res["accuracy"] == pytest.approx(_share(toy, 0)[0])  # the headline is the last model's
    best = res["results"]["best"]
    assert best["accuracy"] == pytest.approx(_share(toy, 1)[0])
    assert best["selected_on"] == "val" and best["selected_epoch"] == 3


def test_what_is_not_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(TurnctlError, match="no such file or directory"):
        resolve_targets(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TurnctlError, match="not a run directory, an export"):
        resolve_targets(tmp_path / "empty")
    run = tmp_path / "run-without-models"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(TurnctlError, match="not a run directory, an export"):
        resolve_targets(run)


def test_a_model_with_another_number_of_classes_is_refused(tmp_path, toy):
    export = _constant_export(tmp_path / "final", 0, num_classes=5)
    with pytest.raises(TurnctlError, match=r"toy/manifest\.json has 3 classes but the model's .*final/turnctl\.json has 5"):
        evaluate_checkpoint(str(export), shards=str(toy.root), split="test", num_workers=0)
