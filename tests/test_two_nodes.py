"""Two nodes simulated on one machine: two torchrun launchers (one rank each) meeting at a
localhost rendezvous, each "node" with its own HOME, TMPDIR and caches, against one node running
both ranks.

Both ranks have LOCAL_RANK 0 in the two-node job: code that decides "who writes" by local rank
would write every once-written file twice, from two machines at once. tests/scripts/record_writes.py
records every file each rank opens for writing or renames into place.
"""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from launch import REPO, cpu_env, free_port

pytestmark = [pytest.mark.multirank, pytest.mark.faults]

SCRIPT = REPO / "tests" / "scripts" / "record_writes.py"


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    from shardgen import write_run_shards

    return write_run_shards(tmp_path_factory.mktemp("shards") / "toy", seed=1)


def _train_args(shards, out, cache):
    return ["train", "--recipe", "tiny", "--shards", str(shards), "--out", str(out), "--json",
            "--set", "data.num_workers=0", "--set", f"features.cache_dir={cache}"]


def _torchrun(args, *, nnodes, node_rank, nproc, port, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(SCRIPT), *args]
    return subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a launcher hung")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{err[-4000:]}"
    return outs


def _node_env(root: Path, record: Path):
    """What differs between two machines: home, temp and cache directories."""
    for d in ("home", "tmp", "cache"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return cpu_env({"TURNCTL_TEST_RECORD": str(record), "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
                    "XDG_CACHE_HOME": str(root / "cache"), "HF_HOME": str(root / "cache" / "huggingface"),
                    # the JIT-built DeepSpeed ops stay where the test machine built them
                    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")})


def _writes(record: Path):
    """rank -> {(op, path)} and path -> {ranks}."""
    by_rank, writers = {}, defaultdict(set)
    for f in record.glob("writes-rank*.tsv"):
        rank = int(f.stem.rsplit("rank", 1)[1])
        rows = [tuple(line.split("\t", 1)) for line in f.read_text().splitlines()]
        by_rank[rank] = rows
        for _, path in rows:
            writers[path].add(rank)
    return by_rank, writers


@pytest.fixture(scope="module")
def runs(toy_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    results = {}
    # One node, two ranks.
    rec1 = base / "rec-one"
    rec1.mkdir()
    one = _torchrun(_train_args(toy_shards, base / "one", base / "cache-one"), nnodes=1, node_rank=0, nproc=2,
                    port=free_port(), env=_node_env(base / "node-one", rec1))
    (out, _), = _wait([one])
    results["one"] = (base / "one", rec1, out)
    # Two nodes, one rank each, started as two independent launchers.
    rec2 = base / "rec-two"
    rec2.mkdir()
    port = free_port()
    procs = [_torchrun(_train_args(toy_shards, base / "two", base / "cache-two"), nnodes=2, node_rank=k, nproc=1,
                       port=port, env=_node_env(base / f"node{k}", rec2)) for k in (0, 1)]
    outs = _wait(procs)
    results["two"] = (base / "two", rec2, outs[0][0])
    results["base"] = base
    return results


def test_two_nodes_give_the_single_node_result(runs):
    from safetensors.numpy import load_file

    one, two = runs["one"][0], runs["two"][0]
    for e in (0, 1):
        a, b = np.load(one / "selection" / f"epoch_{e}.npz"), np.load(two / "selection" / f"epoch_{e}.npz")
        assert np.array_equal(a["selected"], b["selected"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    ma = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(l["phase"], l["epoch"]) for l in ma] == [(l["phase"], l["epoch"]) for l in mb]
    for la, lb in zip(ma, mb):
        for k in ("train_loss", "loss", "selected", "test_accuracy", "val_accuracy"):
            if k in la:
                assert la[k] == pytest.approx(lb[k], rel=1e-6), k
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The JSON result line comes from global rank 0 only, once.
    assert sum(l.startswith("{") for l in runs["two"][2].splitlines()) == 1


@pytest.mark.parametrize("layout", ["one", "two"])
def test_once_written_files_are_written_by_global_rank_0_only(runs, layout):
    run_dir, record, _ = runs[layout]
    cache = runs["base"] / f"cache-{layout}"
    by_rank, writers = _writes(record)
    assert sorted(by_rank) == [0, 1]
    shared = [p for p, ranks in writers.items() if len(ranks) > 1]
    assert not shared, f"paths written by more than one rank: {shared[:5]}"
    run_prefix, cache_prefix = str(run_dir) + "/", str(cache) + "/"
    # Rank 1 writes only its own ZeRO optimizer shard of each checkpoint into the run directory, and
    # nothing into the feature cache.
    rank1 = sorted(p for _, p in by_rank[1] if p.startswith(run_prefix) or p.startswith(cache_prefix))
    assert rank1 == [str(run_dir / "checkpoints" / f"epoch_{e:04d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
                     for e in (0, 1)], rank1
    replaced = [p for op, p in by_rank[0] if op == "replace"]
    features = [p for p in replaced if p.startswith(cache_prefix)]
    assert sorted(Path(p).name for p in features) == ["test.safetensors", "train.safetensors", "val.safetensors"]
    for e in (0, 1):
        assert replaced.count(str(run_dir / "selection" / f"epoch_{e}.npz")) == 1
    assert replaced.count(str(run_dir / "summary.json")) == 1
    assert replaced.count(str(run_dir / "final")) == 1


def test_node_local_directories_stay_on_their_node(runs):
    base = runs["base"]
    by_rank, _ = _writes(runs["two"][1])
    for rank in (0, 1):
        other = str(base / f"node{1 - rank}") + "/"
        assert not [p for _, p in by_rank[rank] if p.startswith(other)], f"rank {rank} wrote on the other node"
