"""One method registry (turnctl/methods/registry.py): a method added there, and nowhere else, is a valid
recipe value, is trained by the runner's dispatch, and every list of methods (the recipe's error,
``train --method``, ``compare --methods``, the help) is the registry's."""

import json

import pytest
import torch

from turnctl import runner
from turnctl.cli import run
from turnctl.errors import RecipeError, TurnctlError
from turnctl.methods import train_on_features
from turnctl.methods.registry import METHODS, MethodSpec
from turnctl.recipe import load_recipe


class FakeTrainer:
    """A step-1 trainer defined here: records what the runner hands it, returns a zero head."""

    def __init__(self):
        self.calls = []

    def __call__(self, recipe, features, labels, *, num_classes, eval_sets=None, clean=None, idx=None,
                 as_turn_step1=False, **options):
        self.calls.append({"lr": recipe.probe.lr, "loss": recipe.probe.loss, "shape": tuple(features.shape),
                           "labels": labels.clone(), "eval_sets": sorted(eval_sets or {}),
                           "as_turn_step1": as_turn_step1, "options": options})
        history = [{"epoch": 1, "val_acc": 0.25, "test_acc": 0.5}, {"epoch": 2, "val_acc": 0.75, "test_acc": 0.25}]
        head = {"weight": torch.zeros(num_classes, features.shape[1]), "bias": torch.zeros(num_classes)}
        return {"head_state": head, "history": history, "kept_epoch": 2, "state": None,
                "summary": {"fake_trainer": "ran"}}


@pytest.fixture
def fake_method(monkeypatch):
    """One registry entry, nothing else: ``lp-fake`` with a trainer defined in this file."""
    trainer = FakeTrainer()
    monkeypatch.setitem(METHODS, "lp-fake", MethodSpec("lp-fake", "a method defined by a test", "lp",
                                                       ("features", "probe"), trainer, probe_loss="ce"))
    return trainer


def test_a_registered_method_goes_through_the_runners_dispatch(fake_method):
    recipe = load_recipe("tiny", ["method=lp-fake", "probe.lr=0.02", "probe.loss=gce"])  # the recipe reads it
    x, y = torch.randn(12, 5), torch.arange(12) % 4
    out = runner.train_step1(recipe, x, labels=y, clean=y, idx=torch.arange(12), eval_sets={"val": (x, y)},
                             num_classes=4, lr_mult=10.0)
    (call,) = fake_method.calls
    # The entry's fixed loss and the searched learning rate reach the trainer, on a copy of the recipe.
    assert call["loss"] == "ce" and call["lr"] == pytest.approx(0.2) and call["as_turn_step1"] is False
    assert call["shape"] == (12, 5) and torch.equal(call["labels"], y) and call["eval_sets"] == ["val"]
    assert (recipe.probe.loss, recipe.probe.lr) == ("gce", 0.02)
    assert out["lr"] == pytest.approx(0.2) and out["summary"] == {"fake_trainer": "ran"}


def test_a_registered_method_trains_end_to_end_in_process(fake_method, tmp_path, capsys):
    from shardgen import write_toy_shards

    shards = write_toy_shards(tmp_path / "toy", counts={"train": [16], "val": [8], "test": [8]}, num_classes=4,
                              image_size=16, seed=0)
    out = tmp_path / "run"
    rc = run(["train", "--recipe", "tiny", "--set", "method=lp-fake", "--shards", str(shards.root), "--out", str(out),
              "--json", "--set", "data.num_workers=0", "--set", "features.batch_size=16",
              "--set", "output.export_final=false"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    result = json.loads(cap.out.strip().splitlines()[-1])
    (call,) = fake_method.calls  # step 1 ran once, on the train features, with the entry's loss
    assert call["shape"][0] == 16 and call["loss"] == "ce" and call["eval_sets"] == ["test", "val"]
    assert result["method"] == "lp-fake" and result["fake_trainer"] == "ran"
    # An LP-family entry: no fine-tuning; the figures are the fake's history, best chosen on val.
    assert result["test_accuracy"] == {"best": 0.25, "last": 0.25, "max_over_epochs": 0.5}
    assert result["best_epoch"] == 2 and not (out / "checkpoints").exists()


def test_a_method_that_is_not_registered_is_refused_everywhere():
    with pytest.raises(RecipeError, match=r"method: Input should be 'turn', 'lp-ce', .* or 'turn-nmtune' "
                                          r"\(got 'lp-fake'\)"):
        load_recipe("tiny", ["method=lp-fake"])
    from turnctl.compare import check_methods

    with pytest.raises(RecipeError, match="unknown method 'lp-fake' \\(choose from turn, lp-ce, "):
        check_methods(["turn", "lp-fake"])
    # Unregistered after validation (model_copy skips it): the runner refuses it before it starts anything.
    recipe = load_recipe("tiny").model_copy(update={"method": "lp-gone"})
    with pytest.raises(TurnctlError, match="method 'lp-gone' is not available; available: turn, lp-ce, "):
        runner.train_from_recipe(recipe)


def test_the_cli_lists_the_registry(capsys):
    from turnctl.commands import compare, train

    method_option = next(p for p in train.command.params if p.name == "method")
    assert list(method_option.type.choices) == list(METHODS)
    for argv in (["train", "--help"], ["compare", "--help"]):
        assert run(argv) == 0
        out = capsys.readouterr().out
        for name, spec in METHODS.items():
            assert f"  {name}  " in out and spec.help[:40] in out
    assert compare.command.epilog == train.command.epilog


def test_train_on_features_runs_a_registered_trainer_by_name(fake_method):
    recipe = load_recipe("tiny")
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    out = train_on_features("lp-fake", x, y, num_classes=2, recipe=recipe, log_every_epoch=False)
    assert out["kept_epoch"] == 2 and fake_method.calls[0]["options"] == {"device": None, "log_every_epoch": False}
    with pytest.raises(ValueError, match="not a method trained on features: 'fft-ce'"):
        train_on_features("fft-ce", x, y, num_classes=2, recipe=recipe)
    with pytest.raises(ValueError, match="'lp-unicon' is not a TURN step 1 \\(these are: lp-ce, lp-gce, lp-elr, "
                                         "nmtune\\)"):
        train_on_features("lp-unicon", x, y, num_classes=2, recipe=recipe, as_turn_step1=True)


@pytest.mark.parametrize("kwargs,needle", [
    ({"family": "lp", "steps": ("probe",), "trainer": None}, "needs the features step and a trainer"),
    ({"family": "lp", "steps": ("probe", "features"), "trainer": print}, "in that order"),
    ({"family": "fft", "steps": ("finetune", "cleanse")}, "in that order"),
    ({"family": "turn", "steps": ("cleanse", "finetune")}, "cleansing needs a probe"),
    ({"family": "zoo", "steps": ("finetune",)}, "family 'zoo'"),
    ({"family": "fft", "steps": ("finetune",), "finetune_loss": "mae"}, "losses are one of"),
])
def test_an_entry_that_cannot_run_is_refused_when_built(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MethodSpec("bad", "a bad entry", **kwargs)
