"""Frozen-feature pre-extraction with an on-disk cache (input of the linear probe).

Every rank extracts its share of a split once (eval mode, no augmentation, bf16 autocast on GPU);
rank 0 receives the features keyed by idx with a coverage check and caches them as fp16
safetensors. The cache key covers the backbone (family, id, revision, config), its preprocessing and
pooling, and the shards' sha256 fingerprint, so a cache is never reused across any of them; a rerun
or another method on the same data skips extraction. Every rank learns from rank 0 whether the
cache hit, so that all of them skip (or run) the extraction together.

Where the cache goes is settled before any extraction (:func:`choose_cache_dir`): a read-only shards
directory (a shared dataset, a read-only mount) must not cost a whole feature pass and then fail on
the write. A cache write that fails anyway (a full disk) is a warning: the features are in memory
and the run goes on; the write is atomic, so no partial or temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from turnctl import __version__
from turnctl import distributed as dist
from turnctl.errors import DataError
from turnctl.lockstep import per_sample_pass
from turnctl.logger import log
from turnctl.data import SplitInfo
from turnctl.rundir import RunLayout, atomic_path, unwritable

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


class CachePlan(NamedTuple):
    """Where features are cached (``write``, None: not at all) and where else a cache may be found
    (``read``: the shards' own cache when it is read-only, still good for a hit)."""

    write: Optional[Path]
    read: Tuple[Path, ...] = ()


def choose_cache_dir(cache_dir: Optional[str], shards: str, run_dir: Path) -> CachePlan:
    """The feature cache location of a run, checked writable before any extraction (rank 0).

    ``cache_dir`` set (``features.cache_dir``): it must be writable, else DataError. Unset: the
    shards' ``.features``, or, when that is not writable, ``<run_dir>/features-cache`` with one
    warning saying where and why (the shards' cache is still read).
    """
    if cache_dir:
        why = unwritable(Path(cache_dir))
        if why is not None:
            raise DataError(f"features.cache_dir={cache_dir}: cannot write there ({why}); set it to a "
                            "writable directory, or features.cache=false")
        return CachePlan(Path(cache_dir))
    default = Path(shards) / ".features"
    why = unwritable(default)
    if why is None:
        return CachePlan(default)
    fallback = RunLayout(run_dir).features_cache
    why_not = unwritable(fallback)
    if why_not is not None:
        raise DataError(f"{fallback}: cannot write the feature cache ({why_not}), nor in {default} ({why}); "
                        "set features.cache_dir to a writable directory, or features.cache=false")
    log.warning("features: %s is not writable (%s); caching this run's features in %s instead "
                "(set features.cache_dir to a writable directory to share them between runs)",
                default, why, fallback)
    return CachePlan(fallback, (default,))


def _why(exc: BaseException) -> str:
    """The reason of a failed write, as the OS says it ("No space left on device")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    m = re.search(r"I/O error: (.+?) \(os error \d+\)", str(exc))  # safetensors' wording of an OSError
    return m.group(1) if m else str(exc)


def _save(fs: FeatureSet, path: Path, key: str, info: SplitInfo) -> bool:
    """Write the cache atomically (temp name, fsync, rename); False, with one warning, on failure."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    made_dir = not path.parent.is_dir()
    try:
        with atomic_path(path) as tmp:
            save_file({"features": fs.features.contiguous(), "labels": fs.labels, "clean": fs.clean,
                       "ok": fs.ok.to(torch.uint8)}, str(tmp),
                      metadata={"key": key, "split": info.split, "num_samples": str(info.num_samples),
                                "turnctl": __version__})
    except BaseException as exc:  # a signal or a bug too: no stray temporary (atomic_path), then re-raised
        if made_dir:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        if not isinstance(exc, (OSError, SafetensorError)):  # safetensors reports ENOSPC as its own error
            raise
        log.warning("features [%s]: cannot write the feature cache %s (%s); going on without it (the "
                    "next run extracts the features again)", info.split, path, _why(exc))
        return False
    return True


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
    read_dirs: Sequence[Path] = (),
) -> Optional[FeatureSet]:
    """Features of ``info`` on rank 0 (None on other ranks), from the cache when it matches.

    ``forward`` defaults to ``backbone.features``; pass the DeepSpeed engine's module's ``features``
    under ZeRO-3 (it is the same call: the engine's hooks gather the partitioned weights).
    The cache is looked up in ``cache_dir``, then in ``read_dirs`` (read-only caches), and written
    to ``cache_dir`` (see :func:`choose_cache_dir`). Collective: every rank must call it.
    """
    key = cache_key(model_identity, backbone.preprocess, info)
    name = f"{info.split}.safetensors"
    path = Path(cache_dir) / key / name if cache_dir else None
    cached = None
    if dist.rank() == 0:
        for d in ([cache_dir] if cache_dir else []) + list(read_dirs):
            candidate = Path(d) / key / name
            if candidate.is_file():
                cached = _load(candidate, key, info)
                if cached is not None:
                    break
    hit = dist.broadcast_object(cached is not None)
    if hit:
        if dist.rank() == 0:
            log.info("features [%s]: cache hit %s", info.split, cached.path)
        return cached
    device = dist.compute_device()
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
        if _save(fs, path, key, info):
            log.info("features [%s]: %d x %d cached at %s", info.split, fs.features.shape[0],
                     fs.features.shape[1], path)
        else:
            fs.path = None
    return fs
