"""examples/slurm/*.sbatch: each script's #SBATCH header and, on CPU, its own command lines.

No Slurm here: the script runs under bash with the variables sbatch gives a job (SLURM_JOB_ID,
SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NTASKS) and stand-ins for ``srun`` (tests/scripts/
fake_srun.py: the step's tasks with srun's task variables) and ``scontrol show hostnames``; one
node, 2 CPU ranks instead of 8 GPUs, the tiny recipe on the toy shards, resolved and agreed on by
both ranks (--dry-run).
"""

import json
import os
import stat
import sys

import pytest

from launch import BIN, REPO, check, cpu_env, free_port, last_json, run

EXAMPLES = REPO / "examples" / "slurm"
SCRIPTS = {"one_node.sbatch": {"--nodes": "1", "--ntasks-per-node": "8", "--gpus-per-node": "8"},
           "multi_node_torchrun.sbatch": {"--ntasks-per-node": "1", "--gpus-per-node": "8"},
           "multi_node_deepspeed.sbatch": {"--ntasks-per-node": "1", "--gpus-per-node": "8"}}


def sbatch_options(path) -> dict:
    """The script's ``#SBATCH`` options, as sbatch reads them (only the header, before any command)."""
    opts = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            opts[key] = value
        elif line.strip() and not line.startswith("#"):
            break
    return opts


def test_every_example_is_listed_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.sbatch")) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_headers_ask_for_the_warning_signal_and_requeue(name):
    opts = sbatch_options(EXAMPLES / name)
    assert opts.get("--signal") == "USR1@120" and "--requeue" in opts
    for key, value in SCRIPTS[name].items():
        assert opts.get(key) == value, (key, opts)


def _slurm_bin(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests' / 'scripts' / 'fake_srun.py'} \"$@\"\n")
    # `scontrol show hostnames LIST`: the one node of this machine
    (bindir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && echo localhost\n")
    for f in bindir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return bindir


@pytest.mark.multirank
@pytest.mark.parametrize("name,tasks", [("one_node.sbatch", "2"), ("multi_node_torchrun.sbatch", "1"),
                                        ("multi_node_deepspeed.sbatch", "1")])
def test_each_script_trains_on_two_cpu_ranks(name, tasks, run_shards, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    env = cpu_env({
        "PATH": f"{_slurm_bin(tmp_path)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": tasks,
        "MASTER_PORT": str(port), "GPUS_PER_NODE": "2", "RECIPE": "tiny", "OUT": str(out),
        # --dry-run: every rank resolves the recipe, joins the process group and agrees with the
        # others, then stops: the rendezvous and the ranks are what a script can get wrong (training
        # under srun, signalled and requeued, is tests/test_slurm.py's cycle)
        "TURNCTL_ARGS": f"--shards {run_shards} --dry-run --json",
    })
    # one_node's 8 tasks are 2 here: its --ntasks-per-node=8 is for sbatch, srun takes SLURM_NTASKS
    res = check(run(["bash", str(EXAMPLES / name)], env=env, timeout=300))
    info = last_json(res.stdout)
    assert info["world_size"] == 2 and sorted(r["rank"] for r in info["ranks"]) == [0, 1]
    assert len({r["pid"] for r in info["ranks"]}) == 2 and info["recipe"]["output"]["dir"] == str(out)
