"""turnctl's training and per-sample passes against plain PyTorch on the same model, data and threads.

Every row runs the same model, image size, global batch, precision (fp32 on CPU) and thread budget
(--threads in all: one rank gets them all, two ranks get half each), over the same training split:

  a. the limit: a plain PyTorch loop (forward, cross-entropy, backward, gradient clipping as the
     recipe sets it, AdamW step) on batches already in memory, through the same Backbone (so with
     model.memory_format=auto: channels_last for EfficientNet); a0 is the same with NCHW batches;
  b. the same loop fed by turnctl's train_loader (a - b = the reader's share; the reader alone is
     timed too);
  c. turnctl fine-tuning, FineTuner.train_epoch: one rank in this process (a world of one), and
     two ranks under the real launcher (``deepspeed --num_gpus 2``, DS_ACCELERATOR=cpu), each with
     its time split (data wait, forward, backward, step, bookkeeping); and the two ranks again with
     all --threads each (oversubscribed: what an unset OMP_NUM_THREADS used to give);
  d. FineTuner.per_sample_losses and turnctl.features.extract_features (no cache) against the
     pure no-grad forward (logits, resp. pooled features) on the same images, resident.

samples/s is wall-clock; samples per CPU-second counts the CPU time of every process doing the work
(getrusage of the process and its reaped children; the two ranks each measure their own and sum).
Medians of --repeats, run interleaved (repeat r of every in-process row before repeat r+1 of any),
and the median of the within-repeat ratios ("paired"); writes benchmarks/results/overhead.json.

    .venv/bin/python benchmarks/bench_overhead.py
    .venv/bin/python benchmarks/bench_overhead.py --repeats 5 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
PHASES = ("data", "forward", "backward", "step", "bookkeeping")


def usage() -> tuple:
    """(user + system CPU s, system CPU s, minor page faults) of this process and its reaped children
    (reader workers). System time and page faults are what an allocator that maps and unmaps
    activation memory costs (turnctl.host.tune_allocator); they do not move with the VM's speed."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime, s.ru_stime + c.ru_stime, s.ru_minflt + c.ru_minflt)


def cpu_seconds() -> float:
    return usage()[0]


class Timed:
    """Wall and CPU seconds (and system seconds, page faults) of a block."""

    def __enter__(self):
        self.w0, (self.c0, self.s0, self.f0) = time.perf_counter(), usage()
        return self

    def __exit__(self, *exc):
        cpu, sys_s, faults = usage()
        self.wall, self.cpu = time.perf_counter() - self.w0, cpu - self.c0
        self.sys, self.faults = sys_s - self.s0, faults - self.f0


class Laps:
    def __init__(self):
        self.s = dict.fromkeys(PHASES, 0.0)
        self.mark = time.perf_counter()

    def lap(self, phase):
        now = time.perf_counter()
        self.s[phase] += now - self.mark
        self.mark = now


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import deepspeed
    import torch

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}


def setup(args, world: int, extra=()):
    """The recipe (global batch --batch-size, micro-batch = global / world: no accumulation; ``extra``
    overrides), the split, the transforms, and a fresh backbone."""
    from turnctl import distributed as dist
    from turnctl.data import open_split
    from turnctl.models import load_backbone
    from turnctl.recipe import load_recipe
    from turnctl.transforms import eval_transform, train_transform

    recipe = load_recipe(args.recipe, [f"finetune.batch_size={args.batch_size}",
                                       f"finetune.micro_batch_size={args.batch_size // world}",
                                       f"data.num_workers={args.workers}", *args.overrides, *extra])
    info = open_split(Path(args.shards), "train")
    dist.set_seed(recipe.seed, per_rank=False)
    backbone = load_backbone(recipe.model, num_classes=info.num_classes)
    return recipe, info, backbone, train_transform(backbone.preprocess, recipe.data.augment), \
        eval_transform(backbone.preprocess)


def freeze_norm(model, recipe) -> None:
    import torch

    model.train()
    if recipe.finetune.freeze_norm_stats:  # as FineTuner.train_epoch: the same computation
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def rate(n, t: Timed) -> dict:
    return {"samples": n, "wall_s": t.wall, "cpu_s": t.cpu, "samples_per_s": n / t.wall,
            "samples_per_cpu_s": n / t.cpu, "sys_s": t.sys, "minor_faults": t.faults}


def summarise(reps: list) -> dict:
    out = {k: statistics.median(r[k] for r in reps) for k in ("samples_per_s", "samples_per_cpu_s", "wall_s", "cpu_s")
           if all(k in r for r in reps)}
    for k in ("sys_s", "minor_faults"):  # in-process rows
        if all(k in r for r in reps):
            out[k] = statistics.median(r[k] for r in reps)
    out["samples"] = reps[0]["samples"]
    if "time_split_s" in reps[0]:
        out["time_split_s"] = {k: round(statistics.median(r["time_split_s"][k] for r in reps), 3) for k in PHASES}
    out["repeats"] = reps
    return out


# ---- one process: rows a, b, c (1 rank), d ------------------------------------------------------
def in_process(args) -> dict:
    """Every row's repeat r runs right after the other rows' repeat r (a b reader c1 a0, then d):
    a drift in the machine's speed (a shared VM) lands on all rows alike instead of on one."""
    import torch
    import torch.nn.functional as F

    from turnctl import distributed as dist
    from turnctl.data import exact_loader, train_loader
    from turnctl.features import extract_features
    from turnctl.finetune import FineTuner, build_optimizer

    torch.set_num_threads(args.threads)
    dist.init_distributed(10)
    recipe, info, plain_model, train_tf, eval_tf = setup(args, 1)
    ft = recipe.finetune
    steps = info.num_samples // args.batch_size
    n_train = steps * args.batch_size

    def loader(epoch):
        return train_loader(info, transform=train_tf, batch_size=args.batch_size, epoch=epoch, seed=recipe.seed,
                            rank=0, world_size=1, num_workers=args.workers,
                            shuffle_buffer=recipe.data.shuffle_buffer, steps=steps)

    resident = [(b["image"].clone(), b["cls"].clone()) for b in loader(0)]

    def plain_loop(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(params, name=ft.optimizer, lr=ft.lr, weight_decay=ft.weight_decay, momentum=ft.momentum)

        def epoch_of(batches):
            freeze_norm(model, recipe)
            laps = Laps()
            for x, y in batches:
                laps.lap("data")
                loss = F.cross_entropy(model(x).float(), y)
                laps.lap("forward")
                loss.backward()
                laps.lap("backward")
                if ft.gradient_clipping > 0:
                    torch.nn.utils.clip_grad_norm_(params, ft.gradient_clipping)
                opt.step()
                opt.zero_grad(set_to_none=True)
                laps.lap("step")
            return {k: round(v, 4) for k, v in laps.s.items()}

        epoch_of(resident[:3])  # warm-up: allocator, AdamW state
        return epoch_of

    def from_loader(epoch):
        for b in loader(epoch):
            yield b["image"], b["cls"]

    plain = plain_loop(plain_model)
    # a0: the same loop and model with the batch left in NCHW: what model.memory_format=auto buys.
    _, _, nchw_model, _, _ = setup(args, 1, ["model.memory_format=contiguous"])
    plain_nchw = plain_loop(nchw_model)
    # c, one rank: a fresh backbone with the same initial weights, in a DeepSpeed engine.
    _, _, tuner_model, _, _ = setup(args, 1)
    tuner = FineTuner(tuner_model, recipe)
    tuner.train_epoch(info, epoch=0, total_epochs=args.repeats + 1, keep_idx=torch.arange(3 * args.batch_size).numpy(),
                      transform=train_tf, num_workers=args.workers, seed=recipe.seed)  # warm-up

    reps = {k: [] for k in ("a_plain_resident", "a0_plain_resident_nchw", "b_plain_train_loader",
                            "reader_alone_train", "c_turnctl_1rank")}
    for r in range(args.repeats):
        reps["a_plain_resident"].append(timed(lambda: plain(resident), n_train))
        reps["b_plain_train_loader"].append(timed(lambda: plain(from_loader(1 + r)), n_train))
        reps["reader_alone_train"].append(timed(lambda: sum(int(b["cls"].shape[0]) for b in loader(1 + r))))
        reps["c_turnctl_1rank"].append(timed(lambda: tuner.train_epoch(
            info, epoch=1 + r, total_epochs=args.repeats + 1, keep_idx=None, transform=train_tf,
            num_workers=args.workers, seed=recipe.seed)))
        reps["a0_plain_resident_nchw"].append(timed(lambda: plain_nchw(resident), n_train))
    results = {k: summarise(v) for k, v in reps.items()}
    for k in reps:
        log(k, results[k])

    # d: the pure no-grad forward on resident images (the eval transform's, as the passes read them).
    eval_bs, feat_bs = ft.eval_batch_size, recipe.features.batch_size
    images = torch.cat([b["image"] for b in exact_loader(info, transform=eval_tf, batch_size=feat_bs, rank=0,
                                                         world_size=1, num_workers=0) if bool((b["idx"] >= 0).any())])
    tuner.engine.eval()
    module = tuner.module
    module.eval()
    nchw_model.eval()

    def pure(fn, bs):
        with torch.no_grad():
            for i in range(0, images.shape[0], bs):
                fn(images[i:i + bs])
        return int(images.shape[0])

    def losses():
        return int(tuner.per_sample_losses(info, transform=eval_tf, batch_size=eval_bs,
                                           num_workers=args.workers)["loss"].shape[0])

    def extract():
        return extract_features(module, info, model_identity={}, transform=eval_tf, batch_size=feat_bs,
                                num_workers=args.workers, cache_dir=None).num_samples

    def reader_eval():
        return sum(int((b["idx"] >= 0).sum()) for b in exact_loader(info, transform=eval_tf, batch_size=eval_bs,
                                                                   rank=0, world_size=1, num_workers=args.workers))

    d_rows = {"d_pure_forward_logits": lambda: pure(module, eval_bs),
              "d_pure_engine_forward_logits": lambda: pure(tuner.engine, eval_bs),  # + DeepSpeed's wrapper
              "d0_pure_forward_logits_nchw": lambda: pure(nchw_model, eval_bs),  # model.memory_format=contiguous
              "d_per_sample_losses": losses,
              "d_pure_forward_features": lambda: pure(module.features, feat_bs),
              "d_extract_features": extract,
              "reader_alone_eval": reader_eval}
    for fn in d_rows.values():
        fn()  # warm-up
    reps = {k: [] for k in d_rows}
    for _ in range(args.repeats):
        for k, fn in d_rows.items():
            reps[k].append(timed(fn))
    for k, v in reps.items():
        results[k] = summarise(v)
        log(k, results[k])
    return results


def timed(fn, samples=None) -> dict:
    """One repeat of ``fn``: its samples (``fn``'s count, or a train_epoch result's), wall, CPU, split."""
    with Timed() as t:
        out = fn()
    if isinstance(out, dict) and "samples" in out:  # FineTuner.train_epoch
        return {**rate(out["samples"], t), "time_split_s": out["time_split_s"], "train_loss": out["train_loss"]}
    if isinstance(out, dict):  # the plain loop: its time split
        return {**rate(samples, t), "time_split_s": out}
    return rate(out if samples is None else samples, t)


def log(name, res) -> None:
    extra = f" split {res['time_split_s']}" if "time_split_s" in res else ""
    print(f"[{name}] {res['samples_per_s']:.1f} samples/s, {res['samples_per_cpu_s']:.1f} per CPU-s{extra}",
          file=sys.stderr, flush=True)


# ---- two ranks under the launcher: row c ----------------------------------------------------------
def rank_driver(args) -> int:
    """Run inside ``deepspeed --num_gpus N``: train_epoch --repeats times, one JSON line from rank 0."""
    import torch

    from turnctl import distributed as dist
    from turnctl.finetune import FineTuner

    dist.init_distributed(10)
    world = dist.world_size()
    torch.set_num_threads(args.threads_per_rank or max(1, args.threads // world))
    recipe, info, model, train_tf, _ = setup(args, world)
    tuner = FineTuner(model, recipe)
    tuner.train_epoch(info, epoch=0, total_epochs=args.repeats + 1,
                      keep_idx=torch.arange(3 * args.batch_size).numpy(), transform=train_tf,
                      num_workers=args.workers, seed=recipe.seed)  # warm-up
    reps = []
    for r in range(args.repeats):
        dist.barrier()
        with Timed() as t:
            out = tuner.train_epoch(info, epoch=1 + r, total_epochs=args.repeats + 1, keep_idx=None,
                                    transform=train_tf, num_workers=args.workers, seed=recipe.seed)
            dist.barrier()
        cpu = dist.all_reduce(torch.tensor([t.cpu], dtype=torch.float64))
        walls = dist.all_gather_object(t.wall)
        splits = dist.all_gather_object(out["time_split_s"])
        wall = max(walls)
        reps.append({"samples": out["samples"], "wall_s": wall, "cpu_s": float(cpu[0]),
                     "samples_per_s": out["samples"] / wall, "samples_per_cpu_s": out["samples"] / float(cpu[0]),
                     "time_split_s": splits[0], "time_split_s_per_rank": splits, "train_loss": out["train_loss"]})
    if dist.rank() == 0:
        res = summarise(reps)
        res.update(world_size=world, threads_per_rank=torch.get_num_threads())
        print(json.dumps(res), flush=True)
    dist.destroy()
    return 0


def two_ranks(args, threads_per_rank: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from launch import check, cpu_env, free_port, last_json, remove_leftover_shm, run

    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
           str(Path(__file__).resolve()), "--rank-driver", "--recipe", args.recipe, "--shards", args.shards,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers),
           "--repeats", str(args.repeats), "--threads-per-rank", str(threads_per_rank), "--allocator", args.allocator]
    for o in args.overrides:
        cmd += ["--set", o]
    env = cpu_env({"OMP_NUM_THREADS": str(threads_per_rank)})
    try:
        res = last_json(check(run(cmd, env=env, timeout=1800)).stdout)
    finally:
        remove_leftover_shm()
    log(f"c{args.ranks} x {threads_per_rank} threads", res)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--shards", default="shards/digits-symmetric-0.6")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (no gradient accumulation)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in all, split over ranks")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the launcher row (0: skip it)")
    ap.add_argument("--workers", type=int, default=0, help="reader worker processes per rank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    ap.add_argument("--allocator", choices=("turnctl", "glibc-default"), default="turnctl",
                    help="turnctl: glibc tuned as the turnctl CLI tunes it (turnctl.host.tune_allocator), "
                         "for every row alike; glibc-default: untouched")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a recipe override for every row (e.g. a deepspeed.extra setting)")
    ap.add_argument("--rank-driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads-per-rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from turnctl.host import tune_allocator

    args.allocator_tuned = args.allocator == "turnctl" and tune_allocator()
    # A CPU benchmark by design (fp32, thread budget), also on a machine with a GPU.
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TURNCTL_NO_PROGRESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rank_driver:
        # As turnctl.cli.main on distributed ranks: skip the interpreter teardown, which can destroy
        # one of gloo's still-joinable threads and abort (-6) after the work is done.
        rc = rank_driver(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)

    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        if args.shards != "shards/digits-symmetric-0.6":
            sys.exit(f"{shards}/manifest.json not found: prepare the data first")
        subprocess.run([str(BIN / "turnctl"), "prepare", "digits", "--noise", "symmetric:0.6", "--noise-seed", "0",
                        "--shard-size", "256", "--out", str(shards)], check=True)
    args.shards = str(shards.resolve())  # the launcher's ranks start in the repository
    load_start = os.getloadavg()
    t_all = time.time()
    # The launcher row first, in a fresh process tree, before this process holds a model.
    rows = {}
    if args.ranks > 1:
        rows[f"c_turnctl_{args.ranks}ranks"] = two_ranks(args, max(1, args.threads // args.ranks))
        if args.threads // args.ranks < args.threads:
            # Every rank with all the threads: what the DeepSpeed launcher gave turnctl's ranks when
            # OMP_NUM_THREADS was unset, before distributed.set_threads_per_rank.
            rows[f"c_turnctl_{args.ranks}ranks_oversubscribed"] = two_ranks(args, args.threads)
    rows.update(in_process(args))
    limit = rows["a_plain_resident"]["samples_per_cpu_s"]
    ratios = {k: round(v["samples_per_cpu_s"] / limit, 3) for k, v in rows.items()
              if k.startswith(("a_", "a0_", "b_", "c_"))}

    def paired(row, ref):  # median over repeats of the ratio within a repeat (rows run interleaved)
        return round(statistics.median(x["samples_per_cpu_s"] / y["samples_per_cpu_s"]
                                       for x, y in zip(rows[row]["repeats"], rows[ref]["repeats"])), 3)

    paired_ratios = {k: paired(k, "a_plain_resident") for k in ("a0_plain_resident_nchw", "b_plain_train_loader",
                                                                 "c_turnctl_1rank")}
    paired_ratios["d_per_sample_losses_vs_pure"] = paired("d_per_sample_losses", "d_pure_forward_logits")
    paired_ratios["d0_pure_nchw_vs_pure"] = paired("d0_pure_forward_logits_nchw", "d_pure_forward_logits")
    paired_ratios["d_extract_vs_pure"] = paired("d_extract_features", "d_pure_forward_features")
    ratios["d_per_sample_losses_vs_pure"] = round(
        rows["d_per_sample_losses"]["samples_per_cpu_s"] / rows["d_pure_forward_logits"]["samples_per_cpu_s"], 3)
    ratios["d_extract_vs_pure"] = round(
        rows["d_extract_features"]["samples_per_cpu_s"] / rows["d_pure_forward_features"]["samples_per_cpu_s"], 3)
    import torch

    result = {
        "benchmark": "overhead", "recipe": args.recipe, "shards": str(shards), "global_batch": args.batch_size,
        "overrides": args.overrides, "threads_total": args.threads, "ranks": args.ranks, "reader_workers_per_rank": args.workers,
        "repeats": args.repeats, "precision": "fp32", "torch_threads_in_process": torch.get_num_threads(),
        "allocator": args.allocator, "allocator_tuned": args.allocator_tuned,
        "machine": machine_info(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "wall_s": time.time() - t_all,
        "ratios_per_cpu_s_to_limit": ratios,
        "paired_ratios_per_cpu_s": paired_ratios,
        "cpu_time": "getrusage(SELF) + getrusage(CHILDREN) per process over the timed block; ranks summed",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios_per_cpu_s_to_limit": ratios, "paired": paired_ratios,
                      **{k: round(v["samples_per_cpu_s"], 1) for k, v in rows.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
