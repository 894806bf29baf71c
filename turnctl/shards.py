"""Streaming reader over the shards written by ``turnctl prepare`` (docs/ARCHITECTURE.md).

Two ways to read a split, one per use:

* :func:`exact_loader` -- every sample exactly once, in lockstep: feature extraction and the
  per-sample losses of every TURN epoch. Shard ``i`` goes to rank ``i % world_size`` and then to the
  rank's workers; ranks with fewer real batches get *padding batches* (one row, ``idx == -1``) so
  that every rank runs the same number of forwards (under ZeRO-3 a forward is a collective).
  Undecodable images are not dropped: they come back as zero images with ``ok == False`` so that
  each idx still appears exactly once and the caller's coverage check stays exact.
* :func:`train_loader` -- one training epoch: a seeded per-epoch shard shuffle *before* the node
  split (so the shard -> rank partition changes every epoch), node and worker splitting, every
  worker cycling over its shards so it never starves, an optional ``keep_idx`` filter (the clean
  subset) applied *before* image decoding, a sample shuffle buffer, and a hard cut at exactly
  ``.steps`` batches on every rank. Corrupt samples are counted and skipped. With fewer shards
  than readers (ranks x workers) the shards are shared in interleaved parts rather than refused
  (``share_shards=False`` refuses with a DataError instead).

Both build an explicit :class:`webdataset.DataPipeline` (in the style of open_clip's ``data.py``)
whose stages are module-level, picklable objects, so the same pipeline runs in-process
(``num_workers=0``) or in DataLoader workers under fork, spawn or forkserver.

Reading is deliberately narrower than ``webdataset.WebDataset``:

* no automatic decoding: only the image member (jpg/jpeg/png/webp) is decoded, by PIL, and the
  ASCII integers ``idx`` / ``cls`` / ``clean.cls`` are parsed here; every other member is skipped
  unread, so a ``.pyd``/``.pickle`` member is never unpickled;
* the tar reader (:func:`expand_tars`) is a small streaming ustar/gnu/pax parser that yields the
  same stream as ``webdataset.tariterators.tar_file_expander`` (member dicts, then ``{}`` at the end
  of each shard). Python's ``tarfile`` costs ~0.1 ms per member, more than decoding a small JPEG,
  and would cap a worker at ~40% of PIL's decode rate (see benchmarks/bench_reader.py);
* errors are counted by a :class:`CountingHandler` with rate-limited logging, never webdataset's
  ``warn_and_continue`` (which sleeps 0.5 s per bad sample);
* DataLoader workers stack batches into a few recycled shared-memory buffers (:class:`_ShmPool`)
  instead of a fresh shared tensor per batch, and decode raw samples in chunks (:class:`_Decode`):
  both measured, see benchmarks/bench_reader.py and benchmarks/results/reader.json.

The rank and world size are explicit arguments (callers pass ``turnctl.distributed.rank()`` /
``world_size()``) rather than read from the environment by ``wds.split_by_node``: the split is then
the same whether or not a process group exists, and tests simulate several ranks in one process.
Nothing here runs a collective: every rank derives the same ``.steps`` from ``sizes.json`` alone.

Example::

    info = open_split("shards/cifar100-sym-0.9", "train")
    tf = ToTensorResize(224)
    for batch in exact_loader(info, transform=tf, batch_size=256, rank=r, world_size=w):
        keep = batch["idx"] >= 0                      # drop padding rows
        feats = model(batch["image"])[keep]           # forward on every rank, every step

    loader = train_loader(info, transform=tf, batch_size=128, epoch=e, seed=0, rank=r,
                          world_size=w, num_workers=4, shuffle_buffer=1000, keep_idx=subset)
    for batch in loader:                              # exactly loader.steps batches on every rank
        ...
    loader.stats()   # {"seen": ..., "corrupt": ..., "filtered": ..., ...}
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import (Annotated, Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, Sequence, Tuple, Union)

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageFile
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from turnctl import pixels
from turnctl.errors import DataError, TurnctlError

log = logging.getLogger("turnctl.shards")

FORMAT = "turnctl-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Train mode: this many undecodable samples in a row on one worker means the data is broken (or the
# transform is): stop with a DataError instead of spinning over the shards forever.
MAX_CONSECUTIVE_CORRUPT = 10_000

# Raw samples a worker pulls before decoding them back to back (see _Decode).
DECODE_CHUNK = 32

# Rate limit of the per-worker warnings about bad samples: the first few, then one per interval.
_WARN_FIRST = 3
_WARN_EVERY_S = 30.0

# Rows of the packed metadata array that crosses the worker -> main process boundary.
_M_IDX, _M_CLS, _M_CLEAN, _M_OK = range(4)
# Fields of the per-worker counters attached to every batch (see _Counters.snapshot).
_STAT_FIELDS = ("worker", "read", "kept", "filtered", "corrupt", "errors", "passes", "fallback")


# ----------------------------------------------------------------------------------------------
# Split metadata
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared dataset, validated against its manifest.

    ``shard_paths`` / ``shard_sizes`` are in shard-name order (``train-000000.tar`` first).
    ``fingerprint`` is a sha256 over the split's shard names, sample counts and the shards' sha256
    as recorded in the manifest: caches of per-sample results (features) key on it, so a
    re-prepared dataset never reuses a stale cache.
    """

    root: Path
    split: str
    shard_paths: Tuple[Path, ...]
    shard_sizes: Tuple[int, ...]
    num_samples: int
    num_classes: int
    class_names: Tuple[str, ...]
    has_clean: bool
    fingerprint: str
    manifest: Mapping[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def shard_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.shard_paths)


# Upper bounds on the metadata files, checked with a stat before they are read: every rank reads
# them, and a runaway (or hostile) file must not take the memory of a node. Measured on manifests
# built with the fields and the indentation `turnctl prepare` writes: WebVision 1.0 (2.4M images,
# 1000 classes, 1000 skipped files) at the default --shard-size is 0.46 MB of manifest and 13 KB of
# sizes.json (1.3 MB / 0.13 MB at --shard-size 500); the largest realistic manifest is a 1000-class
# dataset with known true labels, whose 1000 x 1000 noise transition matrix makes it 14 MB. About
# 10x that, and 100x WebVision's sizes.json at --shard-size 500:
MAX_MANIFEST_BYTES = 128 << 20
MAX_SIZES_BYTES = 16 << 20

_Count = Field(strict=True, ge=0)


class _Meta(BaseModel):
    # Only the fields the reader relies on are typed; prepare's other keys (noise, options, the
    # per-class tables, ...) pass through untouched, so newer manifests stay readable.
    model_config = ConfigDict(extra="allow", strict=True)


class _ShardMeta(_Meta):
    count: int = _Count
    split: str
    bytes: Optional[int] = _Count  # absent in older manifests: no size check
    sha256: Optional[str] = None


class _SplitMeta(_Meta):
    count: Optional[int] = _Count
    # The list of shard names, or (older manifests) just their number.
    shards: Any = None
    has_clean: bool = False

    @field_validator("shards")
    @classmethod
    def _names_or_number(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        if isinstance(v, list) and all(isinstance(n, str) for n in v):
            return v
        raise ValueError(f"expected a list of shard file names or their number, got {_shown(v)}")


class _Manifest(_Meta):
    format: Optional[str] = None
    num_classes: int = Field(strict=True, ge=1)
    class_names: Optional[List[str]] = None
    splits: Dict[str, _SplitMeta]
    shards: Dict[str, _ShardMeta]


_SIZES = TypeAdapter(Dict[str, Annotated[int, _Count]])

_EXPECTED = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer", "string_type": "expected a string",
    "bool_type": "expected true or false", "dict_type": "expected a JSON object",
    "model_type": "expected a JSON object", "model_attributes_type": "expected a JSON object",
    "list_type": "expected a list",
}


def _shown(v: Any) -> str:
    """A JSON value as a message shows it: scalars as values, containers by their kind."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_error(path: Path, exc: ValidationError) -> DataError:
    """The first problem of a ValidationError as one line: the file, the field path, what was wrong."""
    errors = exc.errors(include_url=False)
    e = errors[0]
    where = ".".join(str(p) for p in e["loc"])
    kind = e["type"]
    if kind == "missing":
        what = "missing"
    elif kind == "greater_than_equal":
        what = f"expected an integer >= {e['ctx']['ge']}, got {_shown(e['input'])}"
    elif kind in _EXPECTED:
        what = f"{_EXPECTED[kind]}, got {_shown(e['input'])}"
    else:
        what = str(e["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return DataError(f"{path}: {where + ': ' if where else ''}{what}{more}; this is not the file "
                     "`turnctl prepare` wrote: re-run it (with --overwrite)")


def _read_json(path: Path, what: str, limit: int) -> Any:
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"{path}: {size:,} bytes, more than the {limit:,} a {what} may have; this is "
                            "not the file `turnctl prepare` wrote: re-run it (with --overwrite)")
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # bounded even if the file grows after the stat
    except OSError as exn:
        raise DataError(f"{path}: cannot read {what} ({exn.strerror or exn})")
    if len(data) > limit:
        raise DataError(f"{path}: more than the {limit:,} bytes a {what} may have")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exn:  # RecursionError: absurdly deep nesting
        raise DataError(f"{path}: {what} is not valid JSON ({exn}); re-run `turnctl prepare`")


def read_manifest(path: Path) -> Dict[str, Any]:
    """``manifest.json`` as a dict, its schema checked (DataError naming the field otherwise)."""
    raw = _read_json(path, "manifest.json", MAX_MANIFEST_BYTES)
    try:
        _Manifest.model_validate(raw)
    except ValidationError as exn:
        raise _schema_error(path, exn) from None
    return raw


def read_sizes(path: Path) -> Dict[str, int]:
    """``sizes.json``: shard file name -> number of samples (non-negative integers)."""
    raw = _read_json(path, "sizes.json", MAX_SIZES_BYTES)
    try:
        return _SIZES.validate_python(raw)
    except ValidationError as exn:
        raise _schema_error(path, exn) from None


def _check_shard_name(root: Path, mpath: Path, name: str) -> None:
    """A shard name from the manifest must name a file directly inside ``root``.

    The manifest travels with the data (downloaded, copied from a colleague); a name such as
    ``/etc/hostname`` or ``../../x.tar`` would make every rank open a file outside the dataset.
    The check is on the name only: a shard that is a symlink (a dataset spread over disks) is the
    owner's choice and is followed.
    """
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    plain = (name not in ("", ".", "..") and "\0" not in name and not any(c in name for c in seps)
             and not os.path.isabs(name))
    if plain:
        joined = os.path.normpath(os.path.join(os.path.abspath(root), name))
        plain = os.path.dirname(joined) == os.path.normpath(os.path.abspath(root))
    if not plain:
        raise DataError(f"{mpath}: shard name {name!r} is not a plain file name inside {root} (no path "
                        "separator, no '..', not absolute); this is not a manifest `turnctl prepare` wrote")


def open_split(root: Union[str, Path], split: str, *, verify: bool = False) -> SplitInfo:
    """Read and check ``manifest.json`` / ``sizes.json`` of a prepared dataset for ``split``.

    Everything that can be checked without reading the shards is checked here, before any training
    starts: the manifest exists (it is written last, so its absence means ``prepare`` was
    interrupted or ``root`` is not a prepared dataset), the split exists, every shard file exists,
    and ``sizes.json`` agrees with the manifest. ``verify=True`` also hashes every shard against the
    manifest's sha256 (reads the whole split: slow on large datasets).

    >>> info = open_split("shards/digits", "train")          # doctest: +SKIP
    >>> info.num_samples, info.num_shards, info.fingerprint[:12]  # doctest: +SKIP
    (1437, 3, '5c1f0e9a27d4')
    """
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        if not root.is_dir():
            raise DataError(f"{root}: no such directory; pass the directory `turnctl prepare` wrote")
        raise DataError(
            f"{root}: no manifest.json; either `turnctl prepare` was interrupted (the manifest is "
            f"written last; re-run it with --overwrite) or this is not a prepared dataset directory"
        )
    manifest = read_manifest(mpath)  # types checked: below, every field has its documented type
    for name in manifest["shards"]:
        _check_shard_name(root, mpath, name)
    for smeta in manifest["splits"].values():
        if isinstance(smeta.get("shards"), list):
            for name in smeta["shards"]:
                _check_shard_name(root, mpath, name)
    fmt = manifest.get("format")
    if fmt is not None and fmt != FORMAT:
        raise DataError(f"{mpath}: format {fmt!r}, this turnctl reads {FORMAT!r}")
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise DataError(
            f"{root}: no split {split!r} in the manifest (available: {', '.join(sorted(splits)) or 'none'})"
        )
    sdesc = splits[split]
    shards_meta = manifest.get("shards") or {}
    names = sorted(n for n, m in shards_meta.items() if m.get("split") == split)
    listed = sdesc.get("shards")
    # splits.<split>.shards may be the list of names or just their number: accept both, check both.
    if isinstance(listed, list) and sorted(listed) != names:
        raise DataError(f"{mpath}: splits.{split}.shards does not match the shards recorded for {split!r}")
    if isinstance(listed, int) and listed != len(names):
        raise DataError(f"{mpath}: splits.{split}.shards says {listed}, {len(names)} are recorded")
    spath = root / "sizes.json"
    if not spath.is_file():
        raise DataError(f"{root}: sizes.json is missing; re-run `turnctl prepare` with --overwrite")
    sizes = read_sizes(spath)
    paths, counts = [], []
    for name in names:
        p = root / name
        if not p.is_file():
            raise DataError(f"{p}: shard listed in manifest.json is missing; re-run `turnctl prepare`")
        want_bytes = shards_meta[name].get("bytes")  # absent in older manifests: no check
        have_bytes = p.stat().st_size
        if want_bytes is not None and have_bytes != want_bytes:
            raise DataError(f"{p}: {have_bytes} bytes but manifest.json says {want_bytes}; the shard is "
                            "truncated or replaced (an interrupted copy?); copy it again or re-run `turnctl prepare`")
        if name not in sizes:
            raise DataError(f"{spath}: no entry for {name}")
        if sizes[name] != shards_meta[name]["count"]:
            raise DataError(
                f"{spath}: {name} holds {sizes[name]} samples but manifest.json says "
                f"{shards_meta[name]['count']}; the dataset directory is inconsistent, re-prepare it"
            )
        paths.append(p)
        counts.append(sizes[name])
    total = sum(counts)
    if sdesc.get("count") is not None and sdesc["count"] != total:
        raise DataError(f"{mpath}: split {split!r} count {sdesc['count']} != {total} (sum over its shards)")
    if verify:
        for name, p in zip(names, paths):
            want = shards_meta[name].get("sha256")
            if want and _sha256_file(p) != want:
                raise DataError(f"{p}: sha256 differs from manifest.json; the shard is corrupt or replaced")
    h = hashlib.sha256(f"{FORMAT}\n{split}\n".encode())
    for name, n in zip(names, counts):
        h.update(f"{name} {n} {shards_meta[name].get('sha256', '')}\n".encode())
    num_classes = manifest["num_classes"]
    class_names = tuple(str(c) for c in (manifest.get("class_names") or range(num_classes)))
    if len(class_names) != num_classes:
        raise DataError(f"{mpath}: num_classes / class_names missing or inconsistent")
    return SplitInfo(
        root=root, split=split, shard_paths=tuple(paths), shard_sizes=tuple(counts),
        num_samples=total, num_classes=num_classes, class_names=class_names,
        has_clean=bool(sdesc.get("has_clean", False)), fingerprint=h.hexdigest(), manifest=manifest,
    )


def _sha256_file(path: Path) -> str:
    # The writer's own hash, imported here only: verify=True is rare, and turnctl.prepare pulls in
    # the whole prepare pipeline, which reader workers should not pay for.
    from turnctl.prepare.writer import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, ...) to an RGB :class:`PIL.Image.Image`.

    Raises ``OSError`` (``PIL.UnidentifiedImageError`` for garbage) or ``ValueError`` for bytes that
    are not a complete image. Truncated files are an error, not a half-grey picture: this relies on
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` staying False (Pillow's default; turnctl never sets it).
    An image that declares more than ``turnctl.pixels.MAX_PIXELS`` pixels raises
    ``turnctl.pixels.TooManyPixels`` (a ValueError) before its pixels are allocated: the limit
    ``turnctl prepare`` applies, so a shard written by hand cannot carry a decompression bomb past it.

    >>> decode_image(open("cat.jpg", "rb").read()).mode      # doctest: +SKIP
    'RGB'
    """
    if not data:
        raise ValueError("empty image member")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process flipped the global; a truncated JPEG would decode silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; turnctl needs it False")
    im = pixels.open_image(data)  # header only; the declared size is checked before any pixel
    im.load()  # decode now: errors surface here, inside the caller's try, not in the transform
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _check_pil() -> None:
    # Checked once per epoch in the main process; decode_image checks again in the workers.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise TurnctlError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some library in this process; "
            "turnctl needs it False so that truncated images are reported instead of half-decoded"
        )


class ToTensorResize:
    """Minimal transform: resize to ``size`` x ``size`` (bilinear) -> float tensor [3,H,W] in [0,1].

    Module-level and picklable, for tests and benchmarks; real preprocessing and augmentation
    live in ``turnctl.transforms``. Any picklable ``PIL.Image -> FloatTensor[3,H,W]`` works as a
    ``transform`` argument.
    """

    def __init__(self, size: int, *, resample: int = Image.BILINEAR):
        self.size = int(size)
        self.resample = resample

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), self.resample)
        # Contiguous CHW like turnctl.transforms: batching is then a plain copy (a permuted HWC view
        # costs ~4x more to stack).
        a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(a).to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return f"ToTensorResize({self.size})"


# ----------------------------------------------------------------------------------------------
# Counters and the error handler (per pipeline copy, i.e. per worker process)
# ----------------------------------------------------------------------------------------------


class _Counters:
    """Running per-worker counters. Every stage of one pipeline holds the same instance (pickling
    the pipeline keeps the shared reference), so a worker's stages update one object; the batch
    stage attaches a snapshot to every batch and the main process keeps the last one per worker."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.worker = 0
        self.read = 0        # samples pulled out of the tar streams
        self.kept = 0        # ... that passed the parse and keep_idx filter
        self.filtered = 0    # ... dropped by keep_idx (never decoded)
        self.corrupt = 0     # undecodable / malformed samples (skipped, or ok=False in exact mode)
        self.errors = 0      # stream-level errors (unreadable shard, bad tar header, ...)
        self.passes = 0      # completed passes over this worker's shard list
        self.fallback = 0    # 1 when this worker had to borrow all shards (see _Cycle)
        self.pass_kept: Optional[int] = None
        self._warned = 0
        self._last_warn = 0.0

    def snapshot(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in _STAT_FIELDS], dtype=np.int64)

    def warn(self, msg: str) -> None:
        """Log ``msg`` for the first few problems of this worker, then at most every 30 s."""
        now = time.monotonic()
        if self._warned < _WARN_FIRST or now - self._last_warn >= _WARN_EVERY_S:
            self._warned += 1
            self._last_warn = now
            log.warning("%s (worker %d: %d corrupt samples, %d stream errors so far)",
                        msg, self.worker, self.corrupt, self.errors)


class CountingHandler:
    """webdataset exception handler: count, warn rate-limited, continue.

    Used for stream-level errors (unreadable shard, broken tar header, duplicate member); the
    stream goes on with the next shard. Unlike ``wds.warn_and_continue`` it never sleeps.
    """

    def __init__(self, counters: _Counters):
        self.counters = counters

    def __call__(self, exn: BaseException) -> bool:
        self.counters.errors += 1
        self.counters.warn(f"shard stream error: {type(exn).__name__}: {exn}")
        return True


_warned_once: set = set()


def _warn_once(key: Any, msg: str) -> None:
    if key not in _warned_once:
        _warned_once.add(key)
        log.warning("%s", msg)


def _worker_id() -> int:
    wi = torch.utils.data.get_worker_info()
    return 0 if wi is None else wi.id


# ----------------------------------------------------------------------------------------------
# Tar reading: a fast, streaming drop-in for wds.tar_file_expander
# ----------------------------------------------------------------------------------------------

_ZERO_BLOCK = bytes(512)
# Member suffixes the reader uses (lower case; "clean.cls" ends in ".cls"). Everything else is
# skipped without reading its bytes.
_WANTED_SUFFIXES = tuple("." + e for e in IMAGE_EXTS) + (".idx", ".cls")


def _tar_int(field_: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256."""
    if field_[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _pax_path(data: bytes) -> Optional[str]:
    """The ``path`` record of a pax extended header, if any."""
    path = None
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")  # "key=value\n"
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def iter_tar(fileobj, suffixes: Optional[Tuple[str, ...]] = None) -> Iterator[Tuple[str, bytes]]:
    """Yield ``(name, data)`` for the regular files of a tar stream (ustar, GNU and pax formats).

    With ``suffixes``, members whose lower-cased name does not end in one of them are skipped
    without reading their data. Raises ``tarfile.ReadError`` on a truncated stream or on a block
    that is not a tar header.

    Python's ``tarfile`` costs ~0.1 ms per member (webdataset's tar_file_iterator uses it); this
    costs ~3 us. It handles what tar writers put in front of members: GNU long names ('L'), pax
    extended headers ('x': webdataset's TarWriter emits one per member because its mtime is a
    float), pax globals ('g', ignored), and skips directories and links.
    """
    read = fileobj.read
    longname: Optional[str] = None
    while True:
        hdr = read(512)
        if len(hdr) < 512:
            if not hdr:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise tarfile.ReadError("truncated tar header")
        if hdr == _ZERO_BLOCK:
            return
        magic = hdr[257:263]
        if magic[:5] != b"ustar":
            # v7 header (no magic) or garbage: the checksum decides (a non-octal one is garbage too).
            try:
                chksum = _tar_int(hdr[148:156])
            except ValueError:
                chksum = -1
            if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                raise tarfile.ReadError("bad tar header checksum (not a tar file, or corrupt)")
        try:  # fast path: 11 octal digits + NUL, as Python's tarfile, GNU tar and bsdtar write
            size = int(hdr[124:135], 8)
        except ValueError:
            size = _tar_int(hdr[124:136])
        typ = hdr[156]
        padded = (size + 511) & ~511
        if typ == 48 or typ == 0 or typ == 55:  # '0', NUL, '7': regular file
            if longname is not None:
                name, longname = longname, None
            else:
                name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if hdr[345] and magic == b"ustar\0":  # POSIX prefix field (GNU uses it otherwise)
                    name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            if suffixes is None or name.lower().endswith(suffixes):
                data = read(size)
                if len(data) < size:
                    raise tarfile.ReadError(f"{name}: truncated member data")
                if padded > size:
                    read(padded - size)
                yield name, data
            else:
                _skip(fileobj, padded)
            continue
        data = read(padded)
        if len(data) < padded:
            raise tarfile.ReadError("truncated tar extension header")
        if typ == 76:     # 'L': GNU long name of the next member
            longname = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typ == 120:  # 'x': pax header of the next member; only its path matters here
            if b" path=" in data:
                longname = _pax_path(data[:size])
        # 'g' pax globals, directories, links, devices, GNU 'K' long link names: nothing to yield


def _skip(fileobj, n: int) -> None:
    try:
        fileobj.seek(n, os.SEEK_CUR)
    except (AttributeError, OSError, io.UnsupportedOperation):
        fileobj.read(n)


def expand_tars(src: Iterable[Dict[str, Any]], handler: Callable[[BaseException], bool]):
    """``{"url": path}`` dicts -> member dicts ``{"fname", "data", "__url__"}``, then ``{}`` per shard.

    Same output contract as ``webdataset.tariterators.tar_file_expander`` (the end-of-shard ``{}``
    included); only the members the reader uses are read. Local paths only (prepare writes to disk).
    """
    for source in src:
        url = source["url"]
        part, parts = source.get("part", 0), source.get("parts", 1)
        try:
            with open(url, "rb", buffering=1 << 20) as f:
                members = iter_tar(f, _WANTED_SUFFIXES)
                if parts > 1:
                    members = _take_part(members, part, parts)
                for name, data in members:
                    yield {"fname": name, "data": data, "__url__": url}
        except Exception as exn:  # noqa: BLE001 -- the handler decides
            exn.args = tuple(exn.args) + (url,)
            if not handler(exn):
                raise
        # End of shard (also after an error): the grouper flushes on it and never mixes shards.
        yield {}


def _take_part(members: Iterator[Tuple[str, bytes]], part: int, parts: int):
    """The members of the samples at positions ``part, part + parts, ...`` of a shard (a shard read
    by several readers, each taking its interleaved part; see :func:`train_assignment`)."""
    k, last = -1, None
    for name, data in members:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        key = name[:dot] if dot > slash else name
        if key != last:
            k, last = k + 1, key
        if k % parts == part:
            yield name, data


def group_samples(files: Iterable[Dict[str, Any]], handler: Callable[[BaseException], bool]):
    """Member dicts -> sample dicts ``{"__key__", "__url__", ext: bytes}``.

    The key is the member name up to the first dot of its last path component (webdataset's rule:
    ``a/b_1.clean.cls`` -> key ``a/b_1``, ext ``clean.cls``). The ``{}`` end-of-shard marker that
    tar_file_expander-style sources yield flushes the current sample and is otherwise skipped.
    """
    current: Optional[Dict[str, Any]] = None
    for f in files:
        if not f:  # the {} eof_value: a shard ended
            if current is not None:
                yield current
            current = None
            continue
        fname = f["fname"]
        slash = fname.rfind("/")
        dot = fname.find(".", slash + 1)
        if dot <= slash + 1:
            continue
        key, ext = fname[:dot], fname[dot + 1:].lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": f["__url__"]}
        if ext in current:
            handler(ValueError(f"{fname}: duplicate member in {f['__url__']} (kept the first)"))
            continue
        current[ext] = f["data"]
    if current is not None:
        yield current


# ----------------------------------------------------------------------------------------------
# Pipeline stages (module-level classes: picklable for spawn/forkserver workers)
# ----------------------------------------------------------------------------------------------


def shard_order(num_shards: int, *, seed: int, epoch: int) -> List[int]:
    """The permutation of shard indices used for ``epoch``: identical on every rank (it depends on
    ``seed`` and ``epoch`` only) and stable across Python versions (string-seeded ``random``)."""
    order = list(range(num_shards))
    random.Random(f"turnctl-shards:{seed}:{epoch}").shuffle(order)
    return order


class _ShardList:
    """First stage: the shards as ``{"url": path}`` (plus ``part``/``parts`` for shared shards, see
    :func:`train_assignment`); resets this pipeline copy's counters."""

    def __init__(self, sources: Sequence[Union[str, Mapping[str, Any]]], counters: _Counters):
        self.sources = [{"url": u} if isinstance(u, str) else dict(u) for u in sources]
        self.counters = counters

    def __call__(self):
        self.counters.reset()
        self.counters.worker = _worker_id()
        for src in self.sources:
            yield dict(src)


class _EpochShuffle:
    """Seeded shard shuffle, *before* the node split: the same permutation on every rank, a new one
    every epoch, so the shard -> rank partition changes between epochs (webdataset's own shardshuffle
    runs after splitting and can only reorder a rank's fixed shards)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, src):
        shards = list(src)
        for i in shard_order(len(shards), seed=self.seed, epoch=self.epoch):
            yield shards[i]


class _SplitByRank:
    """``wds.split_by_node`` with an explicit rank (it reads RANK/WORLD_SIZE or the process group)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        for i, s in enumerate(src):
            if i % self.world_size == self.rank:
                yield s


class _Cycle:
    """Repeat this worker's shards forever, so that no worker starves before the epoch's cut.

    When a whole pass over its shards yields no sample (every one filtered out by ``keep_idx``) the
    worker falls back to cycling over *all* shards of the split, reading duplicates of other
    workers' samples rather than leaving its rank short of batches (a rank that runs out of batches
    hangs the others in their next collective). If even a pass over all shards yields nothing, the
    data contradicts ``keep_idx``: DataError.
    """

    def __init__(self, all_urls: Sequence[str], counters: _Counters):
        self.all_urls = list(all_urls)
        self.counters = counters

    def __call__(self, src):
        c = self.counters
        shards = list(src)
        fell_back = False
        while True:
            before = c.kept
            if not shards:
                kept_in_pass = 0
            else:
                for s in shards:
                    yield dict(s)
                kept_in_pass = c.kept - before
                c.passes += 1
            if kept_in_pass > 0:
                c.pass_kept = kept_in_pass
                continue
            if fell_back:
                raise DataError(
                    "no sample of the split passed the keep_idx filter: the shards do not hold the "
                    "idx being kept (shards replaced after the selection was made?)"
                )
            fell_back = True
            c.fallback = 1
            log.warning("worker %d: none of its %d shards holds a kept sample; reading all %d shards",
                        c.worker, len(shards), len(self.all_urls))
            shards = [{"url": u} for u in self.all_urls]


class _Parse:
    """Sample dict -> ``(idx, cls, clean, image_bytes, key, url)``; drops what ``keep`` excludes.

    Runs before the shuffle buffer and before decoding: the buffer then holds compressed bytes
    only, and filtered samples are never decoded. Only ASCII integers are parsed; nothing is
    unpickled. In strict (exact) mode a sample with a valid idx is always kept (a bad image or
    label becomes ``ok=False`` downstream) so that every idx reaches the caller exactly once.
    """

    def __init__(self, num_samples: int, num_classes: int, counters: _Counters, *,
                 keep: Optional[np.ndarray] = None, strict: bool = False):
        self.num_samples, self.num_classes = num_samples, num_classes
        self.counters, self.keep, self.strict = counters, keep, strict

    def __call__(self, src):
        c, keep, n, ncls, strict = self.counters, self.keep, self.num_samples, self.num_classes, self.strict
        for s in src:
            c.read += 1
            try:
                idx = int(s["idx"])
            except (KeyError, ValueError) as exn:
                c.corrupt += 1
                c.warn(f"{s.get('__key__')} in {s.get('__url__')}: no valid idx ({exn!r}); dropped")
                continue
            if not 0 <= idx < n:
                c.corrupt += 1
                c.warn(f"{s['__key__']} in {s['__url__']}: idx {idx} outside [0, {n}); dropped")
                continue
            if keep is not None and not keep[idx]:
                c.filtered += 1
                continue
            try:
                cls = int(s["cls"])
                if not 0 <= cls < ncls:
                    raise ValueError(f"cls {cls} outside [0, {ncls})")
                clean = int(s["clean.cls"]) if "clean.cls" in s else -1
            except (KeyError, ValueError) as exn:
                if not strict:
                    c.corrupt += 1
                    c.warn(f"{s['__key__']} in {s['__url__']}: bad label ({exn!r}); skipped")
                    continue
                cls, clean, data = 0, -1, None  # reported as ok=False, label 0
            else:
                data = None
                for ext in IMAGE_EXTS:
                    data = s.get(ext)
                    if data is not None:
                        break
            c.kept += 1
            yield (idx, cls, clean, data, s["__key__"], s["__url__"])


class _SampleShuffle:
    """Shuffle buffer over the (still compressed) samples, seeded per (seed, epoch, rank, worker).

    Like ``wds.shuffle`` but bounded by one pass of this worker's data once that size is known:
    with cycling streams a buffer larger than a worker's data would fill with duplicates and read
    the shards many times over before yielding anything.
    """

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int, counters: _Counters):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank
        self.counters = counters

    def __call__(self, src):
        c = self.counters
        rng = random.Random(f"turnctl-samples:{self.seed}:{self.epoch}:{self.rank}:{_worker_id()}")
        buf: List[Any] = []
        for s in src:
            buf.append(s)
            cap = self.bufsize if c.pass_kept is None else max(1, min(self.bufsize, c.pass_kept))
            while len(buf) >= cap:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _Decode:
    """Decode + transform in the worker. ``skip=True`` (train): undecodable samples are counted and
    dropped. ``skip=False`` (exact): they become a zero image with ``ok=False``.

    Raw samples are pulled ``chunk`` at a time and then decoded back to back: alternating tar
    parsing and image decoding sample by sample was measurably slower (~5% at CIFAR sizes; the two
    compete for the CPU's caches), see benchmarks/bench_reader.py. The upstream counters (read,
    filtered) therefore run up to ``chunk`` samples ahead of the batches; ``corrupt`` does not.
    """

    def __init__(self, transform: Callable, counters: _Counters, *, skip: bool,
                 max_consecutive: Optional[int] = None, chunk: int = DECODE_CHUNK):
        self.transform, self.counters, self.skip, self.chunk = transform, counters, skip, chunk
        self.max_consecutive = MAX_CONSECUTIVE_CORRUPT if max_consecutive is None else max_consecutive

    def _zero(self, like: Optional[torch.Tensor]) -> torch.Tensor:
        """Zeros shaped like the transform's output (the last good one, else a blank image's)."""
        if like is None:
            like = self.transform(Image.new("RGB", (32, 32)))
        return torch.zeros_like(like)

    def __call__(self, src):
        c, transform, skip = self.counters, self.transform, self.skip
        last: Optional[torch.Tensor] = None
        in_a_row = 0
        it = iter(src)
        while True:
            chunk = list(islice(it, self.chunk))
            if not chunk:
                return
            for idx, cls, clean, data, key, url in chunk:
                try:
                    if data is None:
                        raise ValueError("no image member (jpg/jpeg/png/webp) or bad label")
                    x = transform(decode_image(data))
                except Exception as exn:  # noqa: BLE001 -- any decode/transform failure is per sample
                    c.corrupt += 1
                    c.warn(f"{key} in {url}: cannot decode ({type(exn).__name__}: {exn})")
                    if not skip:
                        yield idx, cls, clean, 0, self._zero(last)
                        continue
                    in_a_row += 1
                    if in_a_row >= self.max_consecutive:
                        raise DataError(
                            f"{in_a_row} undecodable samples in a row (last: {key} in {url}: {exn}); "
                            f"the shards or the transform are broken"
                        ) from exn
                    continue
                last = x
                in_a_row = 0
                yield idx, cls, clean, 1, x


class _Batch:
    """Collate to ``{"image": Tensor[B,3,H,W], "meta": int64[4,B], "stats": int64[...]}``.

    The small per-row fields travel as one numpy array (pickled inline) rather than four tensors
    (each tensor crossing the worker boundary costs a shared-memory segment); the main process
    unpacks them (:func:`_unpack`). ``stats`` is this worker's running counters at the moment the
    batch was made: the main process keeps the last one it consumed per worker. With ``partial``
    (finite, exact-mode streams) the last short batch is emitted too, followed by a stats-only
    trailer ``{"stats": ...}`` so that the final counts arrive even from a worker that made no batch.

    In a DataLoader worker the images are stacked into recycled shared-memory buffers
    (:class:`_ShmPool`) instead of a fresh tensor per batch.
    """

    def __init__(self, batch_size: int, counters: _Counters, *, partial: bool):
        self.batch_size, self.counters, self.partial = batch_size, counters, partial
        self.pool: Optional[_ShmPool] = None

    def _emit(self, rows):
        meta = np.array([r[:4] for r in rows], dtype=np.int64).T.copy()  # rows contiguous
        xs = [r[4] for r in rows]
        out = {"meta": meta, "stats": self.counters.snapshot()}
        if torch.utils.data.get_worker_info() is not None:
            if self.pool is None:
                self.pool = _ShmPool(self.batch_size)
            slot, buf = self.pool.take(len(xs), xs[0])
            if buf is not None:
                torch.stack(xs, out=buf[:len(xs)])
                out.update(slot=slot, pool=self.pool.generation, rows=len(xs))
                if slot not in self.pool.sent:  # first use: the buffer itself travels (once)
                    self.pool.sent.add(slot)
                    out.update(image=buf, flags=self.pool.flags)
                return out
        out["image"] = torch.stack(xs)
        return out

    def __call__(self, src):
        rows: List[Any] = []
        for r in src:
            rows.append(r)
            if len(rows) == self.batch_size:
                yield self._emit(rows)
                rows = []
        if self.partial:
            if rows:
                yield self._emit(rows)
            yield {"stats": self.counters.snapshot()}


# Buffers per worker: the DataLoader keeps at most prefetch_factor (2) batches of a worker in flight,
# plus the one being built.
_POOL_SLOTS = 3


class _ShmPool:
    """A worker's recycled shared-memory batch buffers.

    A tensor sent from a worker goes through shared memory; a fresh segment per batch means the
    kernel maps and zeroes every page again, which measured ~3 ms per 3 MB batch (about as long as
    decoding 15 CIFAR JPEGs): 20% of a worker's time at 64 px. Instead each worker stacks into one of
    a few buffers that stay mapped in both processes; the main process copies the batch out and
    clears the slot's flag (:func:`_stream`), so a buffer is only refilled after it was copied. A
    buffer crosses the process boundary once (its first batch); later batches name it by
    ``(pool generation, slot)``: passing a tensor costs a file-descriptor hand-over each time. If
    no slot is free (it cannot happen with the DataLoader's prefetch limit) a fresh tensor is used.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.key: Optional[Tuple[Any, ...]] = None
        self.bufs: List[torch.Tensor] = []
        self.flags: Optional[torch.Tensor] = None
        self._flags_np: Optional[np.ndarray] = None
        self.generation = 0          # bumped when the buffers are replaced (new image shape)
        self.sent: set = set()       # slots whose buffer the main process already holds

    def take(self, n: int, x0: torch.Tensor) -> Tuple[Optional[int], Optional[torch.Tensor]]:
        key = (tuple(x0.shape), x0.dtype)
        if key != self.key:
            try:
                self.bufs = [torch.empty((self.batch_size,) + key[0], dtype=x0.dtype).share_memory_()
                             for _ in range(_POOL_SLOTS)]
            except RuntimeError:  # no shared memory to spare: plain tensors
                self.key = None
                return None, None
            self.flags = torch.zeros(_POOL_SLOTS, dtype=torch.int32).share_memory_()
            self._flags_np = self.flags.numpy()
            self.key = key
            self.generation += 1
            self.sent = set()
        flags = self._flags_np
        for j in range(_POOL_SLOTS):
            if flags[j] == 0:
                flags[j] = 1
                return j, self.bufs[j]
        return None, None


def _identity(x):
    return x


def _unpack(b: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    meta = b["meta"]
    return {
        "image": b["image"],
        "idx": torch.from_numpy(meta[_M_IDX]),
        "cls": torch.from_numpy(meta[_M_CLS]),
        "clean": torch.from_numpy(meta[_M_CLEAN]),
        "ok": torch.from_numpy(meta[_M_OK].astype(bool)),
    }


def _stream(pipeline: wds.DataPipeline, num_workers: int, *, generator: Optional[torch.Generator] = None,
            mp_context: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """The pipeline's batches, in this process (``num_workers == 0``) or from DataLoader workers.

    With workers, batches come round-robin from worker 0, 1, ...; a worker whose stream ends is
    skipped. Closing this generator (the loaders stop at ``.steps``) shuts the workers down.
    """
    if num_workers == 0:
        it = iter(pipeline)
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity,
        persistent_workers=False, prefetch_factor=2, generator=generator,
        multiprocessing_context=mp_context,
    )
    it = iter(loader)
    # The workers' pool buffers, by (worker, pool generation, slot): see _ShmPool.
    held: Dict[Tuple[int, int, int], Any] = {}
    try:
        for b in it:
            slot = b.pop("slot", None)
            if slot is not None:
                key = (int(b["stats"][0]), b.pop("pool"), slot)
                if "flags" in b:  # the first batch in this buffer brings the buffer itself
                    held[key] = (b.pop("image"), b.pop("flags"))
                buf, flags = held[key]
                b["image"] = buf[:b.pop("rows")].clone()  # copy out, then hand the buffer back
                flags[slot] = 0
            yield b
    finally:
        held.clear()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _sum_stats(last: Dict[int, np.ndarray]) -> Dict[str, int]:
    out = {f: 0 for f in _STAT_FIELDS if f != "worker"}
    for snap in last.values():
        for f, v in zip(_STAT_FIELDS, snap.tolist()):
            if f == "passes":
                out[f] = max(out[f], v)
            elif f != "worker":
                out[f] += v
    return out


def _check_common(info: SplitInfo, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of {world_size}")
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")


# ----------------------------------------------------------------------------------------------
# Exact-once, lockstep reading
# ----------------------------------------------------------------------------------------------


def exact_assignment(num_shards: int, *, world_size: int, num_workers: int) -> List[List[List[int]]]:
    """Shard indices per rank and worker for :func:`exact_loader`: shard ``i`` -> rank
    ``i % world_size``; a rank's ``k``-th shard -> worker ``k % W`` with
    ``W = min(max(1, num_workers), shards of the rank)`` (no idle workers are started)."""
    out = []
    for r in range(world_size):
        mine = list(range(r, num_shards, world_size))
        w = min(max(1, num_workers), len(mine))
        out.append([mine[k::w] for k in range(w)])
    return out


def exact_steps(shard_sizes: Sequence[int], *, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches every rank yields in :func:`exact_loader`: the largest number of real batches of any
    rank, where a worker makes ``ceil(samples / batch_size)`` batches. From sizes.json alone."""
    steps = 0
    for workers in exact_assignment(len(shard_sizes), world_size=world_size, num_workers=num_workers):
        real = sum(-(-sum(shard_sizes[i] for i in shards) // batch_size) for shards in workers)
        steps = max(steps, real)
    return steps


class ExactLoader:
    """Every sample of a split exactly once across ranks, in ``steps`` batches on every rank.

    Iterating yields exactly ``steps`` dict batches:

    ====== ========================= ==============================================================
    key    type                      meaning
    ====== ========================= ==============================================================
    image  float32 [B,3,H,W]         ``transform(image)``; zeros where the image is undecodable
    idx    int64 [B]                 sample idx; ``-1`` marks a padding row
    cls    int64 [B]                 given (possibly noisy) label
    clean  int64 [B]                 true label, ``-1`` when unknown
    ok     bool [B]                  decoded fine (False for undecodable samples and padding rows)
    ====== ========================= ==============================================================

    Rows with ``idx >= 0`` over all ranks and steps cover every idx of the split exactly once. After
    its real batches a rank yields padding batches of one row (a copy of one of its real samples,
    or of a blank image when it has none) with ``idx = -1``, ``ok = False``: run the forward on them,
    discard the outputs. If the shards disagree with sizes.json the loader still yields exactly
    ``steps`` batches (truncating or padding) and :meth:`stats` reports it; the caller's coverage
    check (``turnctl.distributed.gather_by_idx``) then fails on every rank alike, instead of one rank
    raising while the others wait in a collective.
    """

    def __init__(self, info: SplitInfo, *, transform: Callable, batch_size: int, rank: int,
                 world_size: int, num_workers: int = 0, mp_context: Optional[str] = None):
        _check_common(info, batch_size, rank, world_size, num_workers)
        self.info, self.transform, self.batch_size = info, transform, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.mp_context = mp_context
        assign = exact_assignment(info.num_shards, world_size=world_size, num_workers=num_workers)
        self.shards: List[int] = sorted(i for w in assign[rank] for i in w)
        # Worker processes actually started on this rank (0 = in-process).
        self.workers = 0 if num_workers == 0 else len(assign[rank])
        self.steps = exact_steps(info.shard_sizes, batch_size=batch_size, world_size=world_size,
                                 num_workers=num_workers)
        self.expected_rows = sum(info.shard_sizes[i] for i in self.shards)
        self._stats: Dict[str, Any] = {}

    def __len__(self) -> int:
        return self.steps

    def pipeline(self) -> wds.DataPipeline:
        """This rank's pipeline (one copy per worker); the worker split happens inside."""
        c = _Counters()
        handler = CountingHandler(c)
        urls = [str(self.info.shard_paths[i]) for i in self.shards]
        return wds.DataPipeline(
            _ShardList(urls, c),                   # this rank's shards, in name order
            wds.split_by_worker,                   # rank's k-th shard -> worker k % W
            wds.pipelinefilter(expand_tars)(handler),
            wds.pipelinefilter(group_samples)(handler),
            _Parse(self.info.num_samples, self.info.num_classes, c, strict=True),
            _Decode(self.transform, c, skip=False),
            _Batch(self.batch_size, c, partial=True),
        )

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        _check_pil()
        last: Dict[int, np.ndarray] = {}
        real = rows = bad = 0
        overflow = 0
        template: Optional[Dict[str, torch.Tensor]] = None
        if self.shards and self.steps:
            stream = _stream(self.pipeline(), self.workers, mp_context=self.mp_context)
            try:
                for b in stream:
                    snap = b["stats"]
                    last[int(snap[0])] = snap
                    if "image" not in b:  # a worker's end-of-stream counters
                        continue
                    batch = _unpack(b)
                    if real == self.steps:  # more data than sizes.json says: cut, keep lockstep
                        overflow += int(batch["idx"].numel())
                        continue
                    real += 1
                    rows += int(batch["idx"].numel())
                    bad += int((~batch["ok"]).sum())
                    template = batch
                    yield batch
            finally:
                stream.close()
        pads = self.steps - real
        if pads:
            pad = self._padding(template)
            for _ in range(pads):
                yield {k: v.clone() for k, v in pad.items()}
        s = _sum_stats(last)
        self._stats = {
            "steps": self.steps, "real_steps": real, "padding_steps": pads, "seen": rows,
            "expected": self.expected_rows, "corrupt": bad, "overflow": overflow,
            "errors": s["errors"], "read": s["read"], "workers": self.workers,
        }
        if rows != self.expected_rows or overflow or s["errors"]:
            log.warning(
                "rank %d read %d samples of %s/%s, sizes.json says %d (%d beyond the last step, %d "
                "stream errors): the shards and sizes.json disagree", self.rank, rows,
                self.info.root, self.info.split, self.expected_rows, overflow, s["errors"],
            )
        if bad:
            log.warning("rank %d: %d undecodable samples in %s/%s (zero images, ok=False)",
                        self.rank, bad, self.info.root, self.info.split)

    def _padding(self, template: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        if template is not None:
            image = template["image"][:1].clone()
            cls = template["cls"][:1].clone()
        else:  # this rank owns no shard (world_size > num_shards): a blank image of the right size
            image = self.transform(Image.new("RGB", (32, 32))).unsqueeze(0)
            cls = torch.zeros(1, dtype=torch.int64)
        return {"image": image, "idx": torch.full((1,), -1, dtype=torch.int64), "cls": cls,
                "clean": torch.full((1,), -1, dtype=torch.int64), "ok": torch.zeros(1, dtype=torch.bool)}

    def stats(self) -> Dict[str, Any]:
        """After iterating: ``steps``, ``real_steps``, ``padding_steps``, ``seen`` (real rows,
        ``idx >= 0``), ``expected`` (from sizes.json), ``corrupt`` (rows with ``ok=False``),
        ``overflow`` (rows cut beyond ``steps``), ``errors`` (stream errors), ``read``, ``workers``."""
        return dict(self._stats)


def exact_loader(info: SplitInfo, *, transform: Callable, batch_size: int, rank: int,
                 world_size: int, num_workers: int = 0, mp_context: Optional[str] = None) -> ExactLoader:
    """Read ``info``'s split exactly once across ``world_size`` ranks, in lockstep.

    ``steps`` is identical on every rank and computed from sizes.json alone (no communication).
    See :class:`ExactLoader` for the batch layout and padding rules.

    >>> info = open_split(root, "train")                                      # doctest: +SKIP
    >>> ld = exact_loader(info, transform=ToTensorResize(64), batch_size=256,
    ...                   rank=dist.rank(), world_size=dist.world_size(), num_workers=2)
    >>> for b in ld:
    ...     real = b["idx"] >= 0
    ...     out = model(b["image"])              # every rank, every step (ZeRO-3 safe)
    ...     keep(b["idx"][real], out[real])
    """
    return ExactLoader(info, transform=transform, batch_size=batch_size, rank=rank,
                       world_size=world_size, num_workers=num_workers, mp_context=mp_context)


# ----------------------------------------------------------------------------------------------
# Training epochs
# ----------------------------------------------------------------------------------------------


class ShardPart(NamedTuple):
    """A reader's unit of work in training: samples ``part, part + parts, ...`` of shard ``shard``
    (``parts == 1``: the whole shard)."""

    shard: int
    part: int
    parts: int


def shard_parts(num_shards: int, *, world_size: int, num_workers: int) -> int:
    """How many interleaved parts each shard is cut into so that every reader (rank x worker) gets
    at least one: 1 whenever ``num_shards >= world_size * max(1, num_workers)``."""
    readers = world_size * max(1, num_workers)
    return max(1, -(-readers // max(1, num_shards)))


def train_assignment(num_shards: int, *, seed: int, epoch: int, world_size: int,
                     num_workers: int) -> List[List[List[ShardPart]]]:
    """The :class:`ShardPart` lists per rank and worker for one :func:`train_loader` epoch.

    Units are the shards (``parts == 1``), or, with fewer shards than readers, every shard cut into
    ``m =`` :func:`shard_parts` interleaved parts; unit ``v`` is part ``v // num_shards`` of shard
    ``v % num_shards``. The epoch's :func:`shard_order` of the units, then position ``p`` -> rank
    ``p % world_size``, then a rank's ``k``-th unit -> worker ``k % max(1, num_workers)``. Each worker
    cycles over its list in this order.

    >>> train_assignment(3, seed=0, epoch=0, world_size=2, num_workers=1)  # doctest: +SKIP
    [[[ShardPart(shard=2, part=0, parts=1), ShardPart(shard=0, part=0, parts=1)]],
     [[ShardPart(shard=1, part=0, parts=1)]]]
    """
    m = shard_parts(num_shards, world_size=world_size, num_workers=num_workers)
    units = [ShardPart(v % num_shards, v // num_shards, m) for v in range(num_shards * m)]
    order = shard_order(len(units), seed=seed, epoch=epoch)
    w = max(1, num_workers)
    out = []
    for r in range(world_size):
        mine = [units[v] for v in order[r::world_size]]
        out.append([mine[k::w] for k in range(w)])
    return out


class TrainLoader:
    """One training epoch: exactly ``steps`` full batches on every rank.

    Batches are dicts with ``image`` float32 [B,3,H,W], ``idx``, ``cls``, ``clean`` (int64 [B],
    ``clean = -1`` when unknown) and ``ok`` (always True here: corrupt samples are skipped). Every
    batch has exactly ``batch_size`` rows.

    Semantics of an epoch: ``steps`` defaults to ``floor(n_kept / (batch_size * world_size))`` (at
    least 1), so the ranks together see about one pass over the kept samples. Each worker cycles over
    its shards (:func:`train_assignment`) and batches come from a rank's workers in turn, so a
    sample can repeat within an epoch when shards are uneven, and some samples of a long shard may
    not appear. Iterating twice replays the same epoch (same shard order, same shuffle seeds).

    Fewer shards than readers (``world_size * max(1, num_workers)``): with ``share_shards`` (the
    default) each shard is cut into interleaved parts so that every reader has one (each reader
    still scans the whole tar but decodes only its part: more reading, same decoding); with
    ``share_shards=False`` that is a DataError that says how to re-prepare.
    """

    def __init__(self, info: SplitInfo, *, transform: Callable, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 keep_idx: Optional[Iterable[int]] = None, steps: Optional[int] = None,
                 share_shards: bool = True, mp_context: Optional[str] = None):
        _check_common(info, batch_size, rank, world_size, num_workers)
        workers = max(1, num_workers)
        if info.num_shards == 0:
            raise DataError(f"{info.root}/{info.split}: the split has no shard")
        if info.num_shards < world_size * workers and not share_shards:
            fewer = (f" or set data.num_workers to {info.num_shards // world_size}"
                     if info.num_shards >= world_size else "")
            raise DataError(
                f"{info.root}/{info.split}: {info.num_shards} shard(s) for {world_size} rank(s) x "
                f"{workers} worker(s) = {world_size * workers} readers, and every reader needs a shard "
                f"of its own (a reader without one yields nothing and the ranks fall out of step). "
                f"Re-run `turnctl prepare` with --shard-size at most "
                f"{max(1, info.num_samples // (world_size * workers))}{fewer}"
            )
        self.keep_mask: Optional[np.ndarray] = None
        n_kept = info.num_samples
        if keep_idx is not None:
            if not isinstance(keep_idx, (np.ndarray, torch.Tensor)):
                keep_idx = list(keep_idx)
            keep = np.unique(np.asarray(keep_idx, dtype=np.int64).ravel())
            if keep.size == 0:
                raise DataError("keep_idx is empty: nothing to train on (the selection kept no sample)")
            if keep[0] < 0 or keep[-1] >= info.num_samples:
                raise DataError(f"keep_idx holds idx outside [0, {info.num_samples}) of split {info.split!r}")
            mask = np.zeros(info.num_samples, dtype=bool)
            mask[keep] = True
            self.keep_mask = mask
            n_kept = int(keep.size)
        if n_kept < 1:
            raise DataError(f"{info.root}/{info.split}: the split is empty")
        if steps is None:
            steps = max(1, n_kept // (batch_size * world_size))
        if steps < 1:
            raise DataError(f"steps must be >= 1, got {steps}")
        self.info, self.transform, self.batch_size = info, transform, batch_size
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.steps = num_workers, shuffle_buffer, int(steps)
        self.n_kept, self.mp_context = n_kept, mp_context
        self.parts = shard_parts(info.num_shards, world_size=world_size, num_workers=num_workers)
        self.assignment = train_assignment(info.num_shards, seed=seed, epoch=epoch,
                                           world_size=world_size, num_workers=num_workers)[rank]
        if self.parts > 1:
            _warn_once(
                (str(info.root), info.split, world_size, workers),
                f"{info.root}/{info.split}: {info.num_shards} shard(s) for {world_size} rank(s) x "
                f"{workers} worker(s); each shard is shared by up to {self.parts} readers, each "
                f"decoding every {self.parts}th sample (every reader scans the whole tar). Prepare "
                f"with --shard-size at most {max(1, info.num_samples // (world_size * workers))} "
                f"to give every reader shards of its own",
            )
        self._stats: Dict[str, Any] = {}

    def __len__(self) -> int:
        return self.steps

    def pipeline(self) -> wds.DataPipeline:
        """This rank's pipeline for the epoch (one copy per worker)."""
        c = _Counters()
        handler = CountingHandler(c)
        urls = [str(p) for p in self.info.shard_paths]
        n, m = self.info.num_shards, self.parts
        # The units of train_assignment, in canonical order: unit v = part v // n of shard v % n.
        units = [{"url": urls[v % n], "part": v // n, "parts": m} for v in range(n * m)]
        return wds.DataPipeline(
            _ShardList(units, c),                       # all shards (or shard parts), name order
            _EpochShuffle(self.seed, self.epoch),       # same permutation on every rank, per epoch
            _SplitByRank(self.rank, self.world_size),   # ... then the node split
            wds.split_by_worker,                        # ... then the worker split
            _Cycle(urls, c),                            # repeat: no worker runs dry before the cut
            wds.pipelinefilter(expand_tars)(handler),
            wds.pipelinefilter(group_samples)(handler),
            _Parse(self.info.num_samples, self.info.num_classes, c, keep=self.keep_mask),  # pre-decode
            _SampleShuffle(self.shuffle_buffer, self.seed, self.epoch, self.rank, c)
            if self.shuffle_buffer > 1 else None,
            _Decode(self.transform, c, skip=True),
            _Batch(self.batch_size, c, partial=False),
        )

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        # A seeded generator makes the workers' base seed (torch/random/numpy, for augmentation)
        # a function of (seed, epoch, rank) instead of the main process's RNG state.
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.rank) % (2**62))
        _check_pil()
        last: Dict[int, np.ndarray] = {}
        done = 0
        stream = _stream(self.pipeline(), self.num_workers, generator=gen, mp_context=self.mp_context)
        try:
            for b in stream:
                snap = b["stats"]
                last[int(snap[0])] = snap
                done += 1
                yield _unpack(b)
                if done == self.steps:  # the epoch's cut (with_epoch at the loader level)
                    break
        finally:
            stream.close()
            # Also when the consumer stops early (a preempted epoch closes this generator).
            s = _sum_stats(last)
            self._stats = {"steps": done, "seen": done * self.batch_size, **s,
                           "workers": max(1, self.num_workers)}
        if done < self.steps:
            # Cannot happen with cycling workers unless the stream died; fail loudly, not by hanging
            # the other ranks in their next collective... which is all a single rank can do.
            raise DataError(f"rank {self.rank}: the shard stream ended after {done} of {self.steps} steps")
        if s["corrupt"] or s["errors"]:
            log.warning("epoch %d rank %d: skipped %d corrupt samples, %d stream errors (%s/%s)",
                        self.epoch, self.rank, s["corrupt"], s["errors"], self.info.root, self.info.split)

    def stats(self) -> Dict[str, Any]:
        """After an epoch, summed over this rank's workers: ``steps``, ``seen`` (rows yielded =
        steps x batch_size), and, as of each worker's last consumed batch, ``corrupt``
        (undecodable or malformed samples skipped before its last row), ``read`` (samples taken
        from the tar streams, including read-ahead: the shuffle buffer and up to DECODE_CHUNK
        samples waiting to be decoded), ``kept``, ``filtered`` (dropped by keep_idx, never decoded),
        ``errors`` (stream-level), ``passes`` (most passes any worker made over its shards),
        ``fallback`` (workers that had to read all shards), ``workers``."""
        return dict(self._stats)


def train_loader(info: SplitInfo, *, transform: Callable, batch_size: int, epoch: int, seed: int,
                 rank: int, world_size: int, num_workers: int, shuffle_buffer: int,
                 keep_idx: Optional[Iterable[int]] = None, steps: Optional[int] = None,
                 share_shards: bool = True, mp_context: Optional[str] = None) -> TrainLoader:
    """One training epoch over ``info``'s split, ``steps`` full batches on every rank.

    ``keep_idx`` (the clean subset) is applied before decoding; ``steps`` defaults to
    ``max(1, len(keep_idx or split) // (batch_size * world_size))``. With fewer shards than
    ``world_size * max(1, num_workers)`` readers, shards are shared in interleaved parts (a warning
    says so), or, with ``share_shards=False``, DataError. DataError too when ``keep_idx`` is empty.

    >>> ld = train_loader(info, transform=aug, batch_size=32, epoch=e, seed=0,   # doctest: +SKIP
    ...                   rank=dist.rank(), world_size=dist.world_size(), num_workers=2,
    ...                   shuffle_buffer=1000, keep_idx=subset)
    >>> for b in ld:
    ...     loss = engine(b["image"], b["cls"]); engine.backward(loss); engine.step()
    >>> ld.stats()["corrupt"]
    0
    """
    return TrainLoader(info, transform=transform, batch_size=batch_size, epoch=epoch, seed=seed,
                       rank=rank, world_size=world_size, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, keep_idx=keep_idx, steps=steps,
                       share_shards=share_shards, mp_context=mp_context)
