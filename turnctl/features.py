"""Frozen-feature pre-extraction with an on-disk cache (input of the linear probe).

Every rank extracts its share of a split once (eval mode, no augmentation, bf16 autocast on GPU);
rank 0 receives the features keyed by idx with a coverage check and caches them as fp16
safetensors. The cache key covers the backbone (family, id, revision, config), its preprocessing and
pooling, and the shards' sha256 fingerprint, so a cache is never reused across any of them; a rerun
or another method on the same data skips extraction. Every rank learns from rank 0 whether the
cache hit, so that all of them skip (or run) the extraction together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from turnctl import __version__
from turnctl import distributed as dist
from turnctl.errors import DataError
from turnctl.lockstep import per_sample_pass, run_device
from turnctl.logger import log
from turnctl.shards import SplitInfo

FEATURE_FORMAT = 1


@dataclasses.dataclass
class FeatureSet:
    """Features of one split in idx order (held by rank 0 only)."""

    split: str
    features: torch.Tensor  # [N, D] float16
    labels: torch.Tensor  # [N] given labels
    clean: torch.Tensor  # [N] true labels, -1 when unknown
    ok: torch.Tensor  # [N] bool, False where the image could not be decoded
    from_cache: bool
    path: Optional[Path] = None

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])


def cache_key(model_identity: Dict, preprocess, info: SplitInfo) -> str:
    """Hex digest naming a cache entry: backbone identity + preprocessing + shards + split."""
    pre = dataclasses.asdict(preprocess) if dataclasses.is_dataclass(preprocess) else dict(preprocess)
    blob = json.dumps({"format": FEATURE_FORMAT, "model": model_identity, "preprocess": pre,
                       "shards": info.fingerprint, "split": info.split}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load(path: Path, key: str, info: SplitInfo) -> Optional[FeatureSet]:
    from safetensors import SafetensorError, safe_open

    # safetensors holds no code: a planted pickle (or any foreign file) is only "not safetensors"
    # (SafetensorError), refused with a warning and overwritten by a fresh extraction.
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or int(meta.get("num_samples", -1)) != info.num_samples:
                log.warning("feature cache %s does not match this backbone/shards; re-extracting", path)
                return None
            t = {name: f.get_tensor(name) for name in ("features", "labels", "clean", "ok")}
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("feature cache %s is unreadable (%s); re-extracting", path, exc)
        return None
    return FeatureSet(info.split, t["features"], t["labels"], t["clean"], t["ok"].bool(), True, path)


def _save(fs: FeatureSet, path: Path, key: str, info: SplitInfo) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"features": fs.features.contiguous(), "labels": fs.labels, "clean": fs.clean,
               "ok": fs.ok.to(torch.uint8)}, str(tmp),
              metadata={"key": key, "split": info.split, "num_samples": str(info.num_samples),
                        "turnctl": __version__})
    os.replace(tmp, path)


def extract_features(
    backbone,
    info: SplitInfo,
    *,
    model_identity: Dict,
    transform,
    batch_size: int,
    num_workers: int,
    cache_dir: Optional[Path],
    forward=None,
) -> Optional[FeatureSet]:
    """Features of ``info`` on rank 0 (None on other ranks), from the cache when it matches.

    ``forward`` defaults to ``backbone.features``; pass the DeepSpeed engine's module's ``features``
    under ZeRO-3 (it is the same call: the engine's hooks gather the partitioned weights).
    Collective: every rank must call it.
    """
    key = cache_key(model_identity, backbone.preprocess, info)
    path = Path(cache_dir) / key / f"{info.split}.safetensors" if cache_dir else None
    cached = None
    if dist.rank() == 0 and path is not None and path.is_file():
        cached = _load(path, key, info)
    hit = dist.broadcast_object(cached is not None)
    if hit:
        if dist.rank() == 0:
            log.info("features [%s]: cache hit %s", info.split, path)
        return cached
    device = run_device()
    was_training = backbone.training
    backbone.eval()
    fwd = forward or backbone.features

    def _forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return fwd(x)

    out = per_sample_pass(
        _forward, info, transform=transform, batch_size=batch_size, num_workers=num_workers,
        collect=lambda feats, batch: {"features": feats.float().to(torch.float16)},
        device=device, input_dtype=torch.float32, dst=0, what="features",
    )
    backbone.train(was_training)
    if out is None:
        return None
    fs = FeatureSet(info.split, torch.from_numpy(out["features"]), torch.from_numpy(out["cls"]).long(),
                    torch.from_numpy(out["clean"]).long(), torch.from_numpy(out["ok"]).bool(), False, path)
    bad = int((~fs.ok).sum())
    if bad:
        log.warning("features [%s]: %d undecodable image(s) got zero features and are excluded", info.split, bad)
    if not torch.isfinite(fs.features.float()).all():
        raise DataError(f"features [{info.split}]: the backbone produced non-finite features "
                        "(check the checkpoint and the preprocessing)")
    if path is not None:
        _save(fs, path, key, info)
        log.info("features [%s]: %d x %d cached at %s", info.split, fs.features.shape[0],
                 fs.features.shape[1], path)
    return fs
