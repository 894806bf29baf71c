import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CIFAR10_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture
def repo() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _no_shm_left_behind():
    """After each module (its launches have all exited): free what killed ranks left in /dev/shm."""
    yield
    from launch import remove_leftover_shm

    remove_leftover_shm()


@pytest.fixture(autouse=True)
def _clean_dist_env(monkeypatch):
    """In-process tests are a world of one whatever the outer environment says."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)  # (a suite run inside an srun step is not a task of it)
    yield


@pytest.fixture(scope="session")
def run_shards(tmp_path_factory) -> Path:
    """The end-to-end toy dataset (shardgen.write_run_shards), shared by the modules that compare runs."""
    from shardgen import write_run_shards

    return write_run_shards(tmp_path_factory.mktemp("run-shards") / "toy")


@pytest.fixture(scope="session")
def tiny_reference_run(run_shards, tmp_path_factory):
    """One uninterrupted 2-rank ZeRO-2 TURN run of the tiny recipe on ``run_shards``: checked end to
    end by test_turn_e2e, and what every interrupted-and-resumed run in test_faults must equal.
    Returns (run directory, its JSON result)."""
    from launch import RUN_ARGS, check, deepspeed_cmd, last_json, run

    out = tmp_path_factory.mktemp("reference") / "run"
    res = check(run(deepspeed_cmd(["train", *RUN_ARGS, "--shards", str(run_shards), "--out", str(out), "--json"]),
                    timeout=420))
    return out, last_json(res.stdout)


@pytest.fixture(scope="session")
def report_run(tmp_path_factory):
    """(toy shards, run dir) of one real TURN run (LP, then 2 fine-tuning epochs with a selection
    each) that the report tests read: tests/test_report.py and tests/test_report_html.py."""
    from launch import check, run, turnctl_cmd
    from shardgen import report_toy

    base = tmp_path_factory.mktemp("report")
    toy = report_toy(base / "toy")
    out = base / "run"
    check(run(turnctl_cmd(["train", "--recipe", "tiny", "--shards", str(toy.root), "--out", str(out),
                           "--set", "data.num_workers=0"]), timeout=300))
    assert [p.name for p in sorted((out / "selection").iterdir())] == ["epoch_0.npz", "epoch_1.npz"]
    return toy, out
