"""Feature pre-extraction: exact-once across ranks, gathered to rank 0, cached and never misused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import check, deepspeed_cmd, last_json, run, turnctl_cmd
from turnctl.distributed import check_coverage
from turnctl.errors import DistributedError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from shardgen import write_toy_shards

    out = tmp_path_factory.mktemp("feat") / "toy"
    # 3 shards of 23/23/19 = 65 samples: neither 2 ranks nor the batch size divide it.
    toy = write_toy_shards(out, counts={"train": [23, 23, 19], "test": [17]}, num_classes=3, image_size=16,
                           seed=1, noise_rate=0.3)
    toy.path = out
    return toy


def _lp(toy, out, *extra, launcher=True):
    shards = getattr(toy, 'path', toy)
    args = ["train", "--recipe", "tiny", "--method", "lp-gce", "--shards", str(shards), "--out", str(out),
            "--json", "--set", "data.num_workers=0", "--set", "features.batch_size=8", *extra]
    cmd = deepspeed_cmd(args) if launcher else turnctl_cmd(args)
    return last_json(check(run(cmd, timeout=300)).stdout)


def _cache_files(shards):
    return sorted(Path(shards, ".features").glob("*/train.safetensors"))


@pytest.mark.multirank
def test_two_ranks_extract_each_idx_once_then_hit_the_cache(toy, tmp_path):
    from safetensors.torch import load_file

    first = _lp(toy, tmp_path / "a")
    assert first["feature_cache"] == {"train": "miss", "test": "miss"}
    files = _cache_files(toy.path)
    assert len(files) == 1
    cached = load_file(str(files[0]))
    assert cached["features"].shape == (65, 32) and cached["features"].dtype == torch.float16
    # Labels arrive in idx order, each idx once: they equal the manifest's given labels by idx.
    given = toy.labels["train"]["cls"]
    assert np.array_equal(cached["labels"].numpy(), given)
    mtime = files[0].stat().st_mtime_ns

    second = _lp(toy, tmp_path / "b")
    assert second["feature_cache"] == {"train": "hit", "test": "hit"}
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten
    assert second["test_accuracy"]["last"] == pytest.approx(first["test_accuracy"]["last"])

    # A single process extracts the same features (exact-once does not depend on the world size).
    single = _lp(toy, tmp_path / "c", "--set", "features.cache_dir=" + str(tmp_path / "cache1"), launcher=False)
    assert single["feature_cache"]["train"] == "miss"
    one = load_file(str(next((tmp_path / "cache1").glob("*/train.safetensors"))))
    torch.testing.assert_close(one["features"].float(), cached["features"].float(), atol=2e-3, rtol=2e-3)


def test_other_backbone_never_reuses_the_cache(toy, tmp_path):
    cache = tmp_path / "cache"
    base = ["--set", f"features.cache_dir={cache}"]
    assert _lp(toy, tmp_path / "a", *base, launcher=False)["feature_cache"]["train"] == "miss"
    other = _lp(toy, tmp_path / "b", *base, "--set", "model.config.hidden_size=48", launcher=False)
    assert other["feature_cache"]["train"] == "miss"
    assert len(list(cache.glob("*/train.safetensors"))) == 2
    resized = _lp(toy, tmp_path / "c", *base, "--set", "model.image_size=24", launcher=False)
    assert resized["feature_cache"]["train"] == "miss"
    assert _lp(toy, tmp_path / "d", *base, launcher=False)["feature_cache"]["train"] == "hit"


def test_lp_methods_report_test_accuracy(toy, tmp_path):
    for method in ("lp-ce", "lp-elr"):
        res = last_json(check(run(turnctl_cmd([
            "train", "--recipe", "tiny", "--method", method, "--shards", str(toy.path), "--out", str(tmp_path / method),
            "--json", "--set", "data.num_workers=0"]), timeout=200)).stdout)
        assert res["method"] == method
        assert 0.0 <= res["test_accuracy"]["last"] <= 1.0
        lines = [json.loads(l) for l in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert [l["epoch"] for l in lines] == [1, 2, 3, 4, 5] and all(l["phase"] == "lp" for l in lines)
        assert (tmp_path / method / "final" / "turnctl.json").is_file()


@pytest.mark.parametrize("idx,match", [
    ([0, 1, 1, 3], r"1 duplicated \(first idx 1\), 1 missing \(first idx 2\)"),
    ([0, 1, 2], r"1 missing \(first idx 3\)"),
    ([0, 1, 2, 3, 4], r"idx 4 is outside \[0, 4\)"),
])
def test_coverage_check_names_the_problem(idx, match):
    with pytest.raises(DistributedError, match=match):
        check_coverage(np.array(idx), 4, "test")
    check_coverage(np.array([3, 1, 0, 2]), 4, "test")


def test_run_on_main_single_process():
    from turnctl.distributed import run_on_main

    assert run_on_main(lambda: {"a": 1}, what="x") == {"a": 1}
    with pytest.raises(ZeroDivisionError):
        run_on_main(lambda: 1 / 0, what="x")


@pytest.mark.multirank
def test_a_failure_on_rank0_stops_every_rank_at_once():
    import sys

    from launch import REPO, free_port

    script = REPO / "tests" / "scripts" / "fail_on_main.py"
    res = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script)], timeout=90)  # the process-group timeout is 10 min
    assert "rank 0: own error: the probe exploded" in res.stdout
    assert "rank 1: rank 0 failed during the test step: ValueError: the probe exploded" in res.stdout
    assert res.stdout.count("value [1, 2, 3]") == 2  # the group is still usable afterwards
