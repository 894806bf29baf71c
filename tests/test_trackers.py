"""Per-step training metrics and experiment trackers (issue 16): what a real fine-tuning run writes
to metrics.jsonl every output.log_every_steps optimizer steps, and what MLflow (its file store in
the run directory) and W&B (offline) recorded, read back with their own clients; a resumed run
logs every step once, in the file and in the trackers.

One tiny FFT-CE run (a 2-layer ViT on toy shards, DeepSpeed ZeRO-2, a world of one) is shared by
the module: a full run, then a rewind to its first checkpoint (as if it had crashed
during the second epoch, after that epoch's step lines were written) and a resume.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
from pathlib import Path

import pytest

from turnctl import trackers as trackers_mod
from turnctl.errors import RecipeError, TurnctlError
from turnctl.recipe import load_recipe
from turnctl.rundir import RunDir

mlflow_tracking = pytest.importorskip("mlflow.tracking")
wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")

LOG_EVERY = 3
EPOCHS = 2


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _step_lines(run_dir: Path):
    return [h for h in _lines(run_dir / "metrics.jsonl") if h["phase"] == "finetune_step"]


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (wandb 0.19+ has no Python reader of its own):
    a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks of 32 KiB whose chunks are
    crc32c (4 bytes), length (2, little-endian), type (1 full, 2 first, 3 middle, 4 last), data."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += data
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_run(run_dir: Path, nth: int):
    """(run id, project, config, history rows, saved files) of the ``nth`` offline W&B run written in
    ``run_dir`` (in the order they started)."""
    found = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    record_file = Path(found[nth])
    run_id = project = None
    config, history, files = {}, [], []
    for rec in wandb_records(record_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id, project = rec.run.run_id, rec.run.project
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "files":
            files += [f.path for f in rec.files.files]
    return run_id, project, config, history, files


def _expected_steps(fft_lines):
    total = sum(h["optimizer_steps"] for h in fft_lines)
    return [g for g in range(1, total + 1) if g % LOG_EVERY == 0]


# The run, the rewind and the resume, in one process (imports take most of a tiny run's time; the
# CLI's turnctl.cli.run would end the process group between the two). As if the run had died
# during epoch 1, after writing its step lines but before checkpoint epoch_0001: `latest` names
# epoch_0000 and there is no summary yet.
RUN_REWIND_RESUME = """
import json, shutil, sys
from pathlib import Path
from turnctl.recipe import load_recipe
from turnctl.runner import train_from_recipe
recipe = load_recipe("tiny", sys.argv[1:])
out = Path(recipe.output.dir)
print(json.dumps(train_from_recipe(recipe)))
shutil.copy(out / "metrics.jsonl", out.parent / "metrics-before.jsonl")
shutil.copy(out / "trackers.json", out.parent / "trackers-before.json")
(out / "checkpoints" / "latest").write_text("epoch_0000")
shutil.rmtree(out / "checkpoints" / "epoch_0001")
(out / "summary.json").unlink()
print(json.dumps(train_from_recipe(recipe, resume=True)))
"""


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """The full run, then its rewind and resume, in a process of its own (a world of one: a DeepSpeed
    engine built in the test process would outlive its process group). Returns what the checks need."""
    from launch import check, cpu_env, run

    from shardgen import write_toy_shards

    tmp = tmp_path_factory.mktemp("trackers")
    env = cpu_env({"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
                   "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
                   "WANDB_DATA_DIR": str(tmp / "wandb-data")})
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT",
              "WANDB_DIR", "WANDB_API_KEY"):
        env.pop(k, None)
    toy = write_toy_shards(tmp / "toy", counts={"train": [22, 22], "val": [12], "test": [12]}, num_classes=4,
                           image_size=16, noise_rate=0.3, seed=1)
    out = tmp / "run"
    sets = ["method=fft-ce", f"data.shards={toy.root}", f"output.dir={out}", "data.num_workers=0",
            f"finetune.baseline_epochs={EPOCHS}", "finetune.batch_size=4", "finetune.micro_batch_size=4",
            f"output.log_every_steps={LOG_EVERY}", "output.report_to=[mlflow,wandb]"]
    res = check(run([sys.executable, "-c", RUN_REWIND_RESUME, *sets], env=env, timeout=300))
    first, second = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")][-2:]
    before = {"metrics": _lines(tmp / "metrics-before.jsonl"),
              "ids": json.loads((tmp / "trackers-before.json").read_text()), "result": first}
    return {"out": out, "recipe": load_recipe("tiny", sets), "before": before, "result": second}


def test_metrics_jsonl_has_a_step_line_every_k_optimizer_steps(tracked_run):
    lines = tracked_run["before"]["metrics"]
    fft = [h for h in lines if h["phase"] == "fft"]
    steps = [h for h in lines if h["phase"] == "finetune_step"]
    assert [h["epoch"] for h in fft] == list(range(EPOCHS))
    assert fft[0]["optimizer_steps"] == 11  # 44 samples, 4 per optimizer step
    assert [h["global_step"] for h in steps] == _expected_steps(fft) == [3, 6, 9, 12, 15, 18, 21]
    # global step 12 is the first step of epoch 1 (11 steps per epoch)
    assert [h["epoch"] for h in steps] == [0, 0, 0, 1, 1, 1, 1]
    for h in steps:
        assert h["loss"] > 0 and h["samples_per_s"] > 0 and 0 < h["lr"] <= tracked_run["recipe"].finetune.lr
        assert h["grad_norm"] is None or h["grad_norm"] > 0
    # The lines' LRs are the schedule's, as the epoch line lists it per optimizer step.
    lr_per_step = fft[0]["lr_per_step"] + fft[1]["lr_per_step"]
    assert [h["lr"] for h in steps] == [lr_per_step[g - 1] for g in _expected_steps(fft)]
    # A window restarts with its epoch: the first line of epoch 1 averages its first step alone.
    assert [h["optimizer_steps_averaged"] for h in steps] == [3, 3, 3, 1, 3, 3, 3]
    # Lines come in the order they were logged: each epoch's steps before its epoch line.
    phases = [(h["phase"], h.get("global_step", h["epoch"])) for h in lines]
    assert phases.index(("fft", 0)) == 3 and phases[-1] == ("fft", 1)


def test_a_resumed_run_has_every_line_once_and_the_same_figures(tracked_run):
    before = tracked_run["before"]["metrics"]
    after = _lines(tracked_run["out"] / "metrics.jsonl")
    key = lambda h: (h["phase"], h.get("global_step"), h["epoch"])  # noqa: E731
    assert [key(h) for h in after] == [key(h) for h in before]
    # The first epoch's lines are the ones written before the rewind; the replayed epoch gives the
    # same figures (every epoch reseeds from the run seed).
    assert after[:4] == before[:4]
    assert tracked_run["result"]["test_accuracy"] == tracked_run["before"]["result"]["test_accuracy"]
    for old, new in zip(before[4:], after[4:]):
        assert new["time"] > old["time"]
        assert new.get("loss", new.get("train_loss")) == pytest.approx(old.get("loss", old.get("train_loss")))


def test_mlflow_records_params_step_metrics_and_the_summary(tracked_run, monkeypatch):
    out, recipe = tracked_run["out"], tracked_run["recipe"]
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == tracked_run["before"]["ids"]  # the resume logged into the same MLflow and W&B runs
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only with it
    client = mlflow_tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tiny"  # the recipe's name (MLFLOW_EXPERIMENT_NAME unset)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    params = run.data.params
    assert params["finetune.lr"] == str(recipe.finetune.lr) and params["method"] == "fft-ce"
    assert params["output.log_every_steps"] == str(LOG_EVERY) and params["output.dir"] == str(out)
    steps = _step_lines(out)
    history = client.get_metric_history(run.info.run_id, "finetune_step/loss")
    assert sorted(m.step for m in history) == [h["global_step"] for h in steps]  # once each, resume or not
    assert {m.step: m.value for m in history} == pytest.approx({h["global_step"]: h["loss"] for h in steps})
    val = client.get_metric_history(run.info.run_id, "fft/val_accuracy")
    assert sorted(m.step for m in val) == list(range(EPOCHS))
    assert "summary.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_wandb_offline_records_config_and_step_metrics_and_resumes_the_same_run(tracked_run):
    out, recipe = tracked_run["out"], tracked_run["recipe"]
    ids = json.loads((out / "trackers.json").read_text())
    run_id, project, config, history, files = wandb_offline_run(out, 0)
    assert run_id == ids["wandb"] and project == "turnctl"
    assert config["finetune.lr"] == str(recipe.finetune.lr) and config["method"] == "fft-ce"
    rows = [r for r in history if "finetune_step/loss" in r]
    logged = {r["finetune_step/global_step"]: r["finetune_step/loss"] for r in rows}
    want = {h["global_step"]: h["loss"] for h in tracked_run["before"]["metrics"] if h["phase"] == "finetune_step"}
    assert logged == pytest.approx(want)
    assert "summary.json" in files
    # The resumed process continued the same W&B run, and sent it only what it had not had.
    resumed_id, _, _, resumed_history, resumed_files = wandb_offline_run(out, 1)
    assert resumed_id == run_id and "summary.json" in resumed_files
    assert not [r for r in resumed_history if "finetune_step/loss" in r]


def test_an_unknown_tracker_is_a_one_line_recipe_error_naming_the_key(capsys):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny", ["output.report_to=[tensorboard,neptune]"])
    assert "output.report_to" in str(err.value) and "neptune" in str(err.value)
    assert "\n" not in str(err.value)
    from turnctl.cli import run

    assert run(["train", "--recipe", "tiny", "--dry-run", "--set", "output.report_to=[neptune]"]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(said) == 1 and "output.report_to" in said[0], said


def test_report_to_and_the_legacy_tensorboard_switch():
    assert load_recipe("tiny", ["output.report_to=mlflow"]).output.report_to == ["mlflow"]
    assert load_recipe("tiny", ["output.report_to=none"]).output.report_to == []
    assert trackers_mod.requested(load_recipe("tiny").output) == ([], False)  # tiny: tensorboard false
    assert trackers_mod.requested(load_recipe("tiny", ["output.tensorboard=true"]).output) == (["tensorboard"], False)
    with pytest.raises(RecipeError, match="output.tensorboard is false but output.report_to lists tensorboard"):
        load_recipe("tiny", ["output.report_to=[tensorboard]"])


def test_a_tracker_named_but_not_installed_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    recipe = load_recipe("tiny", [f"output.dir={tmp_path / 'run'}", "output.report_to=[wandb]"])
    with pytest.raises(TurnctlError) as err:
        RunDir.open(recipe, resume=False)
    assert str(err.value) == ("output.report_to: wandb is not installed; pip install 'turnctl[wandb]' "
                              "(or drop it from report_to)")
    assert not (tmp_path / "run").exists()


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch):
    warned = []
    monkeypatch.setattr(trackers_mod.log, "warning", lambda *a: warned.append(a[0] % a[1:]))
    run = RunDir(tmp_path, load_recipe("tiny"))

    class Down(trackers_mod.Tracker):
        name = "down"

        def log(self, phase, values, *, step_name, step):
            raise ConnectionError("tracking server gone")

    run.trackers.started, run.trackers.active = True, [Down(tmp_path, run_name="r", recipe_name="tiny")]
    for step in (1, 2):
        run.log_metrics({"phase": "finetune_step", "epoch": 0, "global_step": step, "loss": 1.0})
    assert warned == ["down: ConnectionError: tracking server gone; not reporting to it any more "
                      "(metrics.jsonl has every line)"]
    assert [h["global_step"] for h in _step_lines(tmp_path)] == [1, 2]


def test_metrics_jsonl_grows_by_whole_lines_only(tmp_path, monkeypatch):
    run = RunDir(tmp_path, load_recipe("tiny"))
    run.log_metrics({"phase": "fft", "epoch": 0, "train_loss": 1.0})
    good = (tmp_path / "metrics.jsonl").read_bytes()

    def half_then_full_disk(fd, data):
        real_write(fd, bytes(data[:5]))
        raise OSError(28, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(os, "write", half_then_full_disk)
    with pytest.raises(OSError):
        run.log_metrics({"phase": "fft", "epoch": 1, "train_loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == good
    # A line torn by a crash of the machine: the next process drops it before appending.
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"phase": "finetune_step", "glo')
    again = RunDir(tmp_path, load_recipe("tiny"))
    again.reset_history(_lines_prefix(good))
    again.log_metrics({"phase": "fft", "epoch": 1, "train_loss": 0.5})
    assert [h["epoch"] for h in _lines(tmp_path / "metrics.jsonl")] == [0, 1]


def _lines_prefix(data: bytes):
    return [json.loads(line) for line in data.decode().splitlines()]


def test_reset_history_keeps_the_step_lines_up_to_the_checkpoint(tmp_path):
    run = RunDir(tmp_path, load_recipe("tiny"))
    for g in (3, 6):
        run.log_metrics({"phase": "finetune_step", "epoch": 0, "global_step": g, "loss": 1.0})
    run.log_metrics({"phase": "fft", "epoch": 0, "train_loss": 1.0})
    checkpoint_history = list(run.history)
    for g in (9, 12):
        run.log_metrics({"phase": "finetune_step", "epoch": 1, "global_step": g, "loss": 1.0})
    resumed = RunDir(tmp_path, load_recipe("tiny"))
    resumed.reset_history(checkpoint_history, global_step=7)
    assert [(h["phase"], h.get("global_step")) for h in _lines(tmp_path / "metrics.jsonl")] == [
        ("finetune_step", 3), ("finetune_step", 6), ("fft", None)]
    assert resumed.history == checkpoint_history  # epoch lines only: what checkpoints carry


def test_a_run_stopped_early_leaves_its_trackers_closed_as_killed(tmp_path, monkeypatch):
    # --stop-after: the process exits without a summary; the trackers are closed at exit (MLflow:
    # KILLED, not left RUNNING), before W&B's own exit hook has shut its connection.
    from launch import check, cpu_env, run, turnctl_cmd
    from shardgen import write_toy_shards

    toy = write_toy_shards(tmp_path / "toy", counts={"train": [16], "val": [8], "test": [8]}, num_classes=4,
                           image_size=16, seed=2)
    env = cpu_env({"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
                   "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                   "WANDB_DATA_DIR": str(tmp_path / "wandb-data")})
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        env.pop(k, None)
    out = tmp_path / "run"
    res = check(run(turnctl_cmd(["train", "--recipe", "tiny", "--set", "method=fft-ce", "--set", "data.num_workers=0",
                                 "--set", "finetune.baseline_epochs=2", "--set", "output.report_to=[mlflow,wandb]",
                                 "--shards", str(toy.root), "--out", str(out), "--stop-after", "0"]),
                    env=env, timeout=240))
    assert "not reporting to it any more" not in res.stderr, res.stderr[-2000:]
    assert not (out / "summary.json").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow_tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    assert client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"]).info.status == "KILLED"
