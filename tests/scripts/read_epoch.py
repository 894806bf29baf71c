"""One rank of the shard-reader acceptance test (tests/test_shards.py), run under torch.distributed.run.

Reads one train_loader epoch and one exact_loader pass over ``--shards``'s train split, with a
collective after every step as a training loop has (unequal step counts would hang right there,
bounded by the short gloo timeout), checks exact-once coverage with the project's gather_by_idx,
and prints one JSON line on rank 0: every rank's steps, idx per batch and stats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from turnctl.distributed import gather_by_idx  # noqa: E402
from turnctl.data import ToTensorResize, exact_loader, open_split, train_loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--shuffle-buffer", type=int, default=0)
    ap.add_argument("--keep", default=None, help="comma-separated idx to keep")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    info = open_split(args.shards, "train")
    tf = ToTensorResize(8)
    keep = [int(i) for i in args.keep.split(",")] if args.keep else None

    ld = train_loader(info, transform=tf, batch_size=args.batch_size, epoch=args.epoch, seed=args.seed,
                      rank=rank, world_size=world, num_workers=args.workers,
                      shuffle_buffer=args.shuffle_buffer, keep_idx=keep)
    train_batches = []
    for b in ld:
        one = torch.ones(1)
        dist.all_reduce(one)  # the per-step collective of a training loop
        assert b["image"].shape == (args.batch_size, 3, 8, 8)
        train_batches.append(b["idx"].tolist())

    ex = exact_loader(info, transform=tf, batch_size=args.batch_size, rank=rank, world_size=world,
                      num_workers=args.workers)
    idx, cls, ok, ex_steps = [], [], [], 0
    for b in ex:
        one = torch.ones(1)
        dist.all_reduce(one)  # a forward under ZeRO-3 is a collective
        ex_steps += 1
        real = b["idx"] >= 0
        idx.append(b["idx"][real])
        cls.append(b["cls"][real])
        ok.append(b["ok"][real])
    idx_t = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    got = gather_by_idx(idx_t, {"cls": torch.cat(cls) if cls else torch.zeros(0, dtype=torch.long),
                                "ok": (torch.cat(ok) if ok else torch.zeros(0, dtype=torch.bool)).long()},
                        num_samples=info.num_samples, what="exact pass")  # raises on gap/duplicate

    steps = torch.tensor([len(train_batches), ex_steps])
    total = steps.clone()
    dist.all_reduce(total)
    mine = {"rank": rank, "train_steps": len(train_batches), "train_batches": train_batches,
            "train_stats": ld.stats(), "exact_steps": ex_steps, "exact_stats": ex.stats(),
            "loader_steps": [ld.steps, ex.steps]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(json.dumps({"world": world, "ranks": everyone, "step_sums": total.tolist(),
                          "exact_not_ok": [int(i) for i, o in zip(got["idx"], got["ok"]) if not o],
                          "exact_cls": got["cls"].tolist()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
