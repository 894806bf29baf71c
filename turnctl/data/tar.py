"""Shard tar files -> member dicts -> sample dicts: a fast, streaming drop-in for webdataset's.

:func:`expand_tars` yields the same stream as ``webdataset.tariterators.tar_file_expander``
(member dicts, then ``{}`` at the end of each shard) and :func:`group_samples` groups it by key
as webdataset does. The tar reader (:func:`iter_tar`) is a small ustar/gnu/pax parser: Python's
``tarfile`` costs ~0.1 ms per member, more than decoding a small JPEG, and would cap a worker at
~40% of PIL's decode rate (see benchmarks/bench_reader.py). Only the members the reader uses
(images, ``idx``, ``cls``, ``clean.cls``; for a ``turnctl index`` dataset the images and its label
member) are read; every other member is skipped unread, so a ``.pyd``/``.pickle`` member is never
even loaded. Samples of shards without an ``idx`` member are numbered by their position in the
shard (:func:`numbered_members`), the rule ``turnctl index`` assigns idx by.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from turnctl.data.format import IDX_TAR_ORDER, IMAGE_EXTS, SampleLayout

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


def member_key(name: str) -> Optional[Tuple[str, str]]:
    """``(key, extension)`` of a tar member by webdataset's rule (the key ends at the first dot of
    the last path component; the extension is lower-cased), None for a name without one.

    >>> member_key("a/b_1.clean.CLS"), member_key("README"), member_key("x/.hidden")
    (('a/b_1', 'clean.cls'), None, None)
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


def numbered_members(members: Iterable[Tuple[str, bytes]]) -> Iterator[Tuple[str, bytes, int]]:
    """``(name, data, position)``: the position of the member's sample in the shard, counting runs
    of consecutive members with the same key from 0 (:func:`group_samples`' grouping; members
    without a key are dropped, as it drops them). ``turnctl index`` numbers samples this way over
    all members, the reader over the members it reads: the same numbers whenever every sample has
    a member the reader reads, which index checks."""
    pos, last = -1, None
    for name, data in members:
        kx = member_key(name)
        if kx is None:
            continue
        if kx[0] != last:
            pos, last = pos + 1, kx[0]
        yield name, data, pos


def layout_suffixes(layout: Optional[SampleLayout]) -> Tuple[str, ...]:
    """The member suffixes the reader reads for ``layout`` (prepare's shards when None)."""
    if layout is None or layout.idx != IDX_TAR_ORDER:
        if layout is not None and ("." + layout.label_member) not in _WANTED_SUFFIXES:
            return _WANTED_SUFFIXES + ("." + layout.label_member,)
        return _WANTED_SUFFIXES
    return tuple("." + e for e in IMAGE_EXTS) + ("." + layout.label_member,)


def expand_tars(src: Iterable[Dict[str, Any]], handler: Callable[[BaseException], bool],
                layout: Optional[SampleLayout] = None):
    """``{"url": path}`` dicts -> member dicts ``{"fname", "data", "__url__"}``, then ``{}`` per shard.

    Same output contract as ``webdataset.tariterators.tar_file_expander`` (the end-of-shard ``{}``
    included); only the members the reader uses (for ``layout``, default: prepare's) are read.
    For a tar-order ``layout`` each member dict also holds ``__pos__``, its sample's position in
    the shard (:func:`numbered_members`), from which the reader derives idx. Local paths only.
    """
    suffixes = layout_suffixes(layout)
    numbered = layout is not None and layout.idx == IDX_TAR_ORDER
    for source in src:
        url = source["url"]
        part, parts = source.get("part", 0), source.get("parts", 1)
        try:
            with open(url, "rb", buffering=1 << 20) as f:
                if numbered:
                    for name, data, pos in numbered_members(iter_tar(f, suffixes)):
                        if pos % parts == part:
                            yield {"fname": name, "data": data, "__url__": url, "__pos__": pos}
                else:
                    members = iter_tar(f, suffixes)
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
        # A new sample starts where the key changes, or (numbered members) the position does:
        # two samples of a shard that share a key stay apart when a shard part skips the ones between.
        if current is None or current["__key__"] != key or ("__pos__" in f and current["__pos__"] != f["__pos__"]):
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": f["__url__"]}
            if "__pos__" in f:  # tar-order numbering (expand_tars with an index layout)
                current["__pos__"] = f["__pos__"]
        if ext in current:
            handler(ValueError(f"{fname}: duplicate member in {f['__url__']} (kept the first)"))
            continue
        current[ext] = f["data"]
    if current is not None:
        yield current
