"""Linear-probe throughput on cached features: E_LP epochs of turnctl.probe, against a naive loop.

TURN's step 1 trains nn.Linear(D, C) for E_LP = 20 epochs at batch 128 on pre-extracted features.
At WebVision scale (2.4M x 1024 features, 1000 classes) that is 375k optimizer steps, so the cost
is per-step overhead, not FLOPs. Cases:

    turnctl.probe            train_linear_probe as the trainer calls it (features resident on the
                             device; on CUDA the step is a captured CUDA graph)
    turnctl.probe, eager     the same without the CUDA graph (CUDA only)
    naive torch.optim loop   nn.Linear + torch.optim + a DataLoader-free index loop with .item()
                             per step (what one writes first), one epoch, scaled to E_LP

Features are synthetic (class centres + Gaussian noise, the rates do not depend on the values):
--n 200000 x --dim 1024 on CPU by default, the full 2,400,000 x 1024 x 1000 classes in fp16 when
a GPU is present (CPU runs use 1 torch thread by default: on a shared 2-core machine a second
OpenMP thread makes every small op wait for a descheduled peer). Rates are wall-clock samples/s; on CPU also per CPU-second of the process (robust
to other jobs on a shared machine). Results are merged per device into benchmarks/results/probe.json.

    .venv/bin/python benchmarks/bench_probe.py [--n N] [--dim D] [--classes C] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from turnctl import __version__  # noqa: E402
from turnctl.losses import gce_loss  # noqa: E402
from turnctl.probe import train_linear_probe  # noqa: E402
from turnctl.recipe import LossSection, ProbeSection  # noqa: E402


def synthetic(n: int, dim: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g, device=device)
    centres = torch.randn(classes, dim, generator=g, device=device) * 0.3
    x = torch.empty(n, dim, dtype=dtype, device=device)
    for s in range(0, n, 262144):  # chunks: no fp32 copy of the whole matrix
        e = min(n, s + 262144)
        x[s:e] = (centres[y[s:e]] + torch.randn(e - s, dim, generator=g, device=device)).to(dtype)
    return x, y


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_probe(x, y, classes, probe, dev, cuda_graph):
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_linear_probe(x, y, num_classes=classes, probe=probe, losses=LossSection(), seed=0, device=dev,
                             eval_sets=None, log_every_epoch=False, cuda_graph=cuda_graph)
    sync(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n, epochs = x.shape[0], probe.epochs
    per_epoch = [h["wall_s"] for h in res.history]
    return {
        "epochs": epochs, "total_s": round(wall, 3),
        "median_epoch_s": round(statistics.median(per_epoch), 4),
        "first_epoch_s": round(per_epoch[0], 4),
        "samples_per_s": round(n * epochs / wall),
        "steps_per_s": round(math.ceil(n / probe.batch_size) * epochs / wall),
        "samples_per_cpu_s": round(n * epochs / cpu) if dev.type == "cpu" and cpu > 0 else None,
        "final_train_loss": round(res.history[-1]["train_loss"], 5),
        "cuda_graph": res.cuda_graph,
    }


def run_naive(x, y, classes, probe, dev):
    """One epoch of the straightforward loop; reported scaled to probe.epochs."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=probe.lr, momentum=probe.momentum, weight_decay=probe.weight_decay)
    n, B = x.shape[0], probe.batch_size
    perm = torch.randperm(n, device=dev)
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    total = 0.0
    for s in range(0, n, B):
        rows = perm[s:s + B]
        loss = gce_loss(head(x[rows].float()), y[rows], q=0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()  # the per-step host sync most loops have (progress bars, logging)
    sync(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"epochs_measured": 1, "epoch_s": round(wall, 3),
            f"projected_{probe.epochs}_epochs_s": round(wall * probe.epochs, 2),
            "samples_per_s": round(n / wall),
            "samples_per_cpu_s": round(n / cpu) if dev.type == "cpu" and cpu > 0 else None}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_400_000 if cuda else 200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=1000 if cuda else 100)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16" if cuda else "fp32")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--threads", type=int, default=None if cuda else 1,
                    help="torch CPU threads (CPU default 1: stable numbers on a shared machine)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "probe.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    x, y = synthetic(args.n, args.dim, args.classes, dtype, dev)
    # the paper's ViT-B/16 LP settings: SGD, lr 1e-2, wd 1e-3, GCE q=0.7, cosine, batch 128
    probe = ProbeSection(epochs=args.epochs, loss="gce", optimizer="sgd", lr=1e-2, weight_decay=1e-3,
                         momentum=0.9, batch_size=args.batch_size, schedule="cosine")
    cases = {"turnctl.probe": run_probe(x, y, args.classes, probe, dev, cuda_graph=None)}
    if dev.type == "cuda":
        cases["turnctl.probe, eager (no CUDA graph)"] = run_probe(x, y, args.classes, probe, dev, cuda_graph=False)
    if not args.skip_naive:
        cases["naive torch.optim loop (1 epoch, projected)"] = run_naive(x, y, args.classes, probe, dev)
    if dev.type == "cpu":
        rate = cases["turnctl.probe"]["samples_per_s"]
        cases["turnctl.probe"]["projected_20_epochs_2.4M_s"] = round(2_400_000 * 20 / rate, 1)

    entry = {
        "features": {"n": args.n, "dim": args.dim, "classes": args.classes, "dtype": args.dtype,
                     "kind": "synthetic class centres + Gaussian noise"},
        "probe": {"epochs": args.epochs, "batch_size": args.batch_size, "loss": "gce (q=0.7, literal)",
                  "optimizer": "sgd momentum 0.9, lr 1e-2, wd 1e-3, cosine"},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "cases": cases,
    }
    result = {}
    if args.out.is_file():
        try:
            result = json.loads(args.out.read_text())
        except ValueError:
            result = {}
    result.update({
        "benchmark": "turnctl linear probe (TURN step 1) on cached features",
        "turnctl_version": __version__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "note": "wall-clock on a possibly shared machine; samples_per_cpu_s is per CPU-second of the process. "
                "Results are kept per device type; rerun on a GPU to fill 'cuda'.",
    })
    result.setdefault("results", {})[dev.type] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
