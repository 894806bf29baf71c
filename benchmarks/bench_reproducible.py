"""Is the demo bit-identical run to run? Runs the demo comparison twice and compares everything.

Runs ``deepspeed --num_gpus 2 --module turnctl compare --recipe demo --methods turn,lp-ce,fft-ce``
twice (two CPU ranks, OMP_NUM_THREADS=1 as `make demo` sets it) into two directories, then compares
every metrics line (all keys but wall-clock ones), every TURN selection file and the sha256 of every
exported model. Writes benchmarks/results/reproducible.json. ``--compare A B`` only compares two
directories written by that command (e.g. on another machine or thread count).

    .venv/bin/python benchmarks/bench_reproducible.py                 # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_reproducible.py --compare /tmp/demoA /tmp/demoB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMING_KEYS = {"time", "wall_s", "samples_per_s", "time_split_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, shards: str, env) -> float:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "turnctl",
           "compare", "--recipe", "demo", "--shards", shards, "--methods", "turn,lp-ce,fft-ce", "--out", str(out)]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def _lines(path: Path):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in path.read_text().splitlines()]


def compare(a: Path, b: Path) -> dict:
    out = {"runs": {}, "identical": True}
    for run_a in sorted(p for p in a.iterdir() if p.is_dir()):
        run_b = b / run_a.name
        la, lb = _lines(run_a / "metrics.jsonl"), _lines(run_b / "metrics.jsonl")
        differing = sorted({k for x, y in zip(la, lb) for k in set(x) | set(y) if x.get(k) != y.get(k)})
        sels = sorted((run_a / "selection").glob("*.npz")) if (run_a / "selection").is_dir() else []
        sel_same = all(_same_npz(s, run_b / "selection" / s.name) for s in sels)
        wa, wb = run_a / "final" / "model.safetensors", run_b / "final" / "model.safetensors"
        weights_same = _sha(wa) == _sha(wb)
        same = len(la) == len(lb) and not differing and sel_same and weights_same
        out["runs"][run_a.name] = {"metric_lines": len(la), "differing_keys": differing,
                                   "selections_identical": sel_same, "selections": len(sels),
                                   "final_weights_identical": weights_same, "identical": same}
        out["identical"] &= same
    return out


def _same_npz(x: Path, y: Path) -> bool:
    with np.load(x) as zx, np.load(y) as zy:
        return sorted(zx.files) == sorted(zy.files) and all(np.array_equal(zx[k], zy[k]) for k in zx.files)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/digits-symmetric-0.6")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reproducible.json"))
    args = ap.parse_args(argv)
    env = dict(os.environ, TURNCTL_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    walls = []
    if args.compare:
        a, b = Path(args.compare[0]), Path(args.compare[1])
        result = compare(a, b)
    else:
        if not (Path(args.shards) / "manifest.json").is_file():
            subprocess.run([str(BIN / "turnctl"), "prepare", "digits", "--noise", "symmetric:0.6", "--noise-seed", "0",
                            "--shard-size", "256", "--out", args.shards], check=True, env=env)
        with tempfile.TemporaryDirectory() as tmp:
            a, b = Path(tmp, "a"), Path(tmp, "b")
            walls = [_run(a, args.shards, env), _run(b, args.shards, env)]
            result = compare(a, b)
    payload = {"benchmark": "reproducible", "command": "compare --recipe demo --methods turn,lp-ce,fft-ce",
               "world_size": 2, "omp_num_threads": env["OMP_NUM_THREADS"], "machine": platform.platform(),
               "cpu_count": os.cpu_count(), "wall_s": walls, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"identical": result["identical"]}))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
