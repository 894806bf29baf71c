"""``turnctl index``: make WebDataset shards a user already has trainable, in place, without a copy.

Shards written by plain ``webdataset.TarWriter`` (an image member ``jpg``/``jpeg``/``png``/``webp``
and a label, in a ``cls`` member or a field of a ``json`` member) carry no ``idx``. This reads every
shard once, streaming, and writes beside them the ``sizes.json`` and ``manifest.json`` that
turnctl's reader checks (turnctl/data/format.py; format :data:`~turnctl.data.format.INDEX_FORMAT`).
idx is assigned in a stable order, recorded in the manifest: shards in name order, samples in tar
order (``splits.<split>.idx = "tar_order"``, ``shards.<file>.first_idx``); the reader derives a
sample's idx from its shard's first idx and its position there, and reads the label from
``splits.<split>.label_field``.

It lives in prepare/ because, like ``turnctl prepare``, it writes a dataset's metadata (with
prepare's manifest writers, turnctl/prepare/manifest.py); turnctl.data stays the reader only.

What it promises:

* the tar files are only ever opened for reading;
* every sample has an image member and an integer label in ``[0, num_classes)``, else DataError
  naming the shard and the key (images are not decoded here: an undecodable one is counted by the
  reader, as for prepared shards);
* memory is O(1) in the number of samples (only per-class counts grow, with the classes);
* ``manifest.json`` / ``sizes.json`` are replaced only when ``turnctl index`` wrote them: a
  directory ``turnctl prepare`` wrote, or any other manifest.json, is refused, as is a
  sizes.json that is not what this call would write (then it is not a leftover of an index
  interrupted between its two writes);
* one call per split; a later call adds its split to the directory's index manifest (or re-indexes
  that split), and a shard belongs to one split only.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from turnctl import __version__
from turnctl.data.format import (DEFAULT_LABEL_FIELD, IDX_TAR_ORDER, IMAGE_EXTS, INDEX_FORMAT, FORMAT,
                                 check_label_field, manifest_format, open_split, read_label, read_manifest,
                                 read_sizes)
from turnctl.data.tar import iter_tar, member_key
from turnctl.errors import DataError
from turnctl.logger import log
from turnctl.prepare.manifest import given_only_split_record, write_sizes_then_manifest
from turnctl.prepare.source import SPLITS

INDEX_SPLITS = SPLITS
# Without --num-classes / --class-names the number of classes is the largest label + 1: a stray
# huge label (an id, not a class) would otherwise make a manifest with a per-class table that size.
MAX_CLASSES_FROM_LABELS = 100_000
MAX_CLASS_NAMES_BYTES = 16 << 20
CLEAN_LABELS = "none: turnctl index records the given labels only (no clean.cls is read)"
# options.classes_from: what fixed num_classes.
FROM_LABELS, FROM_NUM_CLASSES, FROM_NAMES = "labels", "--num-classes", "--class-names"
_PROGRESS_EVERY_S = 10.0


# ----------------------------------------------------------------------------------------------
# Which shards
# ----------------------------------------------------------------------------------------------


def resolve_shards(spec: str) -> Tuple[Path, List[str]]:
    """``(directory, shard file names in sorted order)`` for SHARDS: a directory (its ``*.tar``
    files), one ``.tar`` file, or a brace pattern such as ``data/{000000..000999}.tar``.

    Every file must lie in one directory: turnctl's manifest lists plain shard names inside the
    dataset directory (turnctl/data/format.py refuses anything else).
    """
    path = Path(spec)
    if path.is_dir():
        try:
            with os.scandir(path) as it:
                names = sorted(e.name for e in it if e.name.endswith(".tar") and e.is_file())
        except OSError as exn:
            raise DataError(f"{spec}: cannot list it ({exn.strerror or exn})") from None
        if not names:
            raise DataError(f"{spec}: no .tar file in this directory; give the directory of the shards or a "
                            "pattern such as 'data/{000000..000099}.tar'")
        return path, names
    from braceexpand import UnbalancedBracesError, braceexpand  # webdataset's own dependency

    try:
        files = list(dict.fromkeys(braceexpand(spec)))  # a pattern may name a file twice: once
    except UnbalancedBracesError:
        raise DataError(f"{spec}: unbalanced braces; write a pattern such as 'data/{{000000..000099}}.tar'") from None
    dirs = list(dict.fromkeys(os.path.dirname(os.path.abspath(f)) for f in files))
    if len(dirs) > 1:
        raise DataError(f"{spec}: the shards lie in {len(dirs)} directories ({dirs[0]}, {dirs[1]}"
                        f"{', ...' if len(dirs) > 2 else ''}); turnctl's manifest lists plain shard names inside "
                        "one dataset directory: index each directory on its own (or move the shards together)")
    not_tar = [f for f in files if not f.endswith(".tar")]
    if not_tar:
        raise DataError(f"{not_tar[0]}: not a .tar file name; SHARDS is a directory of .tar files or a pattern "
                        "of them (compressed shards are not read)")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(files)})" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: no such shard{more}")
    return Path(dirs[0]), sorted(os.path.basename(f) for f in files)


# ----------------------------------------------------------------------------------------------
# Reading one shard
# ----------------------------------------------------------------------------------------------


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read: one pass over a shard gives
    its samples, sha256 and size. It has no ``seek``, so iter_tar reads (and hashes) what it skips."""

    def __init__(self, fileobj):
        self._f = fileobj
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Hash the rest of the file (the end-of-archive blocks, padding, anything after them)."""
        while self.read(1 << 20):
            pass


@dataclass
class ShardScan:
    """One shard as read: its samples (all checked), their labels tallied, its bytes hashed."""

    name: str
    count: int = 0
    sha256: str = ""
    bytes: int = 0
    per_class: collections.Counter = field(default_factory=collections.Counter)


def label_bound(num_classes: Optional[int], class_names: Optional[Sequence[str]],
                existing: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The number of classes labels must be below while reading, when something fixes it: this
    call's --num-classes / --class-names, else the dataset's, if an earlier call fixed it."""
    if num_classes is not None:
        return num_classes
    if class_names is not None:
        return len(class_names)
    if existing is not None and existing.get("options", {}).get("classes_from") not in (None, FROM_LABELS):
        return int(existing["num_classes"])
    return None


def _bad_sample(path: Path, key: str, what: str) -> DataError:
    return DataError(f"{path}: sample {key!r}: {what}")


def scan_shard(path: Path, *, label_field: str, bound: Optional[int]) -> ShardScan:
    """Read ``path`` once: check every sample, tally its label, hash the file.

    Samples are grouped as the reader groups them (turnctl/data/tar.py: webdataset's key rule over
    consecutive members), so position ``k`` here is position ``k`` for the reader.
    """
    scan = ShardScan(path.name)
    label_member = "json" if label_field.startswith("json:") else label_field
    images = frozenset(IMAGE_EXTS)

    def finish(key: Optional[str], has_image: bool, members: Dict[str, bytes]) -> None:
        if key is None:
            return
        if not has_image:
            raise _bad_sample(path, key, f"no image member ({'/'.join(IMAGE_EXTS)}); every sample needs one")
        try:
            label = read_label(members, label_field)
        except KeyError as exn:
            raise _bad_sample(path, key, f"{exn.args[0]}: no label under --label-field {label_field}") from None
        except ValueError as exn:
            raise _bad_sample(path, key, f"{exn} (--label-field {label_field})") from None
        if label < 0 or (bound is not None and label >= bound):
            where = f"[0, {bound})" if bound is not None else "0 or more"
            raise _bad_sample(path, key, f"label {label} is not in {where}" +
                              ("; pass --num-classes or --class-names for more classes" if bound is not None else ""))
        if bound is None and label >= MAX_CLASSES_FROM_LABELS:
            raise _bad_sample(path, key, f"label {label} would make {label + 1:,} classes; pass --num-classes "
                              "if that is right")
        scan.per_class[label] += 1
        scan.count += 1

    try:
        with open(path, "rb", buffering=1 << 20) as raw:
            reader = _HashingReader(raw)
            key: Optional[str] = None
            has_image, members = False, {}
            # Every member is read (the hash needs every byte anyway); only the label is kept.
            for name, data in iter_tar(reader):
                kx = member_key(name)
                if kx is None:
                    continue
                if kx[0] != key:
                    finish(key, has_image, members)
                    key, has_image, members = kx[0], False, {}
                if kx[1] in images:
                    has_image = True
                elif kx[1] == label_member and label_member not in members:  # the first, as the reader
                    members[label_member] = data
            finish(key, has_image, members)
            reader.drain()
            size = os.fstat(raw.fileno()).st_size
    except (tarfile.ReadError, ValueError) as exn:
        raise DataError(f"{path}: not a readable tar file ({exn}); turnctl reads uncompressed webdataset shards") from None
    except OSError as exn:
        raise DataError(f"{path}: cannot read it ({exn.strerror or exn})") from None
    if reader.bytes != size:
        raise DataError(f"{path}: {size} bytes now, {reader.bytes} read; it changed while it was indexed: run again")
    scan.sha256, scan.bytes = reader.sha.hexdigest(), size
    return scan


# ----------------------------------------------------------------------------------------------
# The directory's manifest: whose it is, and merging a split into it
# ----------------------------------------------------------------------------------------------


def existing_index(directory: Path) -> Optional[Dict[str, Any]]:
    """The directory's manifest when ``turnctl index`` wrote it, None when there is none; DataError
    for any other manifest.json (index replaces only its own)."""
    mpath = directory / "manifest.json"
    if not mpath.exists():
        return None
    fmt = manifest_format(mpath)
    if fmt == FORMAT:
        raise DataError(f"{mpath}: this directory was written by `turnctl prepare`; train on it as it is "
                        "(turnctl index never replaces a manifest it did not write)")
    if fmt != INDEX_FORMAT:
        raise DataError(f"{mpath}: a manifest.json turnctl index did not write (format {fmt!r}); it is never "
                        "replaced: move it away, or index the shards from a directory without one")
    return read_manifest(mpath)


def read_class_names(path: str) -> List[str]:
    """``--class-names FILE``: one name per line, in label order (label 0 first)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CLASS_NAMES_BYTES:
            raise DataError(f"--class-names {path}: more than {MAX_CLASS_NAMES_BYTES:,} bytes")
        text = p.read_text(encoding="utf-8")
    except OSError as exn:
        raise DataError(f"--class-names {path}: cannot read it ({exn.strerror or exn})") from None
    except UnicodeDecodeError as exn:
        raise DataError(f"--class-names {path}: not UTF-8 text ({exn.reason} at byte {exn.start})") from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"--class-names {path}: no class name in it (one per line, label 0 first)")
    if "" in names:
        raise DataError(f"--class-names {path}: line {names.index('') + 1} is empty; one name per line, label 0 first")
    return names


def _highest_label(per_class: Sequence[int]) -> int:
    """The highest label with a sample in a per-class table (-1 for none)."""
    for c in range(len(per_class) - 1, -1, -1):
        if per_class[c]:
            return c
    return -1


def _resize(per_class: Sequence[int], k: int) -> List[int]:
    return list(per_class[:k]) + [0] * max(0, k - len(per_class))


def index_shards(spec: str, *, split: str = "train", label_field: str = DEFAULT_LABEL_FIELD,
                 num_classes: Optional[int] = None, class_names_file: Optional[str] = None) -> Dict[str, Any]:
    """Index the shards ``spec`` names as ``split``; returns ``{"directory", "split", "manifest",
    "seconds"}``. See the module docstring for what it checks and writes."""
    t0 = time.monotonic()
    if split not in INDEX_SPLITS:
        raise DataError(f"--split {split!r}: one of {', '.join(INDEX_SPLITS)}")
    try:
        check_label_field(label_field)
    except ValueError as exn:
        raise DataError(f"--label-field: {exn}") from None
    if num_classes is not None and num_classes < 1:
        raise DataError(f"--num-classes {num_classes}: at least 1")
    names_given = read_class_names(class_names_file) if class_names_file is not None else None
    if names_given is not None and num_classes is not None and num_classes != len(names_given):
        raise DataError(f"--num-classes {num_classes} but --class-names {class_names_file} lists "
                        f"{len(names_given)} names; give one of them, or agreeing ones")
    directory, names = resolve_shards(spec)
    existing = existing_index(directory)
    old_sizes = _old_sizes(directory, existing, names)
    if existing is not None:
        for name in names:
            other = existing["shards"].get(name, {}).get("split")
            if other not in (None, split):
                raise DataError(f"{directory / name}: already indexed as split {other!r}; a shard belongs to one "
                                f"split (re-index {other!r} without it first)")
    bound = label_bound(num_classes, names_given, existing)
    recorded = (existing or {}).get("options", {}).get("classes_from")
    fixed_before = existing is not None and recorded not in (None, FROM_LABELS)
    if fixed_before and ((bound != existing["num_classes"]) or (
            recorded == FROM_NAMES and names_given is not None and names_given != existing.get("class_names"))):
        raise DataError(f"{directory / 'manifest.json'}: the dataset's classes were fixed by an earlier "
                        f"`turnctl index` ({recorded}: {existing['num_classes']} classes); this call gives "
                        f"other ones. Index every split with the same classes")

    scans: List[ShardScan] = []
    last_log = time.monotonic()
    for i, name in enumerate(names):
        scans.append(scan_shard(directory / name, label_field=label_field, bound=bound))
        if time.monotonic() - last_log >= _PROGRESS_EVERY_S:
            last_log = time.monotonic()
            log.info("indexed %d of %d shards (%d samples)", i + 1, len(names), sum(s.count for s in scans))

    if existing is None and old_sizes is not None and old_sizes != {s.name: s.count for s in scans}:
        raise DataError(f"{directory / 'sizes.json'}: a sizes.json turnctl index did not write (its counts "
                        "differ from the shards'); it is never replaced: move it away")
    # The manifest this call writes: the other splits as they were, this split as just read.
    manifest: Dict[str, Any] = dict(existing) if existing is not None else {}
    shard_table = {n: m for n, m in manifest.get("shards", {}).items() if m.get("split") != split}
    splits = {n: dict(m) for n, m in manifest.get("splits", {}).items() if n != split}
    per_class: collections.Counter = collections.Counter()
    first = 0
    for s in scans:
        shard_table[s.name] = {"sha256": s.sha256, "bytes": s.bytes, "count": s.count, "split": split,
                               "first_idx": first}
        per_class.update(s.per_class)
        first += s.count
    sizes = {n: m["count"] for n, m in sorted(shard_table.items())}  # sizes.json agrees with the manifest

    highest = max([max(per_class, default=-1)] + [_highest_label(m.get("per_class_given") or []) for m in splits.values()])
    k = bound if bound is not None else max(1, highest + 1)
    if highest >= k:  # an earlier split (indexed before the classes were fixed) has a label beyond them
        raise DataError(f"--num-classes/--class-names give {k} classes but an indexed split of "
                        f"{directory} has label {highest}; give at least {highest + 1}")
    if names_given is not None:
        class_names, classes_from = names_given, FROM_NAMES
    elif fixed_before:
        class_names, classes_from = list(existing["class_names"]), recorded
    else:
        class_names = [str(c) for c in range(k)]
        classes_from = FROM_NUM_CLASSES if num_classes is not None else FROM_LABELS
    for m in splits.values():
        m["per_class_given"] = _resize(m.get("per_class_given") or [], k)
    splits[split] = given_only_split_record(
        count=first, shards=[s.name for s in scans], per_class_given=_resize(
            [per_class.get(c, 0) for c in range(highest + 1)], k),
        idx=IDX_TAR_ORDER, label_field=label_field)
    sources = dict(manifest.get("sources") or {})
    sources["written_by"] = "turnctl index"
    sources["shards"] = {**(sources.get("shards") or {}), split: spec}
    manifest.update({
        "format": INDEX_FORMAT,
        "dataset": manifest.get("dataset") or directory.resolve().name,
        "turnctl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": sources,
        "num_classes": k,
        "class_names": class_names,
        "clean_labels": CLEAN_LABELS,
        "splits": {n: splits[n] for n in sorted(splits, key=_split_order)},
        "noise": None,  # turnctl added none; the labels carry whatever noise the data has
        "options": {"classes_from": classes_from},
        "shards": dict(sorted(shard_table.items())),
    })
    write_sizes_then_manifest(directory, sizes, manifest)
    open_split(directory, split)  # what was written reads back (the reader's own checks)
    return {"directory": str(directory), "split": split, "manifest": manifest,
            "seconds": time.monotonic() - t0}


def _split_order(name: str) -> Tuple[int, str]:
    return (INDEX_SPLITS.index(name) if name in INDEX_SPLITS else len(INDEX_SPLITS), name)


def _old_sizes(directory: Path, existing: Optional[Mapping[str, Any]], names: Sequence[str]) -> Optional[Dict[str, int]]:
    """A sizes.json without an index manifest beside it (None when there is none, or when the
    manifest is index's: then sizes.json is rewritten from the manifest). It can only be a leftover
    of an index of these same shards interrupted between its two writes: refused (before any shard
    is read) unless it lists exactly them; its counts are checked after reading."""
    spath = directory / "sizes.json"
    if existing is not None or not spath.exists():
        return None
    try:
        sizes = read_sizes(spath)
    except DataError:
        sizes = None
    if sizes is None or sorted(sizes) != sorted(names):
        raise DataError(f"{spath}: a sizes.json turnctl index did not write (there is no index manifest.json "
                        "and it lists other shards); it is never replaced: move it away")
    return sizes
