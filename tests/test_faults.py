"""Process faults on two CPU ranks: a rank killed or hung mid-epoch, SIGTERM, and --resume.

tests/scripts/fault_inject.py makes one rank send itself a real signal at a named fine-tuning epoch
and micro-step. What a user must be able to rely on:
  * a dead rank fails the others at once, a hung one within deepspeed.timeout_minutes, each with
    one line saying which of the two happened (never a hang until the cluster's wall-clock limit);
  * --resume after a SIGKILL continues from the last *complete* checkpoint and ends exactly where an
    uninterrupted run ends (same selections, same weights);
  * SIGTERM on any one rank -> every rank stops at the same optimizer step, a checkpoint is written,
    exit 143; --resume continues mid-epoch and also ends exactly where an uninterrupted run ends.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# RUN_ARGS: the recipe every run here shares with conftest.tiny_reference_run, so that a copy of
# the reference can be resumed.
from launch import REPO, RUN_ARGS, assert_same_run as _assert_same_run, check, cpu_env, deepspeed_cmd, free_port, run, \
    run_metrics as _metrics, turnctl_cmd

pytestmark = [pytest.mark.faults, pytest.mark.multirank]

SCRIPT = REPO / "tests" / "scripts" / "fault_inject.py"
TIMEOUT_MIN = 0.25  # the hung-rank test's process-group timeout (15 s): the survivor fails after it


def _args(shards, out, *extra):
    return ["train", *RUN_ARGS, "--shards", str(shards), "--out", str(out), *extra]


def _launch(args, fault=None, timeout=300):
    """``deepspeed --num_gpus 2 fault_inject.py ARGS`` (the launcher users run), one fault armed."""
    cmd = deepspeed_cmd(args)
    cmd[cmd.index("turnctl")] = str(SCRIPT)
    return run(cmd, env=cpu_env({"TURNCTL_TEST_FAULT": fault} if fault else None), timeout=timeout)


@pytest.fixture(scope="module")
def reference(tiny_reference_run):
    """The uninterrupted run every resumed run must reproduce."""
    return tiny_reference_run[0]


def _spawn_ranks(args, fault, world=2):
    """One process per rank started by hand (no launcher to clean up after a dead rank), so what
    the surviving rank does is turnctl's own behaviour."""
    port = free_port()
    procs = []
    for r in range(world):
        env = cpu_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TURNCTL_TEST_FAULT": fault})
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.time()


def _stopped(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _survivor(procs, fault_seen, what, limit):
    """Wait until rank 1's fault is visible (``fault_seen()``), then for rank 0 to exit within
    ``limit`` seconds. Returns (seconds rank 0 took after the fault, rank 0's stderr, its last line);
    every process is gone afterwards, whatever happened."""
    try:
        t_fault = _wait_for(fault_seen, 240, what)
        _wait_for(lambda: procs[0].poll() is not None, limit, "rank 0 to fail")
        waited = time.time() - t_fault
    finally:
        outs = []
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            outs.append(p.communicate())
    err0 = outs[0][1]
    assert procs[0].returncode == 1, err0[-3000:]
    assert "Traceback" not in err0
    return waited, err0, err0.strip().splitlines()[-1]


def test_a_killed_rank_fails_the_other_at_once(run_shards, tmp_path):
    procs = _spawn_ranks(_args(run_shards, tmp_path / "run"), "KILL:1:0:3")
    waited, _, last = _survivor(procs, lambda: procs[1].poll() is not None, "rank 1 to die", 60)
    assert procs[1].returncode == -9
    assert last.startswith("turnctl: error: another rank died ("), last
    # A dead peer closes its sockets: no waiting for the timeout (5 min in this recipe).
    assert waited < 30, waited


def test_a_hung_rank_fails_the_other_within_the_timeout(run_shards, tmp_path):
    procs = _spawn_ranks(_args(run_shards, tmp_path / "run", "--set", f"deepspeed.timeout_minutes={TIMEOUT_MIN}"),
                         "STOP:1:0:3")
    waited, _, last = _survivor(procs, lambda: _stopped(procs[1].pid), "rank 1 to stop", TIMEOUT_MIN * 60 + 45)
    assert last.startswith("turnctl: error: a collective timed out (Timed out waiting 15000ms"), last
    assert "deepspeed.timeout_minutes" in last
    # Rank 0 may have entered the collective a little before rank 1 stopped (they sync every
    # micro-step, so not by much): half the timeout still tells "the timeout" from "at once".
    assert waited >= TIMEOUT_MIN * 60 / 2, f"failed after {waited:.1f}s, long before the timeout: not the timeout"


def test_resume_after_sigkill_continues_from_the_last_complete_checkpoint(run_shards, reference, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    res = _launch(_args(run_shards, out), fault="KILL:1:1:3")
    assert res.returncode != 0
    assert time.time() - t0 < 240
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch_0000"
    assert (ckpt / "epoch_0000" / "COMPLETE").is_file()
    assert [l["epoch"] for l in _metrics(out) if l["phase"] == "fft"] == [0]
    # What a kill in the middle of a save leaves: a tag without COMPLETE. Never loaded, and reclaimed.
    half = ckpt / "epoch_0001_step_000002"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02half a file")
    check(_launch(_args(run_shards, out, "--resume")))
    assert not half.exists()
    assert (ckpt / "latest").read_text() == "epoch_0001"
    _assert_same_run(reference, out)


def test_sigterm_on_one_rank_checkpoints_mid_epoch_then_resume_matches(run_shards, reference, tmp_path):
    out = tmp_path / "run"
    res = _launch(_args(run_shards, out), fault="TERM:1:1:3")
    assert res.returncode == 143, res.stderr[-3000:]
    # Only rank 1 got the signal; both stopped after the same step (3 is inside the 2nd optimizer
    # step of gradient accumulation 2, so both stop once micro-step 4 is done) and rank 0 says so.
    stopped = [l for l in res.stderr.splitlines() if "turnctl: stopped:" in l]
    assert len(stopped) == 2 and all("epoch 1, micro-step 4 of" in l for l in stopped), stopped
    ckpt = out / "checkpoints"
    tag = "epoch_0001_step_000004"
    assert (ckpt / "latest").read_text() == tag
    info = json.loads((ckpt / tag / "COMPLETE").read_text())
    assert info["world_size"] == 2 and info["tag"] == tag
    assert [l["epoch"] for l in _metrics(out) if l["phase"] == "fft"] == [0]
    res = check(_launch(_args(run_shards, out, "--resume")))
    assert "at epoch 1, step 4" in " ".join(res.stderr.split())  # rich wraps long log lines
    assert [l.get("resumed_at_step") for l in _metrics(out) if l["phase"] == "fft"] == [None, 4]
    _assert_same_run(reference, out)


def test_sigterm_to_the_whole_job_like_slurm_checkpoints_and_resumes(run_shards, reference, tmp_path):
    """Slurm signals every process of the step: the launcher too, which sends each rank a second
    SIGTERM of its own at once. The checkpoint must survive the repeat."""
    out = tmp_path / "run"
    cmd = deepspeed_cmd(_args(run_shards, out))
    cmd[cmd.index("turnctl")] = str(SCRIPT)
    # 0.5 s per micro-step from epoch 1 on: a window of ~4 s inside that epoch for the signal.
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=cpu_env({"TURNCTL_TEST_FAULT": "SLOW:*:1:0"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Epoch 1's subset is on disk once its per-sample pass and selection are done: training next.
        _wait_for(lambda: (out / "selection" / "epoch_1.npz").is_file() or proc.poll() is not None, 240,
                  "epoch 1 to start")
        time.sleep(0.2)  # any time before the epoch's last step works: a signal is acted on at a step
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text()
    assert tag.startswith("epoch_0001_step_"), (tag, err[-3000:])
    assert (ckpt / tag / "COMPLETE").is_file()
    assert "turnctl: stopped: stopped by a signal at fine-tuning epoch 1" in err
    check(_launch(_args(run_shards, out, "--resume")))
    _assert_same_run(reference, out)


def test_resume_refuses_other_world_sizes_and_incomplete_checkpoints(run_shards, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    # Written by 2 ranks, resumed by 1: ZeRO's optimizer shards do not fit; say so before any work.
    res = run(turnctl_cmd(_args(run_shards, out, "--resume")), timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "written by 2 ranks, resumed with 1" in last and str(out / "checkpoints" / "epoch_0001") in last
    # `latest` naming a checkpoint without its COMPLETE marker (an older turnctl, or a hand copy):
    # rank 0 checks, and every rank stops with its message (none waits for the timeout).
    (out / "checkpoints" / "epoch_0001" / "COMPLETE").unlink()
    t0 = time.time()
    res = run(deepspeed_cmd(_args(run_shards, out, "--resume")), timeout=120)
    assert res.returncode == 2
    errors = [l for l in res.stderr.splitlines() if "turnctl: error:" in l]
    # (the launcher kills the other rank as soon as one exits non-zero: it may not get to print)
    assert 1 <= len(errors) <= 2 and all("checkpoint is incomplete (no COMPLETE marker)" in l for l in errors), errors
    assert time.time() - t0 < 60
