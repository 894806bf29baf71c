"""Every method under one protocol (docs/PROTOCOL.md) on digits at 60% and 90% symmetric noise.

For each noise rate: ``turnctl prepare digits --noise symmetric:R`` (its built-in val split gets the
same noise as train: validation labels are as noisy as a user's), then one ``turnctl compare`` over
every method and --seeds on two ranks under the DeepSpeed launcher, with the demo recipe (real ImageNet EfficientNet-Lite0) and the same
step-1 learning-rate search for every feature-space method (``probe.lr_search``, chosen on
validation accuracy). Writes benchmarks/results/protocol.json: per run and per method (mean and
std over seeds) the test accuracy at the val-selected epoch (``best``), after the last epoch
(``last``) and the maximum over epochs (``max_over_epochs``, chosen on test: optimistic), wall
times, and TURN's selection; prints a Markdown table for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_protocol.py                       # ~45 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_protocol.py --noise 0.6 --seeds 0 --methods turn,lp-ce
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
METHODS = ("turn", "turn-nmtune", "lp-ce", "lp-gce", "lp-elr", "lp-dividemix", "lp-unicon", "nmtune",
           "fft-ce", "fft-gce", "fft-elr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_avg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def _prepare(rate: float, root: Path, env) -> Path:
    shards = root / f"digits-symmetric-{rate}"
    if not (shards / "manifest.json").is_file():
        subprocess.run([str(BIN / "turnctl"), "prepare", "digits", "--noise", f"symmetric:{rate}",
                        "--noise-seed", "0", "--shard-size", "256", "--out", str(shards)], check=True, env=env)
    return shards


def _markdown(results: dict) -> str:
    def pct(ms):
        return "-" if ms["mean"] is None else f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"

    out = []
    for rate, res in results.items():
        out.append(f"\n**{float(rate):.0%} symmetric noise** (realised on train: "
                   f"{res['realised_noise_rate']:.1%}; seeds {res['seeds']})\n")
        out.append("| method | best (val-selected) | last | max over epochs* | wall time (s) |")
        out.append("|---|---|---|---|---|")
        for m, row in res["table"].items():
            out.append(f"| {m} | {pct(row['best'])} | {pct(row['last'])} | {pct(row['max_over_epochs'])} "
                       f"| {row['wall_time_s']['mean']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", default="0.6,0.9", help="comma-separated symmetric noise rates")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (the demo's 2)")
    ap.add_argument("--lr-search", default="[0.1,1.0,10.0]", help="probe.lr_search for every method's step 1")
    ap.add_argument("--data", default=str(REPO / "shards"), help="where the prepared digits go")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "protocol.json"))
    ap.add_argument("--work", default=None, help="where the runs and their logs are kept (default: a new temp "
                    "dir); rerunning with the same --work reuses every method already compared there")
    args = ap.parse_args(argv)

    env = dict(os.environ, TURNCTL_NO_PROGRESS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per rank: with two ranks on two cores, more threads only spin against each other
    # (and on a shared machine OpenMP's spinning slows a step down tenfold).
    env.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    t_all = time.time()
    load_before = _load_avg()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_protocol-"))
    failures = []
    for rate in (float(r) for r in args.noise.split(",")):
        shards = _prepare(rate, Path(args.data), env)
        manifest = json.loads((shards / "manifest.json").read_text())
        table, runs, columns = {}, [], None
        t0 = time.time()
        # One compare per method: a method that fails costs its own row only (its log is kept).
        for method in args.methods.split(","):
            out = work / f"{rate}" / method
            cmd = [str(BIN / "deepspeed"), "--num_gpus", str(args.nproc), "--master_port", str(_free_port()),
                   "--module", "turnctl", "compare", "--recipe", args.recipe, "--shards", str(shards),
                   "--methods", method, "--seeds", args.seeds, "--out", str(out), "--json",
                   "--set", f"probe.lr_search={args.lr_search}"]
            for o in args.overrides:
                cmd += ["--set", o]
            out.parent.mkdir(parents=True, exist_ok=True)
            if (out / "compare.json").is_file():  # done by an earlier, interrupted invocation: reuse
                proc = subprocess.CompletedProcess(cmd, 0)
            else:
                if out.exists():  # a half-done compare: start again beside it, deleting nothing
                    out = out.with_name(f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
                with open(out.parent / f"{method}.log", "w") as log_file:
                    proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
            if proc.returncode:
                failures.append({"noise": rate, "method": method, "exit": proc.returncode,
                                 "log": str(out.parent / f"{method}.log")})
                print(f"{rate} {method}: exit {proc.returncode}, see {out.parent / f'{method}.log'}", flush=True)
                continue
            comparison = json.loads((out / "compare.json").read_text())
            columns = comparison["columns"]
            table[method] = comparison["table"][method]
            for r in comparison["runs"]:  # the chosen step-1 learning rate, from each run's summary
                summary = json.loads(Path(r["run_dir"], "summary.json").read_text())
                r["step1_lr"] = summary.get("step1_lr")
                r["run_dir"] = os.path.relpath(r["run_dir"], work)
                runs.append(r)
            print(f"{rate} {method}: best {table[method]['best']} last {table[method]['last']}", flush=True)
        results[str(rate)] = {"shards": str(shards), "seeds": [int(x) for x in args.seeds.split(",")],
                              "realised_noise_rate": manifest["splits"]["train"]["realised_noise_rate"],
                              "table": table, "runs": runs, "columns": columns, "wall_s": time.time() - t0}
        print(_markdown({str(rate): results[str(rate)]}), flush=True)
    payload = {
        "benchmark": "protocol", "recipe": args.recipe, "methods": args.methods.split(","),
        "lr_search": args.lr_search, "overrides": args.overrides, "world_size": args.nproc,
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "load_avg_before": load_before, "load_avg_after": _load_avg(), "wall_s": time.time() - t_all,
        "results": results, "failures": failures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
