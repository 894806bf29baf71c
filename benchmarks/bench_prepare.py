"""`turnctl prepare` throughput (images/s) on realistic inputs, against what one core can do at best.

Cases (each the median of --repeats runs, in a fresh output directory):

    imagefolder            an ImageFolder of real JPEGs: read, verify by decoding, pass the bytes
                           through, write deterministic tar shards (the common path)
    imagefolder, 2 workers the same with a process pool of 2
    imagefolder --max-side an ImageFolder of larger JPEGs (--big-side px) shrunk to --max-side
                           (decode at reduced DCT scale, resize, JPEG re-encode)
    cifar10 python layout  arrays -> PNG (the array datasets' path: restricted unpickling + PNG encode)
    limit: decode only     one core decoding the same JPEGs from memory (PIL, draft mode as prepare
                           does): no file I/O, no tar, no sha256; the ceiling for the first case

JPEGs: the first --count training images of ../shared/data/cifar10-jpg.tar.gz when present (real
32x32 CIFAR-10 JPEGs), else generated. Rates are wall-clock images/s and, for single-process cases,
images per CPU-second (robust to other jobs on a shared machine). Writes
benchmarks/results/prepare.json.

    .venv/bin/python benchmarks/bench_prepare.py [--count 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from turnctl import __version__  # noqa: E402
from turnctl.prepare import prepare_dataset  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def real_or_generated_jpegs(count: int, root: Path) -> str:
    """Write ``count`` JPEGs as ``root/train/<class>/<n>.jpg``; returns a description of the data."""
    if CIFAR.is_file():
        n = 0
        with tarfile.open(CIFAR, "r:gz") as tf:
            for m in tf:
                if n >= count:
                    break
                if m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg"):
                    dest = root / m.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(m).read())
                    n += 1
        return f"{n} real CIFAR-10 JPEGs (32x32) from {CIFAR.name}"
    rng = np.random.default_rng(0)
    for i in range(count):
        dest = root / "train" / f"class{i % 10}" / f"{i:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(dest, quality=90)
    return f"{count} generated 32x32 JPEGs (noise)"


def big_jpegs(count: int, side: int, root: Path) -> None:
    """Smooth synthetic photos (gradients + blobs, so JPEG sizes are realistic) of side x side."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(count):
        c = rng.random((3, 3))
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * np.sin(6 * np.pi * (xx + i / count)) for k in range(3)], -1)
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        dest = root / "train" / f"class{i % 10}" / f"{i:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(dest, quality=90)


def cifar_python_tree(count: int, root: Path) -> None:
    rng = np.random.default_rng(2)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    per = max(1, count // 5)
    for i in range(1, 6):
        batch = {b"labels": (np.arange(per) % 10).tolist(),
                 b"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8)}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (d / "test_batch").write_bytes(pickle.dumps({b"labels": [0] * 10, b"data": np.zeros((10, 3072), np.uint8)},
                                                protocol=2))


def timed_prepare(dataset: str, root: Path, out: Path, **kw) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = time.process_time(), time.perf_counter()
    r = prepare_dataset(dataset, root=root, out=out, overwrite=True, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": r["images"], "wall_s": wall, "cpu_s": cpu}


def decode_limit(root: Path) -> dict:
    blobs = [p.read_bytes() for p in sorted(root.rglob("*.jpg"))]
    c0, t0 = time.process_time(), time.perf_counter()
    for b in blobs:
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (1, 1))
        im.load()
    return {"images": len(blobs), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def median_case(fn, repeats: int, *, single_process: bool) -> dict:
    runs = [fn() for _ in range(repeats)]
    n = runs[0]["images"]
    out = {"images": n, "repeats": repeats,
           "images_per_s": round(statistics.median(n / r["wall_s"] for r in runs), 1),
           "wall_s": [round(r["wall_s"], 3) for r in runs]}
    if single_process:
        out["images_per_cpu_s"] = round(statistics.median(n / max(r["cpu_s"], 1e-9) for r in runs), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-side", type=int, default=256)
    ap.add_argument("--max-side", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prepare.json")
    args = ap.parse_args()
    os.environ.setdefault("TURNCTL_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        data = real_or_generated_jpegs(args.count, tmp / "jpg")
        n_big = max(1, args.count // 5)
        big_jpegs(n_big, args.big_side, tmp / "big")
        cifar_python_tree(args.count, tmp / "cifar")
        cases = {
            "imagefolder (verify + pass-through), 1 process": median_case(
                lambda: timed_prepare("imagefolder", tmp / "jpg", tmp / "o1", workers=1), args.repeats,
                single_process=True),
            "imagefolder (verify + pass-through), 2 workers": median_case(
                lambda: timed_prepare("imagefolder", tmp / "jpg", tmp / "o2", workers=2), args.repeats,
                single_process=False),
            f"imagefolder {args.big_side}px JPEGs --max-side {args.max_side}, 1 process": median_case(
                lambda: timed_prepare("imagefolder", tmp / "big", tmp / "o3", workers=1, max_side=args.max_side),
                args.repeats, single_process=True),
            "cifar10 python layout (arrays -> PNG), 1 process": median_case(
                lambda: timed_prepare("cifar10", tmp / "cifar", tmp / "o4", workers=1, noise="symmetric:0.4"),
                args.repeats, single_process=True),
            "limit: JPEG decode only (draft), 1 core, from memory": median_case(
                lambda: decode_limit(tmp / "jpg"), args.repeats, single_process=True),
        }
    result = {
        "benchmark": "turnctl prepare images/s",
        "turnctl_version": __version__,
        "data": data,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "median of repeats; wall-clock on a shared machine, images_per_cpu_s is per CPU-second of the "
                "process (single-process cases only)",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
