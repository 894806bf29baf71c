"""Every launch form users type, for real, with two CPU ranks (DS_ACCELERATOR=cpu, gloo).

`train --dry-run --json` under a launcher all-gathers (rank, pid, recipe digest) from every rank and
rank 0 reports the gathered list: two distinct processes that resolved the same recipe.
"""

import sys
import tempfile
from pathlib import Path

import pytest

from launch import REPO, check, cpu_env, deepspeed_cmd, last_json, run, torchrun_cmd, turnctl_cmd

DRY = ["train", "--recipe", "tiny", "--dry-run", "--json"]


def _assert_two_ranks_agreed(result):
    payload = last_json(result.stdout)
    assert payload["world_size"] == 2
    ranks = payload["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert {r["recipe_digest"] for r in ranks} == {payload["recipe_digest"]}
    # Results are printed once (rank 0), not once per rank.
    assert result.stdout.count('"recipe_digest"') == 1 + 2
    return payload


@pytest.mark.multirank
def test_deepspeed_turnctl_from_repo_root_as_written():
    # The launcher runs `python -u turnctl --local_rank=N train ...`: the *directory* turnctl/.
    cmd = deepspeed_cmd(DRY)
    _assert_two_ranks_agreed(check(run(cmd, cwd=REPO, timeout=240)))
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm, i.e. memory) are gone once the
    # ranks exit; DeepSpeed itself never unlinks them.
    import glob
    import os

    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


@pytest.mark.multirank
def test_deepspeed_module_from_another_directory():
    with tempfile.TemporaryDirectory() as d:
        _assert_two_ranks_agreed(check(run(deepspeed_cmd(DRY, module=True), cwd=Path(d), timeout=240)))


@pytest.mark.multirank
def test_torchrun_module():
    with tempfile.TemporaryDirectory() as d:
        _assert_two_ranks_agreed(check(run(torchrun_cmd(DRY), cwd=Path(d), timeout=240)))


def test_plain_single_process():
    with tempfile.TemporaryDirectory() as d:
        payload = last_json(check(run(turnctl_cmd(DRY), cwd=Path(d), timeout=120)).stdout)
    assert payload["world_size"] == 1 and payload["ranks"] is None


def test_directory_form_help_without_pythonpath():
    env = cpu_env()
    result = check(run([sys.executable, "-u", "turnctl", "--local_rank=0", "train", "--help"], cwd=REPO, env=env, timeout=120))
    assert "--recipe" in result.stdout


def test_module_form_help_from_tmp():
    with tempfile.TemporaryDirectory() as d:
        result = check(run([sys.executable, "-m", "turnctl", "--local_rank=1", "train", "--help"], cwd=Path(d), timeout=120))
    assert "--dry-run" in result.stdout


def test_no_module_inside_the_package_shadows_the_stdlib():
    # deepspeed turnctl puts turnctl/ itself on sys.path[0]: a turnctl/select.py would replace `select`.
    names = {p.stem for p in (REPO / "turnctl").glob("*.py")} | {
        p.name for p in (REPO / "turnctl").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    reserved = set(sys.stdlib_module_names) | {"torch", "deepspeed", "transformers", "webdataset",
                                               "datasets", "click", "rich", "numpy", "yaml", "PIL"}
    assert not (names & reserved), names & reserved


@pytest.mark.multirank
def test_ranks_fail_together_on_a_bad_recipe():
    result = run(deepspeed_cmd(["train", "--recipe", "tiny", "--dry-run", "--set", "finetune.lrr=1"]),
                 cwd=REPO, timeout=240)
    assert result.returncode != 0
    assert "unknown key 'finetune.lrr'" in result.stderr
