"""TURN's whole wall time against plain FFT-CE on the same data, and where TURN's time goes.

Runs ``turnctl compare --methods turn,fft-ce`` (TURN: 20 LP epochs on extracted features + 4 FFT
epochs on the cleansed, balanced subset, per-sample loss passes included; FFT-CE:
``finetune.baseline_epochs`` = 5 epochs on every sample) under the DeepSpeed launcher with --nproc
ranks, --repeats times, the feature cache cleared first (TURN pays for its extraction); with
--cached, TURN runs once more on the features that run cached. Every run's ``phase_time_s``
(summary.json: extract, probe, loss_pass, select, finetune, eval, checkpoint, other) is kept, and
the ratio TURN / FFT-CE is written to benchmarks/results/turn_vs_fft.json (or --out).

Data: the demo's digits at 60% symmetric noise by default; ``--cifar-train N`` instead builds an
ImageFolder of the first N/10 training JPEGs per class (and --cifar-test per class of test) from
../shared/data/cifar10-jpg.tar.gz under data/, prepares it with 60% symmetric noise and a 5% val
hold-out, and runs the demo recipe (EfficientNet-Lite0, 64 px) on it.

    .venv/bin/python benchmarks/bench_turn_vs_fft.py                  # CPU: DS_ACCELERATOR=cpu, 2 ranks
    .venv/bin/python benchmarks/bench_turn_vs_fft.py --cifar-train 20000 --cached --out benchmarks/results/turn_vs_fft_cifar20k.json
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


CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def cifar_subset(train_n: int, test_per_class: int, env) -> Path:
    """Shards of the first train_n/10 CIFAR-10 training JPEGs per class (+ test_per_class of test),
    60% symmetric noise, 5% val hold-out; built once under data/ and shards/."""
    import tarfile

    per_class = train_n // 10
    shards = REPO / "shards" / f"cifar10jpg-{train_n}-symmetric-0.6"
    if (shards / "manifest.json").is_file():
        return shards
    if not CIFAR_TAR.is_file():
        sys.exit(f"{CIFAR_TAR} not found: --cifar-train needs the CIFAR-10 JPEGs")
    root = REPO / "data" / f"cifar10jpg-{train_n}"
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        keep = {"train": per_class, "test": test_per_class}
        with tarfile.open(CIFAR_TAR) as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                split = next((p for p in parts if p in keep), None)
                if m.isfile() and split and int(Path(m.name).stem) < keep[split]:
                    m.name = "/".join(parts[parts.index(split):])
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(root)
    subprocess.run([str(BIN / "turnctl"), "prepare", "imagefolder", "--root", str(root), "--out", str(shards),
                    "--noise", "symmetric:0.6", "--noise-seed", "0", "--val-fraction", "0.05", "--labels-verified",
                    "--shard-size", "1000"], check=True, env=env)
    return shards


def launch(args, env, shards: Path, methods: str, out: str) -> dict:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(args.nproc), "--master_port", str(_free_port()),
           "--module", "turnctl", "compare", "--recipe", args.recipe, "--shards", str(shards),
           "--methods", methods, "--out", out, "--json"]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(proc.returncode)
    res = json.loads(Path(out, "compare.json").read_text())
    runs = {}
    for m in methods.split(","):
        summary = json.loads(next(Path(out).glob(f"{m}-seed*/summary.json")).read_text())
        runs[m] = {"wall_time_s": summary["wall_time_s"], "phase_time_s": summary["phase_time_s"],
                   "test_accuracy_last": res["table"][m]["last"]["mean"],
                   "selected_last_epoch": (summary.get("selection") or {}).get("selected")}
    return {"runs": runs, "launch_s": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--shards", default="shards/digits-symmetric-0.6")
    ap.add_argument("--cifar-train", type=int, default=0, help="build CIFAR-10 JPEG shards of this many train images")
    ap.add_argument("--cifar-test", type=int, default=200, help="test images per class with --cifar-train")
    ap.add_argument("--cached", action="store_true", help="also run TURN on the features the first run cached")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "turn_vs_fft.json"))
    args = ap.parse_args(argv)

    env = dict(os.environ, TURNCTL_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if args.cifar_train:
        shards = cifar_subset(args.cifar_train, args.cifar_test, env)
    else:
        shards = Path(args.shards)
        if not (shards / "manifest.json").is_file():
            if args.shards != "shards/digits-symmetric-0.6":
                sys.exit(f"{shards}/manifest.json not found: prepare the data first")
            subprocess.run([str(BIN / "turnctl"), "prepare", "digits", "--noise", "symmetric:0.6",
                            "--shard-size", "256", "--out", str(shards)], check=True, env=env)
    load_start = os.getloadavg()
    t_all = time.time()
    repeats = []
    for r in range(args.repeats):
        shutil.rmtree(shards / ".features", ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            rep = launch(args, env, shards, "turn,fft-ce", str(Path(tmp, "uncached")))
            if args.cached:
                rep["runs"]["turn_cached"] = launch(args, env, shards, "turn", str(Path(tmp, "cached")))["runs"]["turn"]
        walls = {m: x["wall_time_s"] for m, x in rep["runs"].items()}
        rep.update(repeat=r, ratio=walls["turn"] / walls["fft-ce"])
        if args.cached:
            rep["ratio_cached"] = walls["turn_cached"] / walls["fft-ce"]
        repeats.append(rep)
        print(json.dumps(rep), flush=True)
    methods = list(repeats[0]["runs"])
    result = {
        "benchmark": "turn_vs_fft", "recipe": args.recipe, "shards": str(shards), "nproc": args.nproc,
        "overrides": args.overrides, "device": "cuda" if gpu else "cpu", "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "wall_s": time.time() - t_all, "repeats": repeats,
        "median_wall_time_s": {m: statistics.median(x["runs"][m]["wall_time_s"] for x in repeats) for m in methods},
        "median_phase_time_s": {m: {k: statistics.median(x["runs"][m]["phase_time_s"].get(k, 0.0) for x in repeats)
                                    for k in repeats[0]["runs"][m]["phase_time_s"]} for m in methods},
        "median_ratio_turn_over_fft_ce": statistics.median(x["ratio"] for x in repeats),
        "goal": "ratio <= 0.5 at 60% symmetric noise",
    }
    if args.cached:
        result["median_ratio_turn_cached_over_fft_ce"] = statistics.median(x["ratio_cached"] for x in repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("median")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
