"""turnctl under Slurm: ranks from srun's task variables, --resume auto, the SIGUSR1 requeue cycle.

No Slurm here: two processes get exactly the variables ``srun`` gives two tasks on one node (no
RANK / WORLD_SIZE / MASTER_*), and a stand-in ``scontrol`` on PATH records the requeue request.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import PORTS_USED, REPO, RUN_ARGS, assert_same_run, cpu_env, run_metrics
from turnctl import slurm
from turnctl.errors import DistributedError

SCRIPT = REPO / "tests" / "scripts" / "fault_inject.py"


# ---- the variables ----

def test_hostlists_and_tasks_per_node_are_read_as_slurm_writes_them():
    assert slurm.expand_hostlist("node[08-10],gpu[1,3-4]x,login") == [
        "node08", "node09", "node10", "gpu1x", "gpu3x", "gpu4x", "login"]
    assert slurm.expand_hostlist("a[1-2]b[7-8]") == ["a1b7", "a1b8", "a2b7", "a2b8"]
    assert slurm.tasks_per_node("4(x2),3,1(x1)") == [4, 4, 3, 1]
    with pytest.raises(DistributedError, match="unbalanced"):
        slurm.expand_hostlist("node[1-2")
    with pytest.raises(DistributedError, match="SLURM_TASKS_PER_NODE"):
        slurm.tasks_per_node("4x2")


SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
             "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[03-04]",
             "SLURM_NODELIST": "gpu[01-04]"}


def test_an_srun_task_gets_rank_world_local_rank_and_the_first_host_of_its_step():
    assert slurm.launch_env(SRUN_TASK) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "4",
        "MASTER_ADDR": "gpu03", "MASTER_PORT": str(15000 + 4242)}
    # the variables a launcher or the user set win
    assert "MASTER_PORT" not in slurm.launch_env({**SRUN_TASK, "MASTER_PORT": "29500"})
    assert slurm.launch_env({**SRUN_TASK, "RANK": "0"}) == {}  # deepspeed/torchrun inside the allocation
    env = {**SRUN_TASK, "MASTER_ADDR": "10.0.0.1"}
    assert slurm.adopt_launch_env(env)["RANK"] == "5" and env["RANK"] == "5" and env["MASTER_ADDR"] == "10.0.0.1"


def test_the_batch_script_itself_is_one_process_not_rank_0_of_the_job():
    batch = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert slurm.launch_env(batch) == {}


def test_a_task_outside_its_step_is_refused_with_one_line():
    with pytest.raises(DistributedError, match="SLURM_PROCID=9 but the step has 8 tasks"):
        slurm.launch_env({**SRUN_TASK, "SLURM_PROCID": "9"})
    with pytest.raises(DistributedError, match="SLURM_LOCALID"):
        slurm.launch_env({k: v for k, v in SRUN_TASK.items() if k != "SLURM_LOCALID"})


def test_sigusr1_requeues_through_scontrol_on_global_rank_0_only(tmp_path, monkeypatch):
    record = _fake_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_JOB_ID": "77", "RANK": "0"}
    assert slurm.requeue_on(signal.SIGTERM, env) is None  # scancel / preemption: no requeue
    assert slurm.requeue_on(signal.SIGUSR1, {**env, "RANK": "1"}) is None
    assert slurm.requeue_on(signal.SIGUSR1, {**env, "TURNCTL_SLURM_REQUEUE": "0"}) is None
    assert not record.exists()
    assert slurm.requeue_on(signal.SIGUSR1, env).endswith("scontrol requeue 77")
    assert record.read_text().split() == ["requeue", "77"]


def _fake_scontrol(tmp_path: Path, monkeypatch=None) -> Path:
    """An ``scontrol`` on PATH that records its arguments in ``record``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    record = tmp_path / "scontrol.args"
    fake = bindir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    fake.chmod(0o755)
    if monkeypatch is not None:
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return record


# ---- a simulated 2-task srun step, signalled and requeued ----

def _job_port_and_id():
    """A job id whose derived MASTER_PORT (15000 + id mod 20000) is free now."""
    for _ in range(200):
        port = random.randrange(slurm.PORT_BASE, slurm.PORT_BASE + slurm.PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        PORTS_USED.add(port)  # conftest removes DeepSpeed's /dev/shm buffers of killed ranks by port
        return port, str(port - slurm.PORT_BASE + 3 * slurm.PORT_SPAN)
    raise AssertionError("no free port in the Slurm range")


def _srun(args, *, job_id: str, bindir: Path, fault=None):
    """What ``srun --ntasks 2 --nodes 1 python fault_inject.py ARGS`` starts: two tasks, Slurm's
    variables only."""
    procs = []
    for task in range(2):
        env = cpu_env({"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(task),
                       "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(task),
                       "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_NODELIST": "localhost",
                       "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
        for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        if fault:
            env["TURNCTL_TEST_FAULT"] = fault
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    return procs


def _finish(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.communicate()
    return [p.returncode for p in procs], outs


@pytest.mark.multirank
@pytest.mark.faults
def test_srun_tasks_requeued_on_sigusr1_end_like_an_uninterrupted_run(run_shards, tiny_reference_run, tmp_path):
    reference = tiny_reference_run[0]
    record = _fake_scontrol(tmp_path)
    port, job_id = _job_port_and_id()
    out = tmp_path / "run"
    line = ["train", *RUN_ARGS, "--shards", str(run_shards), "--out", str(out), "--resume", "auto"]

    # First launch: --resume auto starts the run (no directory yet). 0.5 s per micro-step from
    # epoch 1 on leaves a window inside that epoch for Slurm's time-limit warning.
    procs = _srun(line, job_id=job_id, bindir=tmp_path / "bin", fault="SLOW:*:1:0")
    deadline = time.time() + 240
    while not (out / "selection" / "epoch_1.npz").is_file() and all(p.poll() is None for p in procs):
        assert time.time() < deadline, "epoch 1 never started"
        time.sleep(0.1)
    time.sleep(0.2)
    for p in procs:  # --signal=USR1@120 signals every task of the step
        os.kill(p.pid, signal.SIGUSR1)
    codes, outs = _finish(procs, timeout=120)
    err0 = outs[0][1]
    assert codes == [143, 143], (codes, err0[-3000:], outs[1][1][-2000:])
    assert "world size 2" in err0 and "received SIGUSR1" in err0
    assert record.read_text().split() == ["requeue", job_id]  # rank 0 asked once, rank 1 never
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag.startswith("epoch_0001_step_") and (out / "checkpoints" / tag / "COMPLETE").is_file()

    # The requeued job runs the very same line: it continues the run and ends where an
    # uninterrupted 2-rank run ends.
    codes, outs = _finish(_srun(line, job_id=job_id, bindir=tmp_path / "bin"))
    assert codes == [0, 0], outs[0][1][-3000:]
    assert "--resume auto" in outs[0][1] and "at epoch 1, step" in " ".join(outs[0][1].split())
    assert [l.get("resumed_at_step") is not None for l in run_metrics(out) if l["phase"] == "fft"] == [False, True]
    assert_same_run(reference, out)
    assert record.read_text().split() == ["requeue", job_id]  # the clean finish asked for nothing


def test_resume_takes_auto_or_nothing_and_auto_needs_out(capsys):
    from turnctl.cli import run as cli_run
    from turnctl.errors import TurnctlError
    from turnctl.recipe import load_recipe
    from turnctl.rundir import RunDir

    assert cli_run(["train", "--recipe", "tiny", "--out", "x", "--resume", "now"]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(TurnctlError, match=r"--resume auto needs the run to continue: pass --out"):
        RunDir.open(load_recipe("tiny"), resume="auto")
