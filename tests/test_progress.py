"""Progress in a terminal and in a log file (turnctl.logger.track): in a file, one plain line at
most every ``output.progress_every_s`` for every long phase, so that a batch job's log never goes
silent; ``TURNCTL_NO_PROGRESS`` turns it off (and ``=0`` does not)."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime

import pytest

from launch import check, cpu_env, run, turnctl_cmd
from shardgen import write_toy_shards
from turnctl import logger


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.created, record.getMessage()))


@pytest.fixture
def lines(monkeypatch):
    monkeypatch.setenv("CI", "true")  # a log file, not a terminal
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TURNCTL_NO_PROGRESS", raising=False)
    handler = Lines()
    level = logger.log.level
    logger.log.addHandler(handler)
    logger.log.setLevel(logging.INFO)
    yield handler.records
    logger.log.removeHandler(handler)
    logger.log.setLevel(level)


def slow(n, pause):
    for i in range(n):
        time.sleep(pause)
        yield i


def test_a_log_file_gets_a_line_at_most_every_interval_with_rate_and_eta(lines, monkeypatch):
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "0.25")
    start = time.time()
    assert list(logger.track(slow(12, 0.1), "loss pass [train]", total=12, batch_size=64)) == list(range(12))
    assert len(lines) >= 3
    times = [start] + [t for t, _ in lines]
    assert max(b - a for a, b in zip(times, times[1:])) < 0.25 + 0.2  # never silent longer than the interval
    first = lines[0][1]
    assert re.fullmatch(r"loss pass \[train\]: \d+/12 \(\d+%\), [\d.]+ samples/s, elapsed 0:00:00, ETA 0:00:0\d", first)
    assert lines[-1][1].startswith("loss pass [train]: 12/12 (100%)") and lines[-1][1].endswith(", done")


def test_a_short_phase_writes_nothing(lines, monkeypatch):
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "60")
    assert list(logger.track(range(5), "eval [test]", total=5)) == list(range(5))
    assert lines == []


@pytest.mark.parametrize("value, shown", [("1", False), ("true", False), ("0", True), ("", True), ("no", True)])
def test_turnctl_no_progress_reads_as_it_says(lines, monkeypatch, value, shown):
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "0.05")
    monkeypatch.setenv("TURNCTL_NO_PROGRESS", value)
    list(logger.track(slow(3, 0.06), "extract [train]", total=3))
    assert bool(lines) is shown


def test_other_ranks_stay_quiet(lines, monkeypatch):
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "0.05")
    monkeypatch.setenv("RANK", "1")
    list(logger.track(slow(3, 0.06), "extract [train]", total=3))
    assert lines == []


def test_the_recipe_sets_the_interval_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv("TURNCTL_PROGRESS_EVERY_S", raising=False)
    monkeypatch.setitem(logger._progress_every, "s", 5.0)
    assert logger.progress_every_s() == 5.0
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "2")
    assert logger.progress_every_s() == 2.0
    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "soon")  # not a number: the recipe's
    assert logger.progress_every_s() == 5.0


def test_a_training_run_logged_to_a_file_reports_every_phase_and_is_never_silent_for_long(tmp_path):
    """A whole TURN run with stderr to a pipe (as a batch job's log file) and a 10 ms interval: the
    long phases (extraction, loss pass, fine-tuning epoch) write progress lines, and no two
    consecutive lines are more than a few seconds apart."""
    toy = write_toy_shards(tmp_path / "toy", counts={"train": [64, 64], "val": [32], "test": [32]},
                           num_classes=4, image_size=32, seed=3)
    proc = check(run(turnctl_cmd(["train", "--recipe", "tiny", "--shards", str(toy.root), "--out", str(tmp_path / "run"),
                                  "--set", "finetune.epochs=2", "--set", "output.progress_every_s=0.01",
                                  "--set", "data.num_workers=0"]),
                     env=cpu_env({"TURNCTL_NO_PROGRESS": "0"})))  # "0": progress stays on
    text = proc.stderr
    # (evaluation goes through the same per_sample_pass as the loss pass; its single tiny batch
    # here takes under the interval)
    for phase in (r"features \[train\]", r"per-sample loss \[train\]", "fine-tune epoch 1"):
        assert re.search(rf" INFO {phase}: \d+/\d+ \(\d+%\), [\d.]+ samples/s, elapsed \d:\d\d:\d\d", text), (phase, text)
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
              for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:INFO|WARNING) ", text, re.M)]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    # One-second timestamps, and DeepSpeed's engine start-up, which no progress line covers (2 s here).
    assert max(gaps) <= 5, text


def test_the_linear_probe_reports_progress_within_an_epoch(lines, monkeypatch):
    """A CPU probe on millions of cached features can take minutes per epoch: its steps are tracked."""
    import torch

    from turnctl.probe import train_linear_probe
    from turnctl.recipe import LossSection, ProbeSection

    monkeypatch.setenv("TURNCTL_PROGRESS_EVERY_S", "0.000001")
    x, y = torch.randn(640, 8), torch.randint(0, 3, (640,))
    train_linear_probe(x, y, num_classes=3, seed=0, probe=ProbeSection(epochs=2, batch_size=64), losses=LossSection())
    steps = [m for _, m in lines if m.startswith("LP epoch 2/2: ")]
    assert steps and steps[-1].startswith("LP epoch 2/2: 10/10 (100%)") and "samples/s" in steps[0]
