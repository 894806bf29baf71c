"""Which wrong labels are found: TURN's GMM flags vs cleanlab on turnctl's out-of-sample pred_probs.

Per noise setting (``--noise``, default the demo's ``symmetric:0.6`` and ``symmetric:0.3``): the demo
data (scikit-learn's digits, ``turnctl prepare digits --noise SPEC --noise-seed 0 --shard-size 256``;
the demo's own ``shards/digits-symmetric-0.6`` when it exists, else prepared under
data/bench_cleanlab/), one TURN run of the demo recipe (real ImageNet EfficientNet-Lite0, one process:
``turnctl train --recipe demo``), then the real CLI ``turnctl report RUN --pred-probs --json`` and
``--epoch 0``. The shards keep the true labels (``clean.cls``), so every flagged set is scored:

    turn_epoch0   the GMM's flags at the first selection (losses of the step-1 probe's model)
    turn_last     the report's flagged set (the last fine-tuning epoch's selection)
    cleanlab_*    cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=...) on the
                  report's pred_probs.npy (5-fold probe on the cached features, the run's probe
                  settings): prune_by_noise_rate (cleanlab's default), both, confident_learning

precision = real issues among the flagged / flagged, recall = real issues flagged / real issues, over
the samples both see (decodable, not held out; the demo holds none out). Writes
benchmarks/results/cleanlab.json.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_cleanlab.py
    .venv/bin/python benchmarks/bench_cleanlab.py --noise symmetric:0.6 --run runs/demo/turn-seed0 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK = REPO / "data" / "bench_cleanlab"
DEMO_SHARDS = REPO / "shards" / "digits-symmetric-0.6"
FILTERS = ("prune_by_noise_rate", "both", "confident_learning")


def _cli(args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run([str(BIN / "turnctl"), *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        sys.exit(f"turnctl {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def scores(flagged: np.ndarray, real: np.ndarray) -> dict:
    tp = int((flagged & real).sum())
    nf, nr = int(flagged.sum()), int(real.sum())
    p = tp / nf if nf else None
    r = tp / nr if nr else None
    f1 = 2 * p * r / (p + r) if p and r else None
    return {"flagged": nf, "true_positives": tp, "precision": p, "recall": r, "f1": f1}


def shards_for(spec: str) -> Path:
    if spec == "symmetric:0.6" and (DEMO_SHARDS / "manifest.json").is_file():
        return DEMO_SHARDS
    out = WORK / ("digits-" + spec.replace(":", "-"))
    if not (out / "manifest.json").is_file():
        _cli(["prepare", "digits", "--noise", spec, "--noise-seed", "0", "--shard-size", "256", "--out", str(out),
              *(["--overwrite"] if out.exists() else [])])
    return out


def bench_one(spec: str, run_dir: Path | None) -> dict:
    from cleanlab.filter import find_label_issues

    from turnctl.report import load_selection

    shards = shards_for(spec)
    t = {}
    if run_dir is None:
        run_dir = WORK / ("run-" + spec.replace(":", "-"))
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        _cli(["train", "--recipe", "demo", "--shards", str(shards), "--out", str(run_dir)])
        t["turn_run_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = _last_json(_cli(["report", str(run_dir), "--shards", str(shards), "--pred-probs", "--top", "0",
                              "--json"]).stdout)
    t["report_with_pred_probs_s"] = time.perf_counter() - t0
    first = _last_json(_cli(["report", str(run_dir), "--shards", str(shards), "--epoch", "0", "--top", "0",
                             "--json"]).stdout)
    # The last report written is epoch 0's CSVs; rewrite the last epoch's so the run's report/ is the default one.
    _cli(["report", str(run_dir), "--shards", str(shards), "--top", "0"])

    rep = run_dir / "report"
    pred_probs, labels, idx = (np.load(rep / f"{n}.npy", allow_pickle=False) for n in ("pred_probs", "labels", "idx"))
    sel = load_selection(run_dir, shards=shards)  # the last epoch; true labels from the shards via the run
    pos = np.searchsorted(sel.idx, idx)
    assert np.array_equal(sel.idx[pos], idx)
    true = sel.clean[pos]
    assert (true >= 0).all(), "the digits shards know every true label"
    real = labels != true
    sel0 = load_selection(run_dir, epoch=0, shards=shards)
    out = {
        "noise": spec, "shards": str(shards.relative_to(REPO) if shards.is_relative_to(REPO) else shards),
        "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
        "rows": int(idx.size), "real_issues": int(real.sum()), "true_noise_rate": float(real.mean()),
        "pred_probs": {k: report["pred_probs"][k] for k in ("folds", "seed", "probe", "excluded_undecodable",
                                                             "excluded_held_out")},
        "pred_probs_accuracy_vs_true": float((pred_probs.argmax(1) == true).mean()),
        "pred_probs_accuracy_vs_given": float((pred_probs.argmax(1) == labels).mean()),
        "flags": {}, "time_s": t, "turn_test_accuracy": None,
    }
    try:
        out["turn_test_accuracy"] = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    except (OSError, KeyError, ValueError):
        pass
    out["flags"]["turn_epoch0"] = scores(sel0.flagged[np.searchsorted(sel0.idx, idx)], real)
    turn_last = sel.flagged[pos]
    out["flags"]["turn_last"] = scores(turn_last, real)
    # The report's own figures, for the record: they must be the same numbers.
    q = report["quality"]
    assert (q["flagged"], q["true_positives"]) == (out["flags"]["turn_last"]["flagged"],
                                                   out["flags"]["turn_last"]["true_positives"]), q
    assert first["quality"]["true_positives"] == out["flags"]["turn_epoch0"]["true_positives"]
    for f in FILTERS:
        t0 = time.perf_counter()
        flags = find_label_issues(labels, pred_probs, filter_by=f)
        out["flags"][f"cleanlab_{f}"] = {**scores(flags, real), "time_s": time.perf_counter() - t0}
        if f == FILTERS[0]:
            out["agreement_turn_last_vs_cleanlab_default"] = {
                "both_flag": int((flags & turn_last).sum()), "only_turn": int((turn_last & ~flags).sum()),
                "only_cleanlab": int((flags & ~turn_last).sum()),
                "union": scores(flags | turn_last, real), "intersection": scores(flags & turn_last, real)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", default="symmetric:0.6,symmetric:0.3", help="comma-separated noise specs")
    ap.add_argument("--run", type=Path, default=None, help="an existing TURN run of the (one) noise spec")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cleanlab.json")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import cleanlab
    import torch

    from turnctl import __version__

    specs = [s for s in args.noise.split(",") if s]
    if args.run is not None and len(specs) != 1:
        sys.exit("--run goes with a single --noise")
    results = [bench_one(s, args.run) for s in specs]
    doc = {
        "benchmark": "bench_cleanlab",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "cleanlab": cleanlab.__version__, "turnctl": __version__,
                    "loadavg_end": os.getloadavg()},
        "recipe": "demo (EfficientNet-Lite0, 64 px, probe: GCE, SGD, 20 epochs; 4 TURN epochs), one process",
        "results": results,
    }
    for r in results:
        print(f"{r['noise']}: {r['rows']} rows, {r['real_issues']} real issues "
              f"(OOF probe accuracy vs true labels {r['pred_probs_accuracy_vs_true']:.3f})")
        for name, s in r["flags"].items():
            print(f"  {name:32s} flagged {s['flagged']:5d}  precision {s['precision'] or 0:.3f}  "
                  f"recall {s['recall'] or 0:.3f}  f1 {s['f1'] or 0:.3f}")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
