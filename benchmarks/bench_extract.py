"""Feature pre-extraction throughput against the backbone's pure forward throughput.

Extraction = turnctl.features.extract_features over prepared shards (read, decode, preprocess,
forward, gather, no cache), images/s. The limit = the same backbone's forward on one resident,
already-preprocessed batch, repeated. The ratio says whether loading is the bottleneck (goal on a
GPU: >= 0.8). Default: the demo's real EfficientNet-Lite0 at 64 px on digits shards (prepared if
missing); single process; medians of --repeats; writes benchmarks/results/extract.json.

    .venv/bin/python benchmarks/bench_extract.py
    .venv/bin/python benchmarks/bench_extract.py --recipe vit_b16 --shards shards/cifar100-symmetric-0.9 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--shards", default="shards/digits-symmetric-0.6")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "extract.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TURNCTL_NO_PROGRESS", "1")

    import torch

    from turnctl import distributed as dist
    from turnctl.models import load_backbone
    from turnctl.features import extract_features
    from turnctl.recipe import load_recipe
    from turnctl.data import open_split
    from turnctl.transforms import eval_transform

    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        if args.shards != "shards/digits-symmetric-0.6":
            sys.exit(f"{shards}/manifest.json not found: prepare the data first")
        subprocess.run([str(Path(sys.executable).parent / "turnctl"), "prepare", "digits", "--noise",
                        "symmetric:0.6", "--shard-size", "256", "--out", str(shards)], check=True)
    dist.init_distributed(10)
    recipe = load_recipe(args.recipe)
    info = open_split(shards, args.split)
    dist.set_seed(0, per_rank=False)
    bb = load_backbone(recipe.model, num_classes=info.num_classes).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bb.to(device)
    tf = eval_transform(bb.preprocess)

    extract = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fs = extract_features(bb, info, model_identity={}, transform=tf, batch_size=args.batch_size,
                              num_workers=args.workers, cache_dir=None)
        extract.append(info.num_samples / (time.perf_counter() - t0))
    assert fs is not None and fs.num_samples == info.num_samples

    s = bb.preprocess.image_size
    x = torch.randn(args.batch_size, 3, s, s, device=device)
    forward = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        bb.features(x)
        for _ in range(args.repeats):
            n_batches = max(1, info.num_samples // args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n_batches):
                bb.features(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward.append(n_batches * args.batch_size / (time.perf_counter() - t0))
    result = {
        "benchmark": "extract", "recipe": args.recipe, "shards": str(shards), "split": args.split,
        "num_samples": info.num_samples, "image_size": s, "batch_size": args.batch_size, "workers": args.workers,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "extract_images_per_s": extract, "forward_images_per_s": forward,
        "median_extract_images_per_s": statistics.median(extract),
        "median_forward_images_per_s": statistics.median(forward),
        "ratio_extract_over_forward": statistics.median(extract) / statistics.median(forward),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_extract_images_per_s", "median_forward_images_per_s",
                                             "ratio_extract_over_forward")}))
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
