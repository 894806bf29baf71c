"""Top-5 beside top-1 (turnctl.metrics, ``turnctl eval``, the runner's per-epoch lines and summary),
``turnctl eval --shards`` on another prepared dataset with the same classes, and single-process eval
of an export without DeepSpeed's process group (no op build).

The models have a known answer without running them the same way: a head of zero weights and a
fixed bias ranks the classes by the bias whatever the image, so top-1 is the share of its first
class and top-5 the share of its first five among the decodable test samples.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from launch import check, cpu_env, last_json, run, turnctl_cmd
from shardgen import write_toy_shards
from turnctl.cli import run as cli_run
from turnctl.errors import DataError
from turnctl.evaluate import evaluate_checkpoint
from turnctl.metrics import TOP_K, accuracy_report, prediction_outputs, topk_hits
from turnctl.recipe import load_recipe

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64)
NUM_CLASSES = 7
# The ranking every image gets: class 3 first, then 6, 0, 5, 1 (the top five), then 2, 4.
RANKING = [3, 6, 0, 5, 1, 2, 4]


@pytest.fixture(autouse=True, scope="module")
def _leave_no_process_group():
    """One test starts a world of one in-process; later modules must find none, as after a CLI call."""
    yield
    from turnctl import distributed as dist

    dist.destroy()


# ---- top-k hits from logits --------------------------------------------------------------------

def test_topk_hits_on_hand_made_logits():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.7]] * NUM_CLASSES)  # ranking 3, 6, 1, 4, 2, 0, 5
    hits = topk_hits(logits, torch.arange(NUM_CLASSES), 5)
    assert hits.tolist() == [False, True, True, True, True, False, True]
    assert topk_hits(logits, torch.arange(NUM_CLASSES), 1).tolist() == [c == 3 for c in range(NUM_CLASSES)]
    assert topk_hits(logits, torch.arange(NUM_CLASSES), NUM_CLASSES).all()


def test_ties_rank_the_lower_class_first_like_argmax():
    """Equal logits are ranked as a stable descending sort (and argmax) ranks them: lower index
    first. torch.topk makes no such promise (on CPU it picks 8, 6, 7, 5, 9 out of ten zeros), which
    would make a top-1 hit a top-5 miss."""
    ten_tied = torch.zeros(10, 10)
    assert topk_hits(ten_tied, torch.arange(10), 5).tolist() == [True] * 5 + [False] * 5
    # Six classes tied for first place: the five lowest of them are the top five.
    boundary = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]] * 8)
    assert topk_hits(boundary, torch.arange(8), 5).tolist() == [False, True, True, False, True, True, True, False]
    # Whatever the ties, a top-1 hit (argmax, the first maximum) is a top-5 hit.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2000, 12), generator=g).float()
    labels = logits.argmax(1)
    assert topk_hits(logits, labels, 5).all()
    # And hits agree with the position in a stable descending sort.
    labels = torch.randint(0, 12, (2000,), generator=g)
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(topk_hits(logits, labels, 5), (order == labels[:, None]).any(1))


def test_prediction_outputs_keep_two_numbers_a_sample():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, 0.5, 0.4], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = prediction_outputs(logits, {"cls": torch.tensor([0, 3])})  # ranks 6th, 2nd (tied, lower index)
    assert out["pred"].tolist() == [1, 0] and out["top5"].tolist() == [False, True]
    assert out["top5"].dtype == torch.bool and out["top5"].shape == (2,)


def test_top5_accuracy_counts_the_samples_top1_counts_and_needs_five_classes():
    pred = np.array([0, 1, 2, 2, 1])
    labels = np.array([0, 2, 2, -1, 1])        # the 4th has no known label
    ok = np.array([True, True, True, True, False])  # the 5th is undecodable
    top5 = np.array([True, False, True, True, True])
    rep = accuracy_report(pred, labels, ok, num_classes=6, top5=top5)
    assert rep["accuracy"] == pytest.approx(2 / 3) and rep["top5_accuracy"] == pytest.approx(2 / 3)
    # With TOP_K classes or fewer every label is among the top five: no figure, not a trivial 100%.
    for few in (TOP_K - 2, TOP_K):
        assert accuracy_report(pred, labels, ok, num_classes=few, top5=top5)["top5_accuracy"] is None
    assert accuracy_report(pred, labels, ok, num_classes=6)["top5_accuracy"] is None  # no hits given


# ---- turnctl eval --------------------------------------------------------------------------------

def _ranking_export(path, num_classes: int = NUM_CLASSES, ranking=RANKING, names=None):
    from turnctl.models import load_backbone
    from turnctl.recipe import ModelSection

    bb = load_backbone(ModelSection(family="vit", config=TINY_VIT), num_classes=num_classes)
    bias = torch.zeros(num_classes)
    bias[torch.tensor(ranking)] = torch.arange(len(ranking), 0, -1).float()
    with torch.no_grad():
        bb.head.weight.zero_()
        bb.head.bias.copy_(bias)
    return bb.save_pretrained(path, class_names=names or [f"class{c}" for c in range(num_classes)])


def _shares(toy, split="test"):
    """(top-1, top-5) a RANKING model scores on ``toy``: shares of its first and first five classes."""
    cls = toy.labels[split]["cls"]
    ok = np.ones(len(cls), bool)
    ok[toy.corrupt.get(split, [])] = False
    return float((cls[ok] == RANKING[0]).mean()), float(np.isin(cls[ok], RANKING[:5]).mean())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two prepared datasets with the same 7 classes (the run's and another), one with 5 classes
    and one with the same 7 classes named differently at class 4."""
    root = tmp_path_factory.mktemp("eval-topk")
    own = write_toy_shards(root / "own", counts={"train": [14], "test": [14, 9]}, num_classes=NUM_CLASSES,
                           corrupt={"test": [3]}, seed=1)
    other = write_toy_shards(root / "other", counts={"train": [7], "val": [21, 8]}, num_classes=NUM_CLASSES,
                             seed=2)
    fewer = write_toy_shards(root / "fewer", counts={"train": [5], "test": [10]}, num_classes=5, seed=3)
    renamed = write_toy_shards(root / "renamed", counts={"train": [7], "test": [7]}, num_classes=NUM_CLASSES, seed=4)
    manifest = json.loads((renamed.root / "manifest.json").read_text())
    manifest["class_names"][4] = "n01440364"
    (renamed.root / "manifest.json").write_text(json.dumps(manifest))
    return {"own": own, "other": other, "fewer": fewer, "renamed": renamed}


@pytest.fixture(scope="module")
def run_dir(datasets, tmp_path_factory):
    """A run directory (its recipe names the ``own`` dataset) whose final/ is a RANKING export."""
    run = tmp_path_factory.mktemp("eval-topk-run") / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(load_recipe("tiny", [f"data.shards={datasets['own'].root}"]).to_yaml())
    _ranking_export(run / "final")
    return run


def test_eval_reports_top5_beside_top1(run_dir, datasets, capsys):
    top1, top5 = _shares(datasets["own"])
    assert 0 < top1 < top5 < 1  # the case tells the two apart
    res = evaluate_checkpoint(str(run_dir), split="test", num_workers=0)
    assert res["accuracy"] == pytest.approx(top1) and res["top5_accuracy"] == pytest.approx(top5)
    assert res["results"]["last"]["top5_accuracy"] == pytest.approx(top5)
    assert cli_run(["eval", "--checkpoint", str(run_dir), "--workers", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"top-5 accuracy\W+{100 * top5:.2f}%", out)
    assert json.loads(out.strip().splitlines()[-1])["top5_accuracy"] == pytest.approx(top5)


def test_eval_of_five_classes_shows_no_top5(datasets, tmp_path, capsys):
    export = _ranking_export(tmp_path / "final", num_classes=5, ranking=[3, 0, 1, 4, 2])
    res = evaluate_checkpoint(str(export), shards=str(datasets["fewer"].root), split="test", num_workers=0)
    assert res["top5_accuracy"] is None and res["results"]["final"]["top5_accuracy"] is None
    assert res["accuracy"] == pytest.approx(float((datasets["fewer"].labels["test"]["cls"] == 3).mean()))
    assert cli_run(["eval", "--checkpoint", str(export), "--shards", str(datasets["fewer"].root),
                    "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "top-5" not in out


def test_eval_on_another_dataset_with_the_same_classes(run_dir, datasets):
    top1, top5 = _shares(datasets["other"], "val")
    res = evaluate_checkpoint(str(run_dir / "final"), shards=str(datasets["other"].root), split="val",
                              num_workers=0)
    rep = res["results"]["final"]
    assert rep["shards"] == str(datasets["other"].root) and rep["split"] == "val"
    assert rep["num_samples"] == 29 and rep["undecodable"] == 0
    assert res["accuracy"] == pytest.approx(top1) and res["top5_accuracy"] == pytest.approx(top5)
    # The run directory and its own dataset passed again as --shards: the same as the default.
    same = evaluate_checkpoint(str(run_dir), shards=str(datasets["own"].root), split="test", num_workers=0)
    assert same["accuracy"] == pytest.approx(_shares(datasets["own"])[0])


@pytest.mark.parametrize("which, says", [
    ("fewer", r"fewer/manifest\.json has 5 classes but the model's \S*own/manifest\.json has 7"),
    ("renamed", r"class 4 is 'n01440364' in \S*renamed/manifest\.json but 'class4' in the model's "
                r"\S*own/manifest\.json"),
])
def test_a_dataset_with_other_classes_is_refused_in_one_line(run_dir, datasets, which, says, capsys):
    with pytest.raises(DataError, match=says):
        evaluate_checkpoint(str(run_dir), shards=str(datasets[which].root), split="test", num_workers=0)
    assert cli_run(["eval", "--checkpoint", str(run_dir / "final"), "--shards", str(datasets[which].root),
                    "--workers", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]  # INFO: model loading
    assert len(lines) == 1 and lines[0].startswith("turnctl: error: --shards: ") and re.search(says, lines[0])


def test_an_export_outside_a_run_is_checked_against_its_own_class_names(datasets, tmp_path):
    """Without the run's dataset the export's turnctl.json says which classes the model predicts."""
    export = _ranking_export(tmp_path / "final", names=[f"class{c}" for c in range(NUM_CLASSES)])
    res = evaluate_checkpoint(str(export), shards=str(datasets["own"].root), split="test", num_workers=0)
    assert res["accuracy"] == pytest.approx(_shares(datasets["own"])[0])
    with pytest.raises(DataError, match=r"class 4 is 'n01440364' in .* but 'class4' in the model's .*final/turnctl\.json"):
        evaluate_checkpoint(str(export), shards=str(datasets["renamed"].root), split="test", num_workers=0)


# ---- one process, no DeepSpeed process group ---------------------------------------------------------

PROBE = """
import json, sys
from turnctl.evaluate import evaluate_checkpoint
res = evaluate_checkpoint(sys.argv[1], shards=sys.argv[2], split="test", num_workers=0)
import torch.distributed
ds_comm = sys.modules.get("deepspeed.comm")
print(json.dumps({"accuracy": res["accuracy"], "top5_accuracy": res["top5_accuracy"],
                  "process_group": torch.distributed.is_initialized(),
                  "deepspeed_comm": bool(ds_comm is not None and ds_comm.is_initialized())}))
"""


def test_eval_of_an_export_builds_no_deepspeed_op_and_starts_no_process_group(run_dir, datasets, tmp_path):
    """With a process group DeepSpeed JIT-builds shm_comm on CPU into TORCH_EXTENSIONS_DIR (about 30
    s, and a killed build's lock hangs every later start); one process needs none. The figures equal
    those of evaluating inside a process group, as before."""
    from turnctl import distributed as dist

    top1, top5 = _shares(datasets["own"])
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = cpu_env({"TORCH_EXTENSIONS_DIR": str(ext)})
    cli = last_json(check(run(turnctl_cmd(["eval", "--checkpoint", str(run_dir), "--workers", "0", "--json"]),
                              env=env, timeout=300)).stdout)
    probe = last_json(check(run([sys.executable, "-c", PROBE, str(run_dir / "final"), str(datasets["own"].root)],
                                env=env, timeout=300)).stdout)
    assert list(ext.iterdir()) == []  # nothing built, not even a lock
    assert probe["process_group"] is False and probe["deepspeed_comm"] is False
    # The previous path: inside a (DeepSpeed) process group of one, in this process.
    dist.init_distributed(5.0)
    try:
        grouped = evaluate_checkpoint(str(run_dir), split="test", num_workers=0)
    finally:
        dist.destroy()
    for res in (cli, probe):
        assert res["accuracy"] == grouped["accuracy"] == pytest.approx(top1)
        assert res["top5_accuracy"] == grouped["top5_accuracy"] == pytest.approx(top5)
    shutil.rmtree(ext)


# ---- the runner: per-epoch lines and summary.json --------------------------------------------------

def test_fine_tuning_records_top5_beside_top1_per_epoch_and_in_the_summary(tmp_path, monkeypatch):
    """A fine-tuner whose eval pass keeps metrics.prediction_outputs gets ``val_top5_accuracy`` /
    ``test_top5_accuracy`` in every epoch line and ``test_top5_accuracy`` in summary.json; one that
    keeps predictions only (an older fine-tuner) writes the old lines, without top-5 keys."""
    import turnctl.finetune
    from test_runner import FakeTuner
    from turnctl.lockstep import per_sample_pass
    from turnctl.rundir import RunLayout
    from turnctl.runner import train_from_recipe

    class RankingTuner(FakeTuner):
        def __init__(self, backbone, recipe):
            super().__init__(backbone, recipe)
            bias = torch.zeros(NUM_CLASSES)
            bias[torch.tensor(RANKING)] = torch.arange(NUM_CLASSES, 0, -1).float()
            with torch.no_grad():
                self.backbone.head.weight.zero_()
                self.backbone.head.bias.copy_(bias)

        def predict(self, info, *, transform, batch_size, num_workers):
            return per_sample_pass(self.backbone, info, transform=transform, batch_size=batch_size,
                                   num_workers=num_workers, collect=prediction_outputs)

    class PredOnlyTuner(RankingTuner):
        predict = FakeTuner.predict

    toy = write_toy_shards(tmp_path / "toy", counts={"train": [21], "val": [14], "test": [14, 9]},
                           num_classes=NUM_CLASSES, image_size=16, corrupt={"test": [5]}, seed=5)
    top1, top5 = _shares(toy)
    val_top1, val_top5 = _shares(toy, "val")
    assert 0 < top1 < top5 < 1 and val_top5 > val_top1
    for tuner, has_top5 in ((RankingTuner, True), (PredOnlyTuner, False)):
        monkeypatch.setattr(turnctl.finetune, "FineTuner", tuner)
        out = tmp_path / tuner.__name__
        result = train_from_recipe(load_recipe("tiny", [
            "method=fft-ce", f"data.shards={toy.root}", f"output.dir={out}", "data.num_workers=0",
            "finetune.baseline_epochs=2"]))
        layout = RunLayout(out)
        lines = [json.loads(x) for x in layout.metrics_file.read_text().splitlines()]
        epochs = [x for x in lines if x.get("phase") == "fft"]
        assert len(epochs) == 2
        summary = json.loads(layout.summary_file.read_text())
        for line in epochs:  # the old keys, unchanged
            assert line["test_accuracy"] == pytest.approx(top1) and line["val_accuracy"] == pytest.approx(val_top1)
        if has_top5:
            for line in epochs:
                assert line["test_top5_accuracy"] == pytest.approx(top5)
                assert line["val_top5_accuracy"] == pytest.approx(val_top5)
            want = {"best": pytest.approx(top5), "last": pytest.approx(top5), "max_over_epochs": pytest.approx(top5)}
            assert summary["test_top5_accuracy"] == want and result["test_top5_accuracy"] == want
        else:
            assert not any("top5" in k for line in epochs for k in line)
            assert "test_top5_accuracy" not in summary
        assert summary["test_accuracy"]["last"] == pytest.approx(top1)


def test_eval_of_a_deepspeed_checkpoint_builds_no_op_and_equals_the_runs_own_evaluation(tmp_path):
    """``--checkpoint RUN/checkpoints`` consolidates with zero_to_fp32 in one process: no op build,
    no process group, and the top-1 the run itself measured after that epoch."""
    shards = write_toy_shards(tmp_path / "toy", counts={"train": [28], "val": [7], "test": [14]},
                              num_classes=NUM_CLASSES, image_size=16, seed=6, noise_rate=0.2)
    out = tmp_path / "run"
    check(run(turnctl_cmd(["train", "--recipe", "tiny", "--set", "data.num_workers=0", "--set", "method=fft-ce",
                           "--set", "finetune.baseline_epochs=2", "--set", "deepspeed.zero_stage=2",
                           "--shards", str(shards.root), "--out", str(out), "--stop-after", "0"]), timeout=300))
    (epoch0,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x).get("phase") == "fft"]
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    ev = last_json(check(run(turnctl_cmd(["eval", "--checkpoint", str(out / "checkpoints"), "--workers", "0",
                                          "--json"]), env=cpu_env({"TORCH_EXTENSIONS_DIR": str(ext)}),
                             timeout=300)).stdout)
    assert list(ext.iterdir()) == []
    assert ev["accuracy"] == pytest.approx(epoch0["test_accuracy"], abs=1e-6)
    assert ev["top5_accuracy"] is not None and ev["top5_accuracy"] >= ev["accuracy"]
    # The run's own epoch line carries top-5 beside top-1 (FineTuner's eval pass keeps both)
    assert epoch0["test_top5_accuracy"] == pytest.approx(ev["top5_accuracy"], abs=1e-6)
    assert epoch0["val_top5_accuracy"] >= epoch0["val_accuracy"]


def test_the_linear_probe_records_top5_beside_top1_with_over_five_classes():
    from turnctl.probe import train_linear_probe
    from turnctl.recipe import LossSection, ProbeSection

    g = torch.Generator().manual_seed(0)
    for classes, has_top5 in ((NUM_CLASSES, True), (5, False)):
        y = torch.randint(0, classes, (210,), generator=g)
        x = torch.nn.functional.one_hot(y, classes).float() + 1.5 * torch.randn(210, classes, generator=g)
        res = train_linear_probe(x, y, num_classes=classes, seed=0, losses=LossSection(),
                                 probe=ProbeSection(epochs=3, batch_size=32), eval_sets={"test": (x, y)},
                                 log_every_epoch=False)
        last = res.history[-1]
        assert ("test_top5" in last) is has_top5
        if has_top5:
            W, b = res.head_state["weight"], res.head_state["bias"]
            want = topk_hits(x @ W.T + b, y).float().mean().item()
            assert last["test_top5"] == pytest.approx(want) and last["test_top5"] >= last["test_acc"]
