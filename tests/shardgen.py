"""Tiny prepared datasets in the exact on-disk format of docs/ARCHITECTURE.md, for tests.

    from shardgen import write_toy_shards
    toy = write_toy_shards(tmp_path / "toy", counts={"train": [7, 5, 6], "test": [4]}, num_classes=3,
                           noise_rate=0.4, corrupt={"train": [3]})
    toy.root            # directory with train-000000.tar ..., sizes.json, manifest.json (written last)
    toy.labels["train"]["cls"], toy.labels["train"]["clean"]   # given / true label per idx

Images are class-dependent so that a tiny model can learn them: a colour from a hue wheel per class,
a stripe pattern (orientation and period from the class), and small per-pixel noise. idx runs
0..N-1 over a split's shards in order; keys are ``<split>_<idx:06d>``. Label noise (symmetric,
"exclude" convention: a flipped label is always a different class) applies to the ``train`` split
only, exactly ``round(noise_rate * N)`` samples, and is recorded in the manifest like prepare does.

``corrupt`` replaces the image of the listed idx, alternating between a truncated JPEG (written as
``.jpg``) and garbage bytes (written under ``fmt``); their idx/cls members stay, so readers must count
them as corrupt rather than lose them silently. Deterministic for a given ``seed`` (byte-identical
tars: fixed mtimes and owners).
"""

from __future__ import annotations

import colorsys
import datetime as _dt
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

_TAR_FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


@dataclass
class ToyShards:
    root: Path
    num_classes: int
    labels: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)   # split -> cls/clean
    corrupt: Dict[str, List[int]] = field(default_factory=dict)              # split -> idx
    shard_idx: Dict[str, List[List[int]]] = field(default_factory=dict)      # split -> idx per shard


def class_images(clean: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, size, size, 3]: class colour + class stripe pattern + noise."""
    n = len(clean)
    hues = (np.arange(num_classes) / num_classes)
    palette = np.array([colorsys.hsv_to_rgb(h, 0.8, 0.9) for h in hues]) * 255.0        # [C,3]
    yy, xx = np.mgrid[0:size, 0:size]
    period = 2 + (np.arange(num_classes) // 4) % 3                                       # 2..4 px
    orient = np.arange(num_classes) % 4                                                  # | - / \
    coord = np.stack([xx, yy, xx + yy, xx - yy + size])                                  # [4,S,S]
    stripes = ((coord[orient] // period[:, None, None]) % 2) * 2.0 - 1.0                 # [C,S,S]
    img = palette[clean][:, None, None, :] + 40.0 * stripes[clean][..., None]
    img += rng.normal(0.0, 8.0, size=(n, size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a, "RGB")
    if fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=90)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        im.save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def truncated_jpeg(seed: int = 0) -> bytes:
    """A JPEG cut in the middle of its scan data (PIL raises 'image file is truncated')."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), "RGB").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) * 6 // 10]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_toy_shards(out_dir: Union[str, Path], *, counts: Mapping[str, Sequence[int]], num_classes: int,
                     image_size: int = 8, seed: int = 0, noise_rate: float = 0.0,
                     corrupt: Optional[Mapping[str, Sequence[int]]] = None, fmt: str = "png",
                     tar_format: str = "pax", with_clean: bool = True,
                     key_prefix: str = "", label_offset: Optional[Mapping[str, int]] = None) -> ToyShards:
    """Write a prepared dataset (shards + sizes.json + manifest.json, the manifest last).

    ``counts``: split -> samples per shard, e.g. ``{"train": [7, 5, 6]}``. ``key_prefix`` is put in
    front of every key (use a long one with slashes to exercise long tar member names).
    ``label_offset``: split -> k, every given label of that split is ``(clean + k) % C`` (a split
    whose labels disagree with the images on purpose).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corrupt = {k: sorted(set(int(i) for i in v)) for k, v in (corrupt or {}).items()}
    rng = np.random.default_rng(seed)
    toy = ToyShards(root=out, num_classes=num_classes)
    sizes: Dict[str, int] = {}
    shards_meta: Dict[str, dict] = {}
    splits_meta: Dict[str, dict] = {}
    noise_meta = None
    for split, per_shard in counts.items():
        per_shard = [int(c) for c in per_shard]
        n = sum(per_shard)
        clean = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        given = clean.copy()
        noised = split == "train" and noise_rate > 0
        if noised:
            flip = rng.choice(n, size=int(round(noise_rate * n)), replace=False)
            given[flip] = (clean[flip] + rng.integers(1, num_classes, size=flip.size)) % num_classes
        if (label_offset or {}).get(split):
            given = (clean + int(label_offset[split])) % num_classes
        images = class_images(clean, num_classes, image_size, rng)
        bad = corrupt.get(split, [])
        if any(not 0 <= i < n for i in bad):
            raise ValueError(f"corrupt idx outside [0, {n}) for split {split}")
        bad_kind = {i: k % 2 for k, i in enumerate(bad)}  # 0: truncated JPEG, 1: garbage bytes
        names, shard_idx, start = [], [], 0
        for s, count in enumerate(per_shard):
            name = f"{split}-{s:06d}.tar"
            path = out / name
            ids = list(range(start, start + count))
            start += count
            with tarfile.open(path, "w", format=_TAR_FORMATS[tar_format]) as tf:
                for i in ids:
                    key = f"{key_prefix}{split}_{i:06d}"
                    if i in bad_kind and bad_kind[i] == 0:
                        _add(tf, f"{key}.jpg", truncated_jpeg(i))
                    elif i in bad_kind:
                        _add(tf, f"{key}.{fmt}", b"this is not an image " + bytes(range(64)))
                    else:
                        _add(tf, f"{key}.{fmt}", _encode(images[i], fmt))
                    # member order as turnctl.prepare writes it: image, cls, clean.cls, idx
                    _add(tf, f"{key}.cls", str(int(given[i])).encode())
                    if with_clean:
                        _add(tf, f"{key}.clean.cls", str(int(clean[i])).encode())
                    _add(tf, f"{key}.idx", str(i).encode())
            sizes[name] = count
            shards_meta[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, "count": count,
                                 "split": split}
            names.append(name)
            shard_idx.append(ids)
        realised = float((given != clean).mean()) if n else 0.0
        splits_meta[split] = {
            "count": n, "shards": names,
            "per_class_given": np.bincount(given, minlength=num_classes).tolist(),
            "per_class_clean": np.bincount(clean, minlength=num_classes).tolist() if with_clean else None,
            "has_clean": with_clean, "clean_known": n if with_clean else 0, "noised": noised,
            "realised_noise_rate": realised if with_clean else None,
            "skipped": {"count": 0, "items": []},
        }
        if split == "train" or noise_meta is None:
            tm = np.zeros((num_classes, num_classes))
            np.add.at(tm, (clean, given), 1.0)
            tm /= np.maximum(tm.sum(1, keepdims=True), 1.0)
            noise_meta = {"spec": f"symmetric:{noise_rate}:exclude" if noise_rate > 0 else "none",
                          "kind": "symmetric" if noise_rate > 0 else "none", "rate": float(noise_rate),
                          "convention": "exclude" if noise_rate > 0 else None, "seed": seed,
                          "applies_to": ["train"] if noise_rate > 0 else [],
                          "realised_noise_rate": realised if noised else 0.0,
                          "transition_matrix": np.round(tm, 6).tolist(), "measured_on": n}
        toy.labels[split] = {"cls": given, "clean": clean}
        toy.corrupt[split] = bad
        toy.shard_idx[split] = shard_idx
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    manifest = {
        "format": "turnctl-shards/1", "dataset": "toy", "turnctl_version": "test",
        "created": _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc).isoformat(),
        "sources": {"generator": "tests/shardgen.py", "seed": seed},
        "num_classes": num_classes, "class_names": [f"class{c}" for c in range(num_classes)],
        "splits": splits_meta, "noise": noise_meta,
        "options": {"shard_size": max((max(c) for c in counts.values() if c), default=0), "max_side": None},
        "shards": shards_meta,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return toy


def write_run_shards(out_dir: Union[str, Path], *, seed: int = 0) -> Path:
    """The dataset of the end-to-end runs (``tiny`` recipe, 2 ranks): 4 classes, 40% noise, uneven
    train shards (the last one short) and a train split that 2 ranks do not divide evenly."""
    write_toy_shards(out_dir, counts={"train": [40, 40, 37], "val": [24], "test": [20, 20]},
                     num_classes=4, image_size=16, seed=seed, noise_rate=0.4)
    return Path(out_dir)


# The toy dataset of the report tests (tests/test_report.py, tests/test_report_html.py): a known
# noisy/clean split and one undecodable image.
REPORT_NUM_CLASSES = 4
REPORT_CORRUPT_IDX = 5


def report_toy(out, seed=0):
    return write_toy_shards(out, counts={"train": [40, 40, 37], "val": [24], "test": [20]},
                            num_classes=REPORT_NUM_CLASSES, image_size=16, seed=seed, noise_rate=0.4,
                            corrupt={"train": [REPORT_CORRUPT_IDX]})
