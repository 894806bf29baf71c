"""TURN's whole wall time against plain FFT-CE on the same data, measured in one launch.

Runs ``turnctl compare --methods turn,fft-ce`` (TURN: 20 LP epochs on cached features + 4 FFT epochs
on the cleansed, balanced subset, per-sample loss passes included; FFT-CE: ``finetune.baseline_epochs``
= 5 epochs on every sample) under the DeepSpeed launcher with --nproc ranks, on prepared shards
(default: digits with 60% symmetric noise, the demo recipe's real EfficientNet-Lite0), --repeats
times, and writes the per-run wall times, their medians and the ratio TURN / FFT-CE (goal <= 0.5x:
TURN trains on a subset) to benchmarks/results/turn_vs_fft.json. Each repeat clears the feature
cache first, so TURN pays for its feature extraction every time.

    .venv/bin/python benchmarks/bench_turn_vs_fft.py                  # CPU: DS_ACCELERATOR=cpu, 2 ranks
    .venv/bin/python benchmarks/bench_turn_vs_fft.py --recipe vit_b16 --shards shards/cifar100-symmetric-0.6 --nproc 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--shards", default="shards/digits-symmetric-0.6")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "turn_vs_fft.json"))
    args = ap.parse_args(argv)

    env = dict(os.environ, TURNCTL_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        if args.shards != "shards/digits-symmetric-0.6":
            sys.exit(f"{shards}/manifest.json not found: prepare the data first")
        subprocess.run([str(BIN / "turnctl"), "prepare", "digits", "--noise", "symmetric:0.6",
                        "--shard-size", "256", "--out", str(shards)], check=True, env=env)
    runs = []
    for r in range(args.repeats):
        shutil.rmtree(shards / ".features", ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(BIN / "deepspeed"), "--num_gpus", str(args.nproc), "--master_port", str(_free_port()),
                   "--module", "turnctl", "compare", "--recipe", args.recipe, "--shards", str(shards),
                   "--methods", "turn,fft-ce", "--out", tmp, "--json"]
            for o in args.overrides:
                cmd += ["--set", o]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            res = json.loads(Path(tmp, "compare.json").read_text())
        walls = {m: res["table"][m]["wall_time_s"]["mean"] for m in ("turn", "fft-ce")}
        accs = {m: res["table"][m]["last"]["mean"] for m in ("turn", "fft-ce")}
        runs.append({"repeat": r, "wall_time_s": walls, "ratio": walls["turn"] / walls["fft-ce"],
                     "test_accuracy_last": accs, "launch_s": time.time() - t0})
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "turn_vs_fft", "recipe": args.recipe, "shards": str(shards), "nproc": args.nproc,
        "overrides": args.overrides, "device": "cuda" if gpu else "cpu", "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "runs": runs,
        "median_wall_time_s": {m: statistics.median(x["wall_time_s"][m] for x in runs) for m in ("turn", "fft-ce")},
        "median_ratio_turn_over_fft_ce": statistics.median(x["ratio"] for x in runs),
        "goal": "ratio <= 0.5 at 60% symmetric noise",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median_ratio_turn_over_fft_ce": result["median_ratio_turn_over_fft_ce"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
