"""TURN's selection step: vectorised `select_clean` against the per-class scikit-learn loop.

Data: --n synthetic per-sample losses over --classes classes, shaped like a noisy web dataset
(WebVision: 2.4M samples, 1,000 classes): class sizes log-normal (imbalanced), per-class noise rate
U(0.1, 0.6), clean losses ~ Gamma(2, U(0.05, 0.3)), noisy losses ~ |Normal(U(1.5, 4.5), U(0.3, 1.2))|,
so every class is a two-mode mixture with its own shape. Both sides use the lineage settings
(GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4) on globally min-max normalised losses,
tau=0.6) and produce clean_prob and keep for every sample.

Measured (median of --vec-runs / --runs after one untimed-in-the-median first call; wall-clock and
process CPU seconds; the first call's time is reported separately):
    select_clean              turnctl.cleanse.select_clean (torch, float64, all classes at once)
    sklearn loop              turnctl.cleanse.fit_reference_sklearn: one GaussianMixture per class,
                              run r with random_state=r (its KMeans initialisation is seeded)
Agreement: fraction of identical keep/drop decisions between select_clean and the sklearn loop with
random_state=0, and, as the yardstick, between two sklearn loops that differ only in their seed.

Threads: each count in --threads (default "1,<torch's default>") is measured separately; it sets
torch's intra-op threads AND caps scikit-learn's OpenMP/BLAS pools (threadpoolctl), so both sides
get the same cores. On a shared machine OpenMP threads that get preempted make every parallel op
wait for them, so one thread can be faster there. Load averages before and after each
configuration are recorded: other jobs on the machine inflate wall times.

    .venv/bin/python benchmarks/bench_select.py                       # 2.4M x 1000, writes results
    .venv/bin/python benchmarks/bench_select.py --n 200000 --classes 100 --runs 2 --threads 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from turnctl import __version__  # noqa: E402
from turnctl.cleanse import fit_reference_sklearn, select_clean  # noqa: E402

SETTINGS = dict(tau=0.6, max_iter=10, tol=1e-2, reg_covar=5e-4, normalize="minmax")


def synthetic_losses(n: int, classes: int, seed: int = 0):
    """Per-class two-mode losses (see the module docstring), shuffled; returns (losses, labels)."""
    rng = np.random.default_rng(seed)
    share = rng.lognormal(0.0, 0.5, classes)
    sizes = np.maximum(2, np.floor(share / share.sum() * n)).astype(np.int64)
    deficit = n - int(sizes.sum())  # flooring loses < 1 per class: top up to exactly n
    if deficit > 0:
        sizes[:deficit] += 1
    labels = np.repeat(np.arange(classes), sizes)
    noise = rng.uniform(0.1, 0.6, classes)[labels]
    noisy = rng.random(labels.size) < noise
    scale = rng.uniform(0.05, 0.3, classes)[labels]
    mu, sd = rng.uniform(1.5, 4.5, classes)[labels], rng.uniform(0.3, 1.2, classes)[labels]
    losses = np.where(noisy, np.abs(rng.normal(mu, sd)), rng.gamma(2.0, scale))
    perm = rng.permutation(labels.size)
    return losses[perm], labels[perm]


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_config(threads: int, runs: int, vec_runs: int, losses, labels, C: int) -> dict:
    """Median-of-runs timings of both sides with ``threads`` threads; keeps the results for agreement."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    print(f"-- {threads} thread(s), load avg {load_before:.2f}", flush=True)
    # The first full-size call in a process also pays for the allocator growing its heap (page
    # faults on fresh memory); a trainer calls select_clean every epoch, so runs after it count.
    _, first_wall, first_cpu = timed(lambda: select_clean(losses, labels, num_classes=C, **SETTINGS))
    print(f"  select_clean first call: {first_wall:.3f} s wall, {first_cpu:.3f} s CPU", flush=True)
    vec_wall, vec_cpu, vecs = [], [], []
    for r in range(vec_runs):
        vec, wall, cpu = timed(lambda: select_clean(losses, labels, num_classes=C, **SETTINGS))
        vec_wall.append(wall)
        vec_cpu.append(cpu)
        vecs.append(vec)
        print(f"  select_clean run {r}: {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)
    sk_wall, sk_cpu, refs = [], [], []
    with threadpool_limits(limits=threads):
        for r in range(runs):
            ref, wall, cpu = timed(lambda: fit_reference_sklearn(losses, labels, num_classes=C,
                                                                 random_state=r, **SETTINGS))
            sk_wall.append(wall)
            sk_cpu.append(cpu)
            refs.append(ref)
            print(f"  sklearn loop run {r} (random_state={r}): {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    med = statistics.median
    return {
        "threads": threads,
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "select_clean": {"first_call_wall_s": round(first_wall, 3), "first_call_cpu_s": round(first_cpu, 3),
                         "wall_s": [round(t, 3) for t in vec_wall], "cpu_s": [round(t, 3) for t in vec_cpu],
                         "median_wall_s": round(med(vec_wall), 3), "median_cpu_s": round(med(vec_cpu), 3)},
        "sklearn_loop": {"wall_s": [round(t, 2) for t in sk_wall], "cpu_s": [round(t, 2) for t in sk_cpu],
                         "median_wall_s": round(med(sk_wall), 2), "median_cpu_s": round(med(sk_cpu), 2),
                         "random_states": list(range(runs))},
        "speedup_wall": round(med(sk_wall) / med(vec_wall), 1),
        "speedup_cpu": round(med(sk_cpu) / med(vec_cpu), 1),
        "_vec": vecs[0], "_refs": refs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_400_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each side (median reported)")
    ap.add_argument("--vec-runs", type=int, default=5, help="timed runs of select_clean (it is cheap)")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                    help="comma-separated thread counts to measure (torch intra-op threads and "
                         "scikit-learn thread-pool cap); default: 1 and torch's default")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "select.json"))
    ap.add_argument("--no-write", action="store_true", help="print only (quick runs)")
    args = ap.parse_args()
    thread_counts = sorted({int(t) for t in args.threads.split(",")})

    losses, labels = synthetic_losses(args.n, args.classes)
    C = args.classes
    print(f"{losses.size:,} losses, {C} classes, {os.cpu_count()} CPUs", flush=True)
    configs = [run_config(t, args.runs, args.vec_runs, losses, labels, C) for t in thread_counts]

    vec, refs = configs[0]["_vec"], configs[0]["_refs"]
    ref0 = refs[0]
    diff = np.abs(vec.clean_prob - ref0.clean_prob)
    agreement = {
        "identical_keep_decisions": float((vec.keep == ref0.keep).mean()),
        "differing_samples": int((vec.keep != ref0.keep).sum()),
        "clean_prob_max_abs_diff": float(diff.max()),
        "clean_prob_mean_abs_diff": float(diff.mean()),
        "classes_same_n_iter": float((vec.n_iter == ref0.n_iter).mean()),
        "sklearn_vs_sklearn_other_seed": [float((ref0.keep == r.keep).mean()) for r in refs[1:]],
        "select_clean_identical_across_thread_counts": all(
            np.array_equal(vec.clean_prob, c["_vec"].clean_prob) for c in configs[1:]),
    }
    for c in configs:
        del c["_vec"], c["_refs"]
    result = {
        "benchmark": "select_clean vs per-class scikit-learn GaussianMixture loop",
        "turnctl_version": __version__,
        "data": {"samples": int(losses.size), "classes": C, "generator": "bench_select.synthetic_losses(seed=0)",
                 "class_size_min": int(np.bincount(labels).min()), "class_size_max": int(np.bincount(labels).max()),
                 "kept_fraction": float(vec.keep.mean())},
        "settings": SETTINGS,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "sklearn": sklearn.__version__},
        "note": ("wall-clock medians on a shared machine (see the load averages); cpu_s is the process CPU time, "
                 "which for one thread is robust to other jobs; with several threads, OpenMP threads waiting for "
                 "preempted siblings inflate both"),
        "configs": configs,
        "agreement": agreement,
        "n_iter_histogram": np.bincount(vec.n_iter, minlength=SETTINGS["max_iter"] + 1).tolist(),
    }
    print(json.dumps(agreement, indent=1))
    for c in configs:
        print(f"{c['threads']} thread(s): select_clean {c['select_clean']['median_wall_s']:.3f} s vs sklearn loop "
              f"{c['sklearn_loop']['median_wall_s']:.2f} s wall -> {c['speedup_wall']}x "
              f"(CPU time {c['speedup_cpu']}x); load avg {c['loadavg_1min_before']} -> {c['loadavg_1min_after']}")
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
