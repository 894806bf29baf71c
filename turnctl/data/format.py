"""The on-disk contract between ``turnctl prepare`` and every reader (docs/ARCHITECTURE.md).

One home for what a prepared dataset directory must look like: the manifest format strings
(:data:`FORMAT`, which turnctl/prepare/writer.py writes, and :data:`INDEX_FORMAT`, which ``turnctl
index`` writes next to shards it did not write), the image member extensions, the schema of
``manifest.json`` / ``sizes.json`` (pydantic, one line naming the file and field), the size limits
checked before either is read, the shard-name rule, the shard hash, where a sample's idx and label
come from (:class:`SampleLayout`, :func:`read_label`), and :func:`open_split`, which checks all of
it and returns a :class:`SplitInfo`.

Imported by prepare as well as by the readers, so it stays light: no torch, no webdataset, no PIL.

    >>> FORMAT
    'turnctl-shards/1'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Mapping, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from turnctl.errors import DataError

FORMAT = "turnctl-shards/1"  # manifest.json's "format"
# The format of a manifest `turnctl index` wrote beside shards it did not write (plain webdataset
# TarWriter output). Read exactly like FORMAT; a format of its own so that `turnctl prepare
# --overwrite` (which replaces only a FORMAT directory) never deletes a user's shards, and so that
# `turnctl index` knows which manifest.json it may replace.
INDEX_FORMAT = "turnctl-index/1"
READABLE_FORMATS = (FORMAT, INDEX_FORMAT)
# The members that carry the image, by extension; a sample's other members are ASCII integers.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# splits.<name>.idx: where a sample's idx comes from. "member" (prepare; also when absent): its
# ``idx`` member. "tar_order" (index): the shard's ``first_idx`` (manifest ``shards.<file>``) plus
# the sample's position in its shard; shards in name order, so idx runs 0..N-1 over the split.
IDX_MEMBER = "member"
IDX_TAR_ORDER = "tar_order"
# splits.<name>.label_field: the member holding the given label as an ASCII integer (default
# "cls"), or "json:FIELD", an integer under the top-level key FIELD of the sample's ``json`` member.
DEFAULT_LABEL_FIELD = "cls"
JSON_LABEL_PREFIX = "json:"
_MEMBER_NAME = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")


def check_label_field(label_field: str) -> str:
    """``label_field`` if it names a label member or a json field; ValueError saying why not.

    >>> check_label_field("cls"), check_label_field("json:label")
    ('cls', 'json:label')
    >>> check_label_field("jpg")
    Traceback (most recent call last):
    ...
    ValueError: label field 'jpg' is an image member; give the member that holds the label (cls) or json:FIELD
    """
    if label_field.startswith(JSON_LABEL_PREFIX):
        if not label_field[len(JSON_LABEL_PREFIX):]:
            raise ValueError("label field 'json:' names no field; write json:FIELD, e.g. json:label")
        return label_field
    if label_field in IMAGE_EXTS:
        raise ValueError(f"label field {label_field!r} is an image member; give the member that holds the "
                         "label (cls) or json:FIELD")
    if label_field in ("idx", "json") or not _MEMBER_NAME.fullmatch(label_field):
        raise ValueError(f"label field {label_field!r} is not a member extension (lower case, e.g. cls) "
                         "or json:FIELD")
    return label_field


def read_label(sample: Mapping[str, bytes], label_field: str) -> int:
    """The given label of ``sample`` (member extension -> bytes) under ``label_field``.

    The one parser of labels of indexed shards, used by ``turnctl index`` when it checks them and
    by the reader (turnctl/data/stages.py) when it trains on them, so the two never disagree.
    KeyError when the member is missing, ValueError when it holds no integer (the message says what
    it holds). Nothing is unpickled; a json member is parsed as JSON only.

    >>> read_label({"cls": b"7"}, "cls"), read_label({"json": b'{"label": 3}'}, "json:label")
    (7, 3)
    >>> read_label({"json": b'{"label": "cat"}'}, "json:label")
    Traceback (most recent call last):
    ...
    ValueError: json field 'label' is 'cat', not an integer
    """
    if label_field.startswith(JSON_LABEL_PREFIX):
        name = label_field[len(JSON_LABEL_PREFIX):]
        if "json" not in sample:
            raise KeyError("no json member")
        try:
            obj = json.loads(sample["json"])
        except (ValueError, RecursionError) as exn:
            raise ValueError(f"the json member is not valid JSON ({exn})") from None
        if not isinstance(obj, dict) or name not in obj:
            raise KeyError(f"the json member has no field {name!r}")
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"json field {name!r} is {_shown(value)}, not an integer")
        return value
    if label_field not in sample:
        raise KeyError(f"no {label_field} member")
    raw = sample[label_field]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"the {label_field} member holds {_shown(bytes(raw[:40]))}, not an ASCII integer") from None


@dataclass(frozen=True)
class SampleLayout:
    """Where the reader finds a split's idx and given label (its only per-dataset switches).

    The default is prepare's shards: an ``idx`` member, ``cls`` and ``clean.cls`` members.
    ``turnctl index`` datasets number samples in tar order (``shards``: (file name, first idx,
    count) per shard) and read the label from ``label_field``; they have no true labels.
    """

    idx: str = IDX_MEMBER
    label_field: str = DEFAULT_LABEL_FIELD
    shards: Tuple[Tuple[str, int, int], ...] = ()
    clean_member: Optional[str] = "clean.cls"

    @property
    def label_member(self) -> str:
        """The member extension the label is read from (``json`` for a json field)."""
        return "json" if self.label_field.startswith(JSON_LABEL_PREFIX) else self.label_field


@dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared dataset, validated against its manifest.

    ``shard_paths`` / ``shard_sizes`` are in shard-name order (``train-000000.tar`` first).
    ``fingerprint`` is a sha256 over the split's shard names, sample counts and the shards' sha256
    as recorded in the manifest: caches of per-sample results (features) key on it, so a
    re-prepared dataset never reuses a stale cache. ``layout`` says where the reader finds each
    sample's idx and label (an ``idx`` member, or tar order for ``turnctl index`` datasets).
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
    layout: SampleLayout = SampleLayout()

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
# The key -> source path map of file-based datasets (``turnctl prepare`` of imagefolder, Clothing1M,
# WebVision): one JSON line per written sample, ``{"split", "idx", "key", "source"}``, the source
# path relative to the manifest's ``sources.root``. A sidecar, not a manifest field, because it grows
# with the dataset (WebVision 1.0: 2.4M lines of ~110 bytes, ~0.26 GB) while every rank reads the
# manifest; only the report reads it, and refuses one larger than this (about 2x WebVision).
SOURCES_FILE = "sources.jsonl"
MAX_SOURCES_BYTES = 512 << 20

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
    first_idx: Optional[int] = Field(default=None, strict=True, ge=0)  # idx "tar_order" only


class _SplitMeta(_Meta):
    count: Optional[int] = _Count
    # The list of shard names, or (older manifests) just their number.
    shards: Any = None
    has_clean: bool = False
    idx: Optional[str] = None  # IDX_MEMBER when absent
    label_field: Optional[str] = None  # DEFAULT_LABEL_FIELD when absent

    @field_validator("idx")
    @classmethod
    def _idx_source(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in (IDX_MEMBER, IDX_TAR_ORDER):
            raise ValueError(f"expected {IDX_MEMBER!r} or {IDX_TAR_ORDER!r}, got {_shown(v)}")
        return v

    @field_validator("label_field")
    @classmethod
    def _label_field(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else check_label_field(v)

    @field_validator("shards")
    @classmethod
    def _names_or_number(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        if isinstance(v, list) and all(isinstance(n, str) for n in v):
            return v
        raise ValueError(f"expected a list of shard file names or their number, got {_shown(v)}")


class _SourceMapMeta(_Meta):
    """``source_map`` of the manifest: where :data:`SOURCES_FILE` is and what it must hold
    (absent in manifests of array datasets, of ``turnctl index`` and of older prepares)."""

    file: str
    count: int = _Count
    bytes: int = _Count
    sha256: Optional[str] = None

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if v != SOURCES_FILE:
            raise ValueError(f"expected {SOURCES_FILE!r}, got {_shown(v)}")
        return v


class _Manifest(_Meta):
    format: Optional[str] = None
    num_classes: int = Field(strict=True, ge=1)
    class_names: Optional[List[str]] = None
    splits: Dict[str, _SplitMeta]
    shards: Dict[str, _ShardMeta]
    source_map: Optional[_SourceMapMeta] = None


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
    if fmt is not None and fmt not in READABLE_FORMATS:
        raise DataError(f"{mpath}: format {fmt!r}, this turnctl reads {' or '.join(map(repr, READABLE_FORMATS))}")
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
            if want and sha256_file(p) != want:
                raise DataError(f"{p}: sha256 differs from manifest.json; the shard is corrupt or replaced")
    h = hashlib.sha256(f"{FORMAT}\n{split}\n".encode())
    for name, n in zip(names, counts):
        h.update(f"{name} {n} {shards_meta[name].get('sha256', '')}\n".encode())
    num_classes = manifest["num_classes"]
    class_names = tuple(str(c) for c in (manifest.get("class_names") or range(num_classes)))
    if len(class_names) != num_classes:
        raise DataError(f"{mpath}: num_classes / class_names missing or inconsistent")
    layout = _layout(mpath, split, sdesc, names, counts, shards_meta)
    return SplitInfo(
        root=root, split=split, shard_paths=tuple(paths), shard_sizes=tuple(counts),
        num_samples=total, num_classes=num_classes, class_names=class_names,
        has_clean=bool(sdesc.get("has_clean", False)) and layout.clean_member is not None,
        fingerprint=h.hexdigest(), manifest=manifest, layout=layout,
    )


def _layout(mpath: Path, split: str, sdesc: Mapping[str, Any], names: List[str], counts: List[int],
            shards_meta: Mapping[str, Any]) -> SampleLayout:
    """The split's :class:`SampleLayout`; for ``tar_order`` the recorded first idx of every shard
    must be the running count over the shards in name order (what ``turnctl index`` writes), so
    that idx covers 0..N-1 exactly once."""
    label_field = sdesc.get("label_field") or DEFAULT_LABEL_FIELD
    if (sdesc.get("idx") or IDX_MEMBER) == IDX_MEMBER:
        return SampleLayout(label_field=label_field)
    start, table = 0, []
    for name, n in zip(names, counts):
        first = shards_meta[name].get("first_idx")
        if first != start:
            raise DataError(f"{mpath}: shards.{name}.first_idx is {_shown(first)}, expected {start} (the samples "
                            f"of the {split!r} shards before it, in name order); re-run `turnctl index`")
        table.append((name, start, n))
        start += n
    return SampleLayout(idx=IDX_TAR_ORDER, label_field=label_field, shards=tuple(table), clean_member=None)


def manifest_format(path: Path) -> Optional[str]:
    """The ``format`` of the JSON object in ``path`` (None when it has none or is no JSON object),
    read under the manifest size limit; DataError when it cannot be read. For writers deciding
    whether a manifest.json is theirs to replace, before its schema matters."""
    raw = _read_json(Path(path), "manifest.json", MAX_MANIFEST_BYTES)
    fmt = raw.get("format") if isinstance(raw, dict) else None
    return fmt if isinstance(fmt, str) else None


def sha256_file(path: Path) -> str:
    """The shard hash recorded in the manifest (prepare hashes as it writes; ``verify=True`` rereads)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
