"""``prepare_dataset``: raw layout -> :class:`Source` -> noisy labels -> shards -> manifest (last).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     r = prepare_dataset("digits", out=f"{tmp}/digits", noise="symmetric:0.6", workers=1)
    >>> r["manifest"]["splits"]["train"]["count"], r["manifest"]["noise"]["convention"]
    (1258, 'include')

Noise is drawn once over train + val together (the same process for both, so val measures what
the training labels look like); the test split keeps its true labels. With ``--val-fraction`` the
val split is instead held out of the noised train split (``valsplit``). The noise is a function of
(dataset, spec, seed) only: neither ``--workers`` nor ``--shard-size`` changes a label or a byte of
an image.

True labels (``clean.cls``) are written only where they are known (``Source.clean_labels`` says
where they come from, recorded as the manifest's ``clean_labels``): the official labels of curated
benchmarks (digits, CIFAR, Fashion-MNIST; CIFAR-N's files agree with them), Clothing1M's clean
annotations, WebVision's annotated val set (our test split), and an ImageFolder's folder labels only
with ``--labels-verified``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from turnctl.errors import DataError, TurnctlError
from turnctl.logger import log, track
from turnctl.prepare import images, noise as nz, valsplit
from turnctl.prepare.labels import load_csv_labels, load_human_labels
from turnctl.prepare.manifest import Written, write_manifest
from turnctl.prepare.source import NOISED_SPLITS, Source, Split
from turnctl.prepare.writer import (
    SplitWriter, WriteFailed, bytes_under, check_apart, check_out, commit_dir, discard, staging_dir,
)

DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist", "clothing1m", "webvision", "imagefolder")
DEFAULT_SHARD_SIZE = 5000
FASHION_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
_MIN_POOL_ITEMS = 256  # below this a process pool costs more than it saves


def _size(n: int) -> str:
    """``n`` bytes for people.

    >>> _size(512), _size(3 * 1024 ** 2)
    ('512 bytes', '3.0 MB')
    """
    if n < 1024:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
    return f"{n} bytes"  # pragma: no cover


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container share), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    return min(4, available_cpus())


def check_workers(workers: Optional[int]) -> int:
    """``--workers`` as used: the default, or the value capped at :func:`available_cpus` (more
    processes than CPUs only cost memory; 100,000 of them is a fork storm)."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise TurnctlError(f"--workers must be a whole number of at least 1, not {workers}")
    cpus = available_cpus()
    if workers > cpus:
        log.warning("--workers %d is more than the %d CPU%s this process may use: using %d", workers, cpus,
                    "s" if cpus > 1 else "", cpus)
        return cpus
    return int(workers)


def default_root(dataset: str) -> Optional[Path]:
    """``$TURNCTL_DATA/<dataset>``, else ``./data/<dataset>`` (Fashion-MNIST falls back to Debian's
    ``/usr/share/datasets/fashion-mnist`` when ``./data/fashion-mnist`` is absent); None for digits.

    >>> default_root("digits") is None
    True
    """
    if dataset == "digits":
        return None
    env = os.environ.get("TURNCTL_DATA")
    if env:
        return Path(env) / dataset
    local = Path("data") / dataset
    if dataset == "fashion-mnist" and not local.exists():
        return FASHION_SYSTEM_ROOT
    return local


def default_out(dataset: str, spec: nz.NoiseSpec, *, classes: Optional[int] = None, val_fraction: float = 0.0
                ) -> Path:
    """``shards/<dataset>[-<noise slug>][-val<F>]`` (``webvision<N>`` with ``--classes N``).

    >>> str(default_out("digits", nz.parse_spec("symmetric:0.6")))
    'shards/digits-symmetric-0.6'
    >>> str(default_out("cifar10", nz.parse_spec("human:worse")))
    'shards/cifar10-human-worse'
    >>> str(default_out("webvision", nz.parse_spec(None), val_fraction=0.02))
    'shards/webvision-val0.02'
    """
    name = f"{dataset}{classes}" if classes is not None else dataset
    name = f"{name}-{spec.slug}" if spec.slug else name
    return Path("shards") / (f"{name}-val{val_fraction:g}" if val_fraction else name)


def load_source(dataset: str, root: Optional[Path], *, classes: Optional[int] = None,
                labels_verified: bool = False, strict: bool = False) -> Source:
    """Parse the raw layout of ``dataset`` under ``root`` (``labels_verified``, ``strict``: imagefolder
    only; ``strict`` makes a class without training samples an error instead of a warning)."""
    if dataset in ("cifar10", "cifar100"):
        from turnctl.prepare.cifar import load_cifar
        return load_cifar(root, dataset=dataset)
    if dataset == "digits":
        from turnctl.prepare.arrays import load_digits_source
        return load_digits_source()
    if dataset == "fashion-mnist":
        from turnctl.prepare.arrays import load_fashion_mnist
        return load_fashion_mnist(root)
    from turnctl.prepare import listed
    if dataset == "clothing1m":
        return listed.load_clothing1m(root)
    if dataset == "webvision":
        return listed.load_webvision(root, classes=classes)
    if dataset == "imagefolder":
        return listed.load_imagefolder(root, labels_verified=labels_verified, strict=strict)
    raise TurnctlError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")


# -- parallel helpers -----------------------------------------------------------------------------

@contextlib.contextmanager
def _pool(workers: int, n_items: int) -> Iterator[Any]:
    if workers <= 1 or n_items < _MIN_POOL_ITEMS:
        yield None
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield pool


def _ordered_map(pool: Any, fn: Any, items: Any, n_items: int) -> Iterator[Any]:
    """``map`` in input order, through ``pool`` when there is one (order keeps bytes deterministic)."""
    if pool is None:
        return map(fn, items)
    return pool.imap(fn, items, chunksize=max(1, min(64, n_items // (4 * pool._processes) or 1)))


# -- noise ----------------------------------------------------------------------------------------

def _features(splits: List[Split], workers: int) -> np.ndarray:
    """Instance-noise inputs: the images themselves (array datasets) or 8x8 thumbnails (files)."""
    if all(s.is_array for s in splits):
        return nz.standardise(np.concatenate([s.images for s in splits]))
    items = [p for s in splits for p in s.images]
    thumbs = []
    with _pool(workers, len(items)) as pool:
        thumbnails = _ordered_map(pool, images.thumbnail, items, len(items))
        for t in track(thumbnails, "thumbnails", total=len(items), batch_size=1):
            thumbs.append(t if t is not None else np.zeros((images.THUMB_SIDE,) * 2 + (3,), np.uint8))
    return nz.standardise(np.stack(thumbs))


def _coarse_of(source: Source) -> Optional[Dict[int, int]]:
    pairs: Dict[int, int] = {}
    for s in source.splits.values():
        if s.coarse is None:
            return None
        for fine, coarse in zip(s.labels.tolist(), s.coarse.tolist()):
            if pairs.setdefault(fine, coarse) != coarse:
                raise DataError(f"{source.dataset}: fine class {fine} appears under superclasses "
                                f"{pairs[fine]} and {coarse}; the coarse labels are inconsistent")
    return pairs


def _file_labels(source: Source, spec: nz.NoiseSpec, noised: List[Split]) -> List[np.ndarray]:
    table = load_csv_labels(Path(spec.path), num_classes=source.num_classes)
    wanted = {k for s in noised for k in s.keys}
    test_keys = {k for name, s in source.splits.items() if name not in NOISED_SPLITS for k in s.keys}
    unknown = [k for k in table if k not in wanted and k not in test_keys]
    if unknown:
        raise DataError(f"{spec.path}: key {unknown[0]!r} is not a sample of {source.dataset} "
                        f"({len(unknown)} unknown key{'s' if len(unknown) > 1 else ''})")
    missing = [k for s in noised for k in s.keys if k not in table]
    if missing:
        raise DataError(f"{spec.path}: no label for key {missing[0]!r} ({len(missing)} train/val "
                        f"sample{'s' if len(missing) > 1 else ''} missing)")
    ignored = sum(1 for k in table if k in test_keys)
    if ignored:
        log.warning("%s: ignored %d labels of test samples (the test split is never noised)", spec.path, ignored)
    return [np.array([table[k] for k in s.keys], dtype=np.int64) for s in noised]


def _human_labels(source: Source, spec: nz.NoiseSpec, noised: List[Split], labels_file: Optional[Path]
                  ) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    if labels_file is None:
        raise TurnctlError(f"--noise {spec.text} needs --labels FILE (e.g. CIFAR-10_human.pt or CIFAR-100_human.pt)")
    n = source.info.get("official_train_count")
    if n is None or any(s.positions is None for s in noised):
        raise TurnctlError(f"--noise {spec.text}: human labels index the original CIFAR training order; "
                           f"{source.dataset} has none (use file:<csv> for labels by key)")
    labels, key, clean = load_human_labels(labels_file, name=spec.name, num_samples=n,
                                           num_classes=source.num_classes)
    for s in noised:  # the file's own clean labels must be this dataset's, in this order
        if clean is not None:
            bad = np.flatnonzero(clean[s.positions] != s.labels)
            if len(bad):
                p = int(s.positions[bad[0]])
                raise DataError(f"{labels_file}: clean_label[{p}] = {int(clean[p])} but {source.dataset} "
                                f"training image {p} is labelled {int(s.labels[bad[0]])} (wrong file or order)")
    return [labels[s.positions] for s in noised], {"label_file": str(labels_file), "label_set": key}


def apply_noise(source: Source, spec: nz.NoiseSpec, *, seed: int, labels_file: Optional[Path] = None,
                workers: int = 1) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Given labels for every split and what to record about the noise (before any image is read)."""
    given = {name: s.labels.copy() for name, s in source.splits.items()}
    noised = [s for name, s in source.splits.items() if name in NOISED_SPLITS]
    record: Dict[str, Any] = {"spec": spec.text, "kind": spec.kind, "rate": spec.rate,
                              "convention": spec.convention, "seed": seed,
                              "applies_to": [s.name for s in noised] if spec.kind != "none" else [],
                              "note": "val gets the same noise process as train (one draw over train+val, "
                                      "in that order); the test split is never noised"}
    if labels_file is not None and spec.kind != "human":
        raise TurnctlError("--labels is only used with --noise human:<name> (use --noise file:<csv> for a CSV)")
    if spec.kind == "none":
        return given, record
    if not noised:
        log.warning("--noise %s: no train or val split to noise (the test split never is)", spec.text)
        record["applies_to"] = []
        return given, record
    base = np.concatenate([s.labels for s in noised])
    rng = np.random.default_rng(seed)
    C = source.num_classes
    if spec.kind == "symmetric":
        new = nz.symmetric(base, rate=spec.rate, num_classes=C, rng=rng, convention=spec.convention)
    elif spec.kind == "asymmetric":
        if spec.convention == "superclass":
            coarse_of = _coarse_of(source)
            if coarse_of is None:
                raise TurnctlError(f"--noise {spec.text}: needs superclass labels, which only cifar100 has")
            targets = nz.asymmetric_targets(num_classes=C, family="superclass", coarse_of=coarse_of)
        else:
            targets = nz.asymmetric_targets(num_classes=C, family=source.asymmetric_family)
            record["convention"] = {"cifar10": "cifar10-pairs", "cifar100": "blocks-of-5"}.get(
                source.asymmetric_family, "pair-flip c->c+1")
        record["targets"] = targets.tolist()
        new = nz.asymmetric(base, rate=spec.rate, targets=targets, rng=rng)
        record["expected_noise_rate"] = nz.expected_rate(spec, num_classes=C, targets=targets,
                                                         class_counts=np.bincount(base, minlength=C))
    elif spec.kind == "instance":
        log.info("instance noise: computing per-sample features")
        feats = _features(noised, workers)
        new = nz.instance(base, rate=spec.rate, features=feats, num_classes=C, rng=rng)
        record["std"] = nz.INSTANCE_STD
        record["features"] = ("flattened image" if all(s.is_array for s in noised) else
                              f"{images.THUMB_SIDE}x{images.THUMB_SIDE} RGB thumbnail") + \
            " scaled to [0,1], standardised per dimension over train+val"
    elif spec.kind == "human":
        parts, extra = _human_labels(source, spec, noised, labels_file)
        record.update(extra)
        new = np.concatenate(parts)
    elif spec.kind == "file":
        new = np.concatenate(_file_labels(source, spec, noised))
        record["label_file"] = spec.path
    else:  # pragma: no cover - parse_spec guards this
        raise TurnctlError(f"unknown noise kind {spec.kind}")
    if "expected_noise_rate" not in record:
        record["expected_noise_rate"] = nz.expected_rate(spec, num_classes=C)
    start = 0
    for s in noised:
        given[s.name] = new[start:start + len(s)]
        start += len(s)
    return given, record


# -- writing --------------------------------------------------------------------------------------

def _readable(split: Split, *, max_side: Optional[int], pool: Any, skipped: List[Dict[str, str]]
              ) -> Iterator[Tuple[int, str, bytes]]:
    """(position, ext, bytes) of every readable image of ``split`` in order; unreadable ones are
    appended to ``skipped``."""
    load = functools.partial(images.load_sample, max_side=max_side)
    results = _ordered_map(pool, load, split.images, len(split))
    for i, (ext, payload) in enumerate(track(results, f"writing {split.name}", total=len(split), batch_size=1)):
        if ext is None:
            skipped.append({"key": split.keys[i], "path": str(split.images[i]), "reason": payload})
            log.debug("skipping unreadable %s: %s", split.images[i], payload)
            continue
        yield i, ext, payload


def _check_skipped(split: Split, skipped: List[Dict[str, str]], written: int) -> None:
    if skipped:
        log.warning("%s: skipped %d unreadable image%s (first: %s: %s)", split.name, len(skipped),
                    "s" if len(skipped) > 1 else "", skipped[0]["path"], skipped[0]["reason"])
    if written == 0:
        raise DataError(f"{split.name}: no readable image (first failure: {skipped[0]['path']}: {skipped[0]['reason']})")


def _write_split(split: Split, given: np.ndarray, directory: Path, *, shard_size: int, max_side: Optional[int],
                 pool: Any) -> Tuple[List[Dict[str, Any]], np.ndarray, List[Dict[str, str]]]:
    writer = SplitWriter(directory, split.name, shard_size=shard_size)
    kept: List[int] = []
    skipped: List[Dict[str, str]] = []
    try:
        for i, ext, payload in _readable(split, max_side=max_side, pool=pool, skipped=skipped):
            clean = None if split.clean is None else int(split.clean[i])
            writer.add(split.keys[i], ext, payload, idx=writer.count, label=int(given[i]), clean=clean)
            kept.append(i)
        shards = writer.close()
    except BaseException:
        writer.abandon()
        raise
    _check_skipped(split, skipped, writer.count)
    return shards, np.asarray(kept, dtype=np.int64), skipped


def _write_held_out(split: Split, given: np.ndarray, directory: Path, *, shard_size: int, max_side: Optional[int],
                    pool: Any, val_fraction: float, holdout_seed: int, folded: int) -> List[Written]:
    """Train and the val split held out of it (turnctl/prepare/valsplit.py)."""
    skipped: List[Dict[str, str]] = []
    readable = _readable(split, max_side=max_side, pool=pool, skipped=skipped)
    held = valsplit.write_held_out(split, given, readable, directory, fraction=val_fraction, seed=holdout_seed,
                                   shard_size=shard_size)
    _check_skipped(split, skipped, held.pool_count)
    every = lambda s: np.arange(len(s), dtype=np.int64)  # noqa: E731 - written in full, in order
    log.info("held out %d of %d train samples as val (--val-fraction %g, seed %d)", len(held.val),
             held.pool_count, val_fraction, holdout_seed)
    return [Written(held.train, held.given_train, every(held.train), held.train_shards, skipped,
                     valsplit.train_fields(held)),
            Written(held.val, held.given_val, every(held.val), held.val_shards, [],
                     valsplit.val_fields(fraction=val_fraction, seed=holdout_seed, folded=folded))]


def _write_all(source: Source, given: Dict[str, np.ndarray], directory: Path, *, shard_size: int,
               max_side: Optional[int], workers: int, val_fraction: float, holdout_seed: int,
               folded: int) -> Dict[str, Written]:
    """Every split of ``source`` to ``directory``, in order (train's hold-out right after train)."""
    out: Dict[str, Written] = {}
    total = max(len(s) for s in source.splits.values())
    with _pool(workers, total) as pool:
        for name, split in source.splits.items():
            if name == "train" and val_fraction > 0:
                for w in _write_held_out(split, given[name], directory, shard_size=shard_size, max_side=max_side,
                                         pool=pool, val_fraction=val_fraction, holdout_seed=holdout_seed,
                                         folded=folded):
                    out[w.split.name] = w
                continue
            shards, kept, skipped = _write_split(split, given[name], directory, shard_size=shard_size,
                                                 max_side=max_side, pool=pool)
            out[name] = Written(split, given[name], kept, shards, skipped)
    return out


# What each dataset's clean.cls is, for the --labels-verified error (`prepare --help` says the same
# in turnctl/commands/prepare.py).
LABELS_HELP = {
    "digits": "its official labels, on every split",
    "cifar10": "its official labels, on every split (CIFAR-N files agree with them)",
    "cifar100": "its official labels, on every split (CIFAR-N files agree with them)",
    "fashion-mnist": "its official labels, on every split",
    "clothing1m": "clean_label_kv.txt: the train samples it lists, all of val and test",
    "webvision": "the test split only (WebVision's annotated val set); none for train",
    "imagefolder": "none, unless --labels-verified",
}


def _check_options(dataset: str, *, shard_size: int, max_side: Optional[int], classes: Optional[int],
                   val_fraction: float, labels_verified: bool, noise_seed: int, strict: bool) -> float:
    """One-line errors for options that do not fit ``dataset``; returns the checked val fraction."""
    if dataset not in DATASETS:
        raise TurnctlError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    if isinstance(noise_seed, bool) or int(noise_seed) != noise_seed or noise_seed < 0:
        # numpy refuses negative seeds deep inside the noise draw
        raise TurnctlError(f"--noise-seed must be a whole number of 0 or more, not {noise_seed}")
    if strict and dataset != "imagefolder":
        raise TurnctlError(f"--strict only applies to imagefolder (a class without training samples); "
                           f"{dataset}'s classes are fixed by the dataset")
    if shard_size < 1:
        raise TurnctlError(f"--shard-size must be at least 1, not {shard_size}")
    if max_side is not None and max_side < 1:
        raise TurnctlError(f"--max-side must be at least 1, not {max_side}")
    if classes is not None and dataset != "webvision":
        raise TurnctlError("--classes only applies to webvision (mini-WebVision: --classes 50)")
    if labels_verified and dataset != "imagefolder":
        raise DataError(f"--labels-verified only applies to imagefolder: {dataset}'s true labels are fixed "
                        f"by the dataset ({LABELS_HELP[dataset]})")
    return valsplit.check_fraction(val_fraction)


def _prepare_into(partial: Path, dataset: str, root_path: Optional[Path], out_path: Path, spec: nz.NoiseSpec, *,
                  noise_seed: int, labels: Optional[Union[str, Path]], shard_size: int, max_side: Optional[int],
                  workers: int, overwrite: bool, classes: Optional[int], val_fraction: float,
                  labels_verified: bool, strict: bool) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """The long work of :func:`prepare_dataset` into the created ``partial`` directory, committed
    to ``out_path`` at the end; returns (splits, manifest, shard table)."""
    source = load_source(dataset, root_path, classes=classes, labels_verified=labels_verified, strict=strict)
    for name in [n for n, s in source.splits.items() if len(s) == 0]:
        log.warning("%s: the %s split is empty and is left out", dataset, name)
        del source.splits[name]
    if not source.splits:
        raise DataError(f"{dataset}: no samples found under {root_path}")
    folded = valsplit.fold_builtin_val(source, val_fraction)
    log.info("%s: %s", dataset, ", ".join(f"{len(s):,} {n}" for n, s in source.splits.items()))
    if all(s.clean is None for s in source.splits.values()):
        log.info("%s: no true labels are known (%s): purity, recall and true_label stay absent", dataset,
                 source.clean_labels)
    given, record = apply_noise(source, spec, seed=noise_seed,
                                labels_file=Path(labels) if labels is not None else None, workers=workers)
    written = _write_all(source, given, partial, shard_size=shard_size, max_side=max_side, workers=workers,
                         val_fraction=val_fraction, holdout_seed=noise_seed, folded=folded)
    if val_fraction > 0:  # the noise record of the splits as written: val now exists, held out of train
        record = valsplit.noise_after_holdout(record)
    splits, manifest, shard_table = write_manifest(
        partial, written, dataset=dataset, source=source, root=root_path, noise=record,
        options={"shard_size": shard_size, "max_side": max_side, "val_fraction": val_fraction,
                 "labels_verified": labels_verified})
    commit_dir(partial, out_path, overwrite=overwrite)
    return splits, manifest, shard_table


def prepare_dataset(dataset: str, *, root: Optional[Union[str, Path]] = None, out: Optional[Union[str, Path]] = None,
                    noise: Optional[str] = None, noise_seed: int = 0, labels: Optional[Union[str, Path]] = None,
                    shard_size: int = DEFAULT_SHARD_SIZE, max_side: Optional[int] = None,
                    workers: Optional[int] = None, overwrite: bool = False,
                    classes: Optional[int] = None, val_fraction: float = 0.0,
                    labels_verified: bool = False, strict: bool = False) -> Dict[str, Any]:
    """Write ``dataset`` as WebDataset shards with reproducible label noise (docs/ARCHITECTURE.md).

    ``val_fraction`` > 0 holds a stratified val split out of the noised train split, seeded by
    ``noise_seed`` (turnctl/prepare/valsplit.py); ``labels_verified`` (imagefolder) declares the
    folder labels true, so they are written as ``clean.cls``; ``strict`` (imagefolder) makes a class
    without training samples an error. ``workers`` is capped at the CPUs this process may use.

    Nothing of the user's is ever deleted: ``out`` may not overlap ``root``, and ``overwrite``
    replaces only turnctl's own output (turnctl/prepare/writer.py). The partial directory is
    created before the raw data is read, so an unwritable ``out`` fails at once; a failed write
    (disk full) removes it and names the file and the bytes written so far.

    Returns ``{"out": path, "manifest": <manifest.json content>, "seconds": s, "images": n,
    "images_per_s": r}``. Raises :class:`DataError` / :class:`TurnctlError` with one-line messages.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     r = prepare_dataset("digits", out=f"{tmp}/d", val_fraction=0.1, workers=1)
        >>> sorted(r["manifest"]["splits"]), r["manifest"]["splits"]["val"]["held_out_from"]
        (['test', 'train', 'val'], 'train')
    """
    t0 = time.perf_counter()
    val_fraction = _check_options(dataset, shard_size=shard_size, max_side=max_side, classes=classes,
                                  val_fraction=val_fraction, labels_verified=labels_verified,
                                  noise_seed=noise_seed, strict=strict)
    workers = check_workers(workers)
    spec = nz.parse_spec(noise)
    root_path = Path(root) if root is not None else default_root(dataset)
    if dataset == "digits" and root is not None:
        log.warning("digits is bundled with scikit-learn: --root %s is ignored", root)
    out_path = Path(out) if out is not None else default_out(dataset, spec, classes=classes, val_fraction=val_fraction)
    if root_path is not None:  # first: "not empty" would hide that --out is the raw data itself
        check_apart(out_path, root_path)
    check_out(out_path, overwrite=overwrite)
    if spec.kind == "file" and not Path(spec.path).is_file():
        raise DataError(f"label file not found: {spec.path}")

    partial = staging_dir(out_path)  # first: an unwritable --out must not wait for the long work
    try:
        result = _prepare_into(partial, dataset, root_path, out_path, spec, noise_seed=noise_seed, labels=labels,
                               shard_size=shard_size, max_side=max_side, workers=workers, overwrite=overwrite,
                               classes=classes, val_fraction=val_fraction, labels_verified=labels_verified,
                               strict=strict)
    except WriteFailed as exc:
        written = bytes_under(partial)
        discard(partial)
        need = (f"; the dataset needs more than the {_size(written)} written so far: free space or choose "
                f"another --out" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                else f" after writing {_size(written)}")
        raise DataError(f"--out {out_path}: cannot write {exc.path}: {exc.strerror}{need} "
                        f"(nothing was kept; an older --out is untouched)") from None
    except BaseException:
        discard(partial)
        raise
    splits, manifest, shard_table = result
    seconds = time.perf_counter() - t0
    n_images = sum(s["count"] for s in splits.values())
    noise = manifest["noise"]
    if spec.kind != "none":
        rate = noise["realised_noise_rate"]
        log.info("noise %s (%s, seed %d): realised rate %s on %s", spec.text, noise["convention"], noise_seed,
                 "unknown (no true labels)" if rate is None else f"{rate:.4f}", "+".join(noise["applies_to"]))
    log.info("wrote %d images in %d shards to %s in %.1f s (%.0f images/s)", n_images, len(shard_table),
             out_path, seconds, n_images / max(seconds, 1e-9))
    return {"out": str(out_path), "manifest": manifest, "seconds": seconds, "images": n_images,
            "images_per_s": n_images / max(seconds, 1e-9)}
