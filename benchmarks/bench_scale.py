"""A WebVision-scale rehearsal: one TURN epoch end to end over N synthetic samples in 1,000 classes.

Per size N (``--sizes``, default 240000 and 2400000): writes N tiny class-dependent PNGs with 40%
symmetric label noise into train shards of ``--shard-size`` samples with plain ``webdataset.TarWriter``
(a pool of ``--variants`` pre-encoded images per class, bytes reused; the noisy label is the sample's
``cls``), plus ``--val`` / ``--test`` samples (val noised the same way, test clean), indexes every split
with ``turnctl index``, then runs the real CLI on ``--nproc`` ranks:

    deepspeed --num_gpus 2 --master_port P turnctl train --recipe tiny --shards DIR --out RUN --set ...

(feature extraction, the linear probe on rank 0, the per-sample loss pass, the gather of losses, the
per-class GMM, the class-balanced subset, one fine-tuning pass capped at ``finetune.max_steps_per_epoch``
optimizer steps, val/test evaluation, checkpoint). While it runs every rank process (the python
children of the launcher carrying ``--local_rank``), its reader workers and the launcher are polled
every ``--poll`` s: peak VmRSS polled and VmHWM (the kernel's own high-water mark). Recorded per size:
generation and index wall time, the run's ``phase_time_s`` (summary.json), total wall time, disk
sizes of the shards, the feature cache, the selection files and the checkpoints, and the purity /
recall of the kept set against the true labels (kept by this script, not in the shards).

Results are merged into ``--out`` (default benchmarks/results/scale.json) keyed by size (and
``--label``), so sizes can be run in separate invocations; ``--report`` prints the RESULTS.md tables
from it. Generated data lives under data/scale/ (git-ignored) and is removed after each size unless
--keep-data (``--reuse-data`` then runs again on it, e.g. with ``--workers 1``). ``--code-snapshot DIR``
runs a frozen copy of turnctl/ and recipes/ (the checkout may change during a long sequence).
``--trace stack`` (default) has each rank log its RSS with the turnctl frame it is running every 0.5 s
(a ``sitecustomize`` on PYTHONPATH; cheap), summarised as RSS growth per frame in the JSON; ``--trace
malloc`` adds tracemalloc snapshots (10-100x slower on the reader's Python loop: a diagnostic only).
A run is killed if the machine's MemAvailable drops under ``--min-available-mib``.

    DS_ACCELERATOR=cpu nice -n 10 .venv/bin/python benchmarks/bench_scale.py --sizes 240000
    .venv/bin/python benchmarks/bench_scale.py --sizes 24000 --max-steps 5 --out /tmp/scale_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA_ROOT = REPO / "data" / "scale"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def du(path: Path, pattern: str = "**/*") -> int:
    """Bytes of the regular files under ``path`` matching ``pattern`` (0 when absent)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file() and not p.is_symlink())


def code_fingerprint(root: Path) -> str:
    """sha256 over turnctl/**/*.py and recipes/*.yaml under ``root`` (which code a run ran)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(list((root / "turnctl").rglob("*.py")) + list((root / "recipes").glob("*.yaml")))
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def snapshot_code(dest: Path) -> Path:
    """A frozen copy of turnctl/ and recipes/ (other sessions may edit the checkout while a long
    sequence of sizes runs); every run of this invocation then imports turnctl from it."""
    if not (dest / "turnctl").is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "turnctl", tmp / "turnctl", ignore=ignore)
        shutil.copytree(REPO / "recipes", tmp / "recipes", ignore=ignore)
        tmp.rename(dest)
    return dest


# ----------------------------------------------------------------------------------------- data
def image_pool(classes: int, variants: int, side: int, seed: int):
    """``classes x variants`` distinct PNG byte strings: a random per-class prototype (a colour per
    2x2 block) plus per-variant pixel noise, so the class is in the pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    block = max(1, side // 4)
    protos = rng.integers(0, 256, size=(classes, side // block, side // block, 3), dtype=np.int64)
    protos = protos.repeat(block, axis=1).repeat(block, axis=2)
    pool = []
    for c in range(classes):
        row = []
        for _ in range(variants):
            img = np.clip(protos[c] + rng.normal(0, 24, size=protos[c].shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
            row.append(buf.getvalue())
        pool.append(row)
    return pool


def write_split(directory: Path, split: str, n: int, pool, *, classes: int, noise: float, shard_size: int,
                seed: int):
    """``n`` samples of ``split`` in shards ``split-%06d.tar``; returns (true, given) label arrays."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    variants = len(pool[0])
    true = rng.integers(0, classes, size=n)
    var = rng.integers(0, variants, size=n)
    given = true.copy()
    if noise > 0:  # symmetric "include": a fraction `noise` gets a uniform label (may equal the true one)
        flip = rng.random(n) < noise
        given[flip] = rng.integers(0, classes, size=int(flip.sum()))
    for s, start in enumerate(range(0, n, shard_size)):
        with wds.TarWriter(str(directory / f"{split}-{s:06d}.tar")) as sink:
            for i in range(start, min(n, start + shard_size)):
                sink.write({"__key__": f"{split}{i:09d}", "png": pool[true[i]][var[i]], "cls": int(given[i])})
    return true, given


def generate(directory: Path, n: int, args, env) -> dict:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    t0 = time.time()
    pool = image_pool(args.classes, args.variants, args.image, args.seed)
    t_pool = time.time() - t0
    splits = {"train": (n, args.noise, 1), "val": (args.val, args.noise, 2), "test": (args.test, 0.0, 3)}
    labels, gen_s = {}, {}
    for split, (count, noise, off) in splits.items():
        t = time.time()
        labels[split] = write_split(directory, split, count, pool, classes=args.classes, noise=noise,
                                    shard_size=args.shard_size, seed=args.seed + off)
        gen_s[split] = time.time() - t
    np.savez(directory.parent / f"{directory.name}-labels.npz", train_true=labels["train"][0],
             train_given=labels["train"][1])
    realised = float((labels["train"][0] != labels["train"][1]).mean())
    gen_total = time.time() - t0
    index_s = {}
    for split, (count, _, _) in splits.items():
        shards = sorted(directory.glob(f"{split}-*.tar"))
        pattern = str(directory / f"{split}-{{000000..{len(shards) - 1:06d}}}.tar")
        t = time.time()
        subprocess.run(["nice", "-n", "10", str(BIN / "turnctl"), "index", pattern, "--split", split,
                        "--num-classes", str(args.classes), "--json"],
                       check=True, env=env, capture_output=True, text=True, cwd=str(args.code_root))
        index_s[split] = time.time() - t
    return {"generate_s": gen_total, "generate_pool_s": t_pool, "generate_split_s": gen_s,
            "generate_samples_per_s": (n + args.val + args.test) / gen_total,
            "index_s": index_s, "index_s_total": sum(index_s.values()),
            "index_samples_per_s": (n + args.val + args.test) / sum(index_s.values()),
            "realised_train_noise": realised,
            "shards_bytes": du(directory, "*.tar"), "train_shards": len(list(directory.glob("train-*.tar")))}


# ----------------------------------------------------------------------------------------- memory
def _proc_kb(path: str, field: str) -> int:
    """``field``'s kB in a /proc file of ``Name: value kB`` lines (0 when gone or absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _meminfo_kb(field: str) -> int:
    return _proc_kb("/proc/meminfo", field)


def _status_kb(pid: int, field: str) -> int:
    return _proc_kb(f"/proc/{pid}/status", field)


def _rollup_kb(pid: int) -> dict:
    """Pss and private (Private_Clean + Private_Dirty) kB from /proc/<pid>/smaps_rollup: unlike RSS,
    these do not count the pages a forked reader worker shares with its rank twice."""
    out = {"pss_kb": 0, "private_kb": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_kb"] = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    out["private_kb"] += int(line.split()[1])
    except OSError:
        pass
    return out


class Poller(threading.Thread):
    """Every ``every`` s: VmRSS and VmHWM of the launcher, of each rank (by --local_rank) and of the
    ranks' own children (reader workers), and Pss / private memory of the ranks and workers; the max
    of each is kept, and a coarse timeline."""

    def __init__(self, launcher_pid: int, every: float, timeline_every: float = 5.0, guard_mib: int = 2048):
        super().__init__(daemon=True)
        self.guard_kb = guard_mib << 10
        self.pid, self.every, self.timeline_every = launcher_pid, every, timeline_every
        self.stop = threading.Event()
        self.peak = {}  # name -> {"rss_kb": max polled VmRSS, "hwm_kb": last VmHWM seen}
        self.timeline = []
        self.split = {}  # name -> RssAnon / RssFile / RssShmem kB when its RSS peaked
        self.t0 = time.time()
        self.min_available_kb = None
        self.aborted = None

    def _note(self, name: str, pid: int):
        rss, hwm = _status_kb(pid, "VmRSS"), _status_kb(pid, "VmHWM")
        if name != "launcher":  # anonymous (heap) vs file-backed vs shared memory, at the RSS peak
            p0 = self.peak.get(name)
            if p0 is None or rss >= p0["rss_kb"]:
                self.split[name] = {f: _status_kb(pid, f) for f in ("RssAnon", "RssFile", "RssShmem")}
        p = self.peak.setdefault(name, {"rss_kb": 0, "hwm_kb": 0, "pss_kb": 0, "private_kb": 0})
        p["rss_kb"] = max(p["rss_kb"], rss)
        p["hwm_kb"] = max(p["hwm_kb"], hwm)
        if name != "launcher":
            for k, v in _rollup_kb(pid).items():
                p[k] = max(p[k], v)
        return rss

    def run(self):
        import psutil

        last_tl = -1e9
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = root.children(recursive=True)
            except psutil.Error:
                break
            now = {"t": round(time.time() - self.t0, 1)}
            now["launcher"] = self._note("launcher", self.pid)
            ranks = {}  # pid -> local rank, for every process whose argv carries --local_rank
            for p in procs:
                try:
                    cmd, ppid = p.cmdline(), p.ppid()
                except psutil.Error:
                    continue
                rank = next((a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")), None)
                if rank is not None:
                    ranks[p.pid] = (rank, ppid)
            for p in procs:
                if p.pid not in ranks or ranks[p.pid][1] in ranks:
                    continue  # not a rank; or a forked reader worker (same argv), counted below
                rank = ranks[p.pid][0]
                now[f"rank{rank}"] = self._note(f"rank{rank}", p.pid)
                try:
                    kids = p.children(recursive=True)
                except psutil.Error:
                    kids = []
                for k in kids:
                    try:
                        kname = k.name()
                    except psutil.Error:
                        continue
                    # reader workers are python; a JIT build of DeepSpeed's shm op at start-up is not
                    self._note(f"rank{rank}_{'workers' if kname.startswith(('python', 'pt_data')) else 'child_' + kname}", k.pid)
            avail = _meminfo_kb("MemAvailable")
            now["mem_available"] = avail
            self.min_available_kb = avail if self.min_available_kb is None else min(self.min_available_kb, avail)
            if avail and avail < self.guard_kb and self.aborted is None:  # a shared machine: never its OOM killer
                self.aborted = f"MemAvailable {avail >> 10} MiB < {self.guard_kb >> 10} MiB: run killed"
                try:
                    os.killpg(self.pid, 9)
                except OSError:
                    pass
            if now["t"] - last_tl >= self.timeline_every:
                self.timeline.append(now)
                last_tl = now["t"]
            self.stop.wait(self.every)


TRACE_SITECUSTOMIZE = r'''
# Written by benchmarks/bench_scale.py --trace: in each rank (argv holds --local_rank=R) a thread
# samples VmRSS and the main thread's turnctl frames every 0.5 s (cheap), and with --trace malloc
# also tracemalloc's traced memory (numpy arrays and Python objects; torch tensors are not traced)
# with its top lines whenever it has grown by 64 MiB since the last snapshot (slow).
# Lines go to $BENCH_SCALE_TRACE/rankR.jsonl.
import json, os, sys, threading, time, tracemalloc
_r = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--local_rank=")), None)
if _r is not None and os.environ.get("BENCH_SCALE_TRACE"):
    _malloc = os.environ.get("BENCH_SCALE_TRACE_MALLOC") == "1"
    if _malloc:  # 10-100x slower on this reader's Python-heavy decode loop: a diagnostic only
        tracemalloc.start(1)
    _main = threading.main_thread().ident
    _f = open(os.path.join(os.environ["BENCH_SCALE_TRACE"], f"rank{_r}.jsonl"), "w")

    def _rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _stack():
        fr = sys._current_frames().get(_main)
        inner = f"{os.path.basename(fr.f_code.co_filename)}:{fr.f_code.co_name}" if fr else None
        out = []
        while fr is not None and len(out) < 6:
            if "/turnctl/" in fr.f_code.co_filename:
                out.append(f"{fr.f_code.co_filename.split('/turnctl/')[-1]}:{fr.f_code.co_name}:{fr.f_lineno}")
            fr = fr.f_back
        return inner, out

    def _loop():
        t0, last_snap, snaps, k = time.time(), 0, 0, 0
        while True:
            inner, st = _stack()
            rec = {"t": round(time.time() - t0, 2), "rss_kb": _rss(), "inner": inner, "stack": st}
            if _malloc and k % 4 == 0:
                cur, peak = tracemalloc.get_traced_memory()
                rec["traced_kb"], rec["traced_peak_kb"] = cur // 1024, peak // 1024
                if cur - last_snap > (64 << 20) and snaps < 12:
                    snap = tracemalloc.take_snapshot()
                    rec["top"] = [f"{st_.size >> 10} KiB in {st_.count} blocks: {st_.traceback}"
                                  for st_ in snap.statistics("lineno")[:10]]
                    rec["top_traceback"] = [[f"{st_.size >> 10} KiB in {st_.count} blocks"] + st_.traceback.format()
                                            for st_ in snap.statistics("traceback")[:4]]
                    last_snap, snaps = cur, snaps + 1
            _f.write(json.dumps(rec) + "\n")
            _f.flush()
            k += 1
            time.sleep(0.5)

    threading.Thread(target=_loop, daemon=True, name="bench-scale-trace").start()
'''


def trace_summary(trace_dir: Path) -> dict:
    """Per rank: the RSS growth attributed to the turnctl frame running while it happened (sum of
    positive deltas between samples, by the innermost turnctl frame), the traced-memory peak, and
    the tracemalloc snapshots taken."""
    out = {}
    for f in sorted(trace_dir.glob("rank*.jsonl")):
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        grow: dict = {}
        for a, b in zip(recs, recs[1:]):
            d = b["rss_kb"] - a["rss_kb"]
            if d > 0:
                where = (b["stack"] or [b["inner"] or "?"])[0]
                grow[where] = grow.get(where, 0) + d
        top = sorted(grow.items(), key=lambda kv: -kv[1])[:15]
        out[f.stem] = {
            "samples": len(recs), "rss_peak_kb": max((r["rss_kb"] for r in recs), default=0),
            "traced_peak_kb": max((r.get("traced_peak_kb", 0) for r in recs), default=0) or None,
            "rss_growth_by_frame_kb": dict(top),
            "snapshots": [{"t": r["t"], "rss_kb": r["rss_kb"], "traced_kb": r.get("traced_kb"), "stack": r["stack"],
                           "top": r["top"], "top_traceback": r.get("top_traceback")} for r in recs if "top" in r],
            # every 5 s: RSS and the innermost and outermost-but-one turnctl frames (what ran, in which pass)
            "timeline": [{"t": r["t"], "rss_kb": r["rss_kb"], "where": (r["stack"][:1] + r["stack"][-3:-2]) or [r["inner"]]}
                         for r in recs[::10]],
        }
    return out


# ----------------------------------------------------------------------------------------- run
def train(directory: Path, run: Path, n: int, args, env) -> dict:
    if run.exists():
        shutil.rmtree(run)
    shutil.rmtree(directory / ".features", ignore_errors=True)  # every run pays for its extraction
    sets = [f"model.config.image_size={args.image}", f"model.config.patch_size={args.patch}",
            f"data.num_workers={args.workers}", f"probe.epochs={args.probe_epochs}", "finetune.epochs=1",
            f"finetune.max_steps_per_epoch={args.max_steps}", f"features.batch_size={args.features_batch}",
            f"finetune.eval_batch_size={args.features_batch}", f"probe.batch_size={args.probe_batch}",
            "output.progress_every_s=30", "deepspeed.timeout_minutes=240", *args.overrides]
    cmd = ["nice", "-n", str(args.nice), str(BIN / "deepspeed"), "--num_gpus", str(args.nproc),
           "--master_port", str(_free_port()), "turnctl", "train", "--recipe", "tiny", "--shards", str(directory),
           "--out", str(run), "--json"]
    for s in sets:
        cmd += ["--set", s]
    log = run.parent / f"{run.name}.log"
    trace_dir = None
    if args.trace != "none":
        trace_dir = run.parent / f"{run.name}-trace"
        shutil.rmtree(trace_dir, ignore_errors=True)
        trace_dir.mkdir(parents=True)
        (trace_dir / "sitecustomize.py").write_text(TRACE_SITECUSTOMIZE)
        env = dict(env, BENCH_SCALE_TRACE=str(trace_dir), BENCH_SCALE_TRACE_MALLOC="1" if args.trace == "malloc" else "0",
                   PYTHONPATH=os.pathsep.join([str(trace_dir)] + [p for p in [env.get("PYTHONPATH")] if p]))
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=str(args.code_root), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        # `nice` execs deepspeed, so proc.pid is the launcher.
        poller = Poller(proc.pid, args.poll, guard_mib=args.min_available_mib)
        poller.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
            rc = rc if rc else -9
        poller.stop.set()
        poller.join()
    wall = time.time() - t0
    out = {"command": " ".join(cmd), "cwd": str(args.code_root), "overrides": sets, "returncode": rc, "wall_s": wall,
           "log": str(log), "log_tail": log.read_text()[-3000:].splitlines()[-25:],
           "memory_kb": poller.peak, "rss_split_at_peak_kb": poller.split,
           "min_mem_available_kb": poller.min_available_kb, "aborted": poller.aborted,
           "rss_timeline_kb": poller.timeline}
    if trace_dir is not None:
        out["trace"] = trace_summary(trace_dir)
    summary_file = run / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        out["summary_wall_time_s"] = summary.get("wall_time_s")
        out["phase_time_s"] = summary.get("phase_time_s")
        out["selection"] = summary.get("selection")
        out["summary_keys"] = sorted(summary)
        for k in ("test_accuracy", "val_accuracy", "probe"):
            if k in summary:
                out[k] = summary[k]
    feats = directory / ".features"
    out["disk_bytes"] = {
        "shards": du(directory, "*.tar"),
        "feature_cache": du(feats),
        "feature_cache_files": {str(p.relative_to(feats)): p.stat().st_size for p in feats.rglob("*") if p.is_file()},
        "selection_npz": du(run / "selection", "*.npz"),
        "checkpoints": du(run / "checkpoints"),
        "best_final_exports": du(run / "best") + du(run / "final"),
        "run_total": du(run),
    }
    sel = sorted((run / "selection").glob("epoch_*.npz"))
    if sel:
        z = np.load(sel[-1])
        out["selection_arrays"] = {k: [list(z[k].shape), str(z[k].dtype)] for k in z.files}
        lab = np.load(directory.parent / f"{directory.name}-labels.npz")
        clean = lab["train_true"] == lab["train_given"]
        if "idx" in z.files and "selected" in z.files:
            idx = z["idx"]
            sel_mask = z["selected"].astype(bool)
            kept = idx[sel_mask]
            out["kept_quality"] = {"kept": int(kept.size), "n": int(idx.size),
                                   "purity": float(clean[kept].mean()) if kept.size else None,
                                   "true_clean": int(clean.sum())}
            if "clean_prob" in z.files:
                gmm_clean = idx[z["clean_prob"] > args.tau]
                out["kept_quality"].update(
                    gmm_clean=int(gmm_clean.size),
                    gmm_precision=float(clean[gmm_clean].mean()) if gmm_clean.size else None,
                    gmm_recall=float(clean[gmm_clean].sum() / max(1, clean.sum())))
    return out


PHASES = ("extract", "probe", "loss_pass", "select", "finetune", "eval", "checkpoint", "other")


def report(result: dict) -> str:
    """Markdown tables of the runs in a result file (what RESULTS.md shows)."""
    runs = sorted(result.get("runs", {}).items(), key=lambda kv: (kv[1]["n"], kv[0]))
    gib = 1 << 30
    lines = ["| run | train N | wall (s) | " + " | ".join(PHASES) + " | peak RSS rank 0 / 1 (MiB) |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for key, e in runs:
        t = e["train"]
        ph = t.get("phase_time_s") or {}
        rss = e.get("peak_rss_mib", {})  # the poller's max(VmRSS, VmHWM) of each rank process
        r0, r1 = rss.get("rank0"), rss.get("rank1")
        lines.append(f"| {key} | {e['n']:,} | {t['wall_s']:.0f} | " + " | ".join(f"{ph.get(k, 0):.1f}" for k in PHASES)
                     + f" | {r0:,.0f} / {r1:,.0f} |")
    lines += ["", "| train N | generate (s) | index (s) | shards (GiB) | feature cache (MiB) | selection npz (MiB) "
              "| checkpoints (MiB) | kept -> selected | purity of selected | GMM precision / recall |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in runs:
        if "-" in key:
            continue
        d, t = e["data"], e["train"]
        disk, q = t["disk_bytes"], t.get("kept_quality") or {}
        sel = t.get("selection") or {}
        lines.append(f"| {e['n']:,} | {d.get('generate_s', 0):.0f} | {d.get('index_s_total', 0):.0f} | "
                     f"{disk['shards'] / gib:.2f} | {disk['feature_cache'] / 2**20:.1f} | "
                     f"{disk['selection_npz'] / 2**20:.1f} | {disk['checkpoints'] / 2**20:.1f} | "
                     f"{sel.get('kept', '-'):,} -> {sel.get('selected', '-'):,} | {q.get('purity', float('nan')):.3f} | "
                     f"{q.get('gmm_precision', float('nan')):.3f} / {q.get('gmm_recall', float('nan')):.3f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    try:
        import deepspeed  # noqa: F401
        ds = deepspeed.__version__
    except Exception as exc:  # pragma: no cover
        ds = f"unavailable: {exc}"
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "ram_bytes": mem, "torch": torch.__version__, "deepspeed": ds,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="240000,2400000", help="comma-separated train sizes")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.4, help="symmetric label noise on train and val")
    ap.add_argument("--image", type=int, default=8, help="image side in pixels (PNG)")
    ap.add_argument("--patch", type=int, default=4, help="ViT patch size")
    ap.add_argument("--variants", type=int, default=4, help="distinct images per class in the pool")
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--val", type=int, default=10000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers")
    ap.add_argument("--probe-epochs", type=int, default=1)
    ap.add_argument("--probe-batch", type=int, default=1024)
    ap.add_argument("--features-batch", type=int, default=1024)
    ap.add_argument("--max-steps", type=int, default=50, help="finetune.max_steps_per_epoch")
    ap.add_argument("--tau", type=float, default=0.6, help="cleanse.tau (for the GMM precision figure only)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--poll", type=float, default=0.5)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--min-available-mib", type=int, default=2048,
                    help="kill the run when the machine's MemAvailable drops below this (shared machine)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per training run")
    ap.add_argument("--keep-data", action="store_true", help="keep data/scale/<size>/ and the run")
    ap.add_argument("--reuse-data", action="store_true", help="reuse indexed shards of an earlier --keep-data")
    ap.add_argument("--code-snapshot", default="",
                    help="copy turnctl/ and recipes/ here once and run that copy (PYTHONPATH, cwd) instead of the checkout")
    ap.add_argument("--trace", choices=("none", "stack", "malloc"), default="stack",
                    help="stack: sample each rank's VmRSS with the turnctl frame running, every 0.5 s (cheap); "
                         "malloc: also tracemalloc snapshots (a diagnostic: 10-100x slower)")
    ap.add_argument("--label", default="", help="suffix of the result key (e.g. workers1)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--note", default="", help="a sentence kept in the result file (e.g. what else ran)")
    ap.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.out).read_text())))
        return 0

    # progress lines on (output.progress_every_s=30): the log then says when each long phase ran
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TURNCTL_NO_PROGRESS", None)
    gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)

    args.code_root = REPO
    if args.code_snapshot:
        args.code_root = snapshot_code(Path(args.code_snapshot).resolve())
        env["PYTHONPATH"] = str(args.code_root)
    else:
        env.pop("PYTHONPATH", None)

    imported = subprocess.run([sys.executable, "-c", "import turnctl; print(turnctl.__file__)"], env=env,
                              cwd=str(args.code_root), capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update(benchmark="scale", machine=machine(), device="cuda" if gpu else "cpu")
    if args.note:
        result["note"] = args.note
    result.setdefault("runs", {})
    for n in [int(s) for s in args.sizes.split(",") if s]:
        directory = DATA_ROOT / f"shards-{n}"
        run = DATA_ROOT / f"run-{n}{('-' + args.label) if args.label else ''}"
        load0 = os.getloadavg()
        entry = {"n": n, "code_fingerprint": code_fingerprint(args.code_root), "git_head": head,
                 "turnctl_imported_from": imported,
                 "code_snapshot": bool(args.code_snapshot), "classes": args.classes, "noise": args.noise, "image": args.image, "nproc": args.nproc,
                 "workers": args.workers, "max_steps": args.max_steps, "probe_epochs": args.probe_epochs,
                 "features_batch": args.features_batch, "nice": args.nice}
        if args.reuse_data and (directory / "manifest.json").is_file():
            entry["data"] = {**result["runs"].get(str(n), {}).get("data", {}), "reused": True}
        else:
            entry["data"] = generate(directory, n, args, env)
        print(json.dumps({"n": n, "data": entry["data"]}), flush=True)
        entry["train"] = train(directory, run, n, args, env)
        entry["load_average_start"], entry["load_average_end"] = load0, os.getloadavg()
        mem = entry["train"]["memory_kb"]
        entry["peak_rss_mib"] = {k: round(max(v["rss_kb"], v["hwm_kb"]) / 1024, 1) for k, v in mem.items()}
        entry["peak_pss_mib"] = {k: round(v["pss_kb"] / 1024, 1) for k, v in mem.items() if k != "launcher"}
        key = f"{n}{('-' + args.label) if args.label else ''}"
        result["runs"][key] = entry
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"n": n, "rc": entry["train"]["returncode"], "wall_s": entry["train"]["wall_s"],
                          "phase_time_s": entry["train"].get("phase_time_s"), "peak_rss_mib": entry["peak_rss_mib"],
                          "peak_pss_mib": entry["peak_pss_mib"],
                          "disk": {k: v for k, v in entry["train"]["disk_bytes"].items() if k != "feature_cache_files"}}),
              flush=True)
        if not args.keep_data:
            shutil.rmtree(directory, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(run.parent / f"{run.name}-trace", ignore_errors=True)
            (directory.parent / f"{directory.name}-labels.npz").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
