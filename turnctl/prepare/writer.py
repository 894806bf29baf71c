"""Deterministic WebDataset shards and crash-safe output directories.

Shards are plain tar files whose headers carry no time, user or host (mtime 0, uid/gid 0, empty
user names, mode 0644), so the same samples give the same bytes and the same sha256 anywhere.
Every file is written under a temporary name and renamed; the whole dataset is written into
``<out>.partial-<pid>`` and renamed to ``<out>`` only once ``manifest.json`` (the last file) is in
place, so an interrupted prepare never leaves something that looks complete.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> w = SplitWriter(d, "train", shard_size=2)
    >>> for i in range(3):
    ...     w.add(f"s{i}", "png", b"x", idx=i, label=0, clean=None)
    >>> [(s["file"], s["count"]) for s in w.close()]
    [('train-000000.tar', 2), ('train-000001.tar', 1)]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from turnctl.errors import DataError
from turnctl.logger import log


def shard_name(split: str, number: int) -> str:
    """``<split>-NNNNNN.tar``.

    >>> shard_name("val", 3)
    'val-000003.tar'
    """
    return f"{split}-{number:06d}.tar"


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's record size: archives end padded to a multiple of it


def _header(name: str, size: int) -> bytes:
    """A tar header for a regular file with fixed metadata (mtime 0, uid/gid 0, mode 0644).

    tarfile builds headers in pure Python with a deep copy per member, which was most of the cost
    of writing small-image shards; a ustar header is a fixed layout, so short ASCII names get one
    assembled directly (byte-identical to tarfile's ustar output). Long or non-ASCII names use
    tarfile's PAX encoding.
    """
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not raw or len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = b"".join((
        raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
        b"00000000000\0", b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 64,
        b"\0" * 16, b"\0" * 155,  # devmajor + devminor (unset for regular files), prefix
    )).ljust(_BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Shard:
    """One tar file being written under a temp name, hashed as it is written."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.fh = open(tmp, "wb")
        self.sha = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> None:
        self.write(b"".join((_header(name, len(data)), data, b"\0" * (-len(data) % _BLOCK))))

    def finish(self, final: Path) -> str:
        end = self.offset + 2 * _BLOCK  # two zero blocks end the archive, then pad to a record
        self.write(b"\0" * (2 * _BLOCK + (-end) % _RECORD))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, final)
        return self.sha.hexdigest()


class SplitWriter:
    """Writes one split's samples into equal-size shards (the last one may be short)."""

    def __init__(self, directory: Path, split: str, *, shard_size: int):
        self.directory, self.split, self.shard_size = Path(directory), split, shard_size
        self.count = 0
        self.shards: List[Dict[str, Any]] = []
        self._shard: Optional[_Shard] = None

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._shard = _Shard(self.directory / f".{name}.tmp")
        self.shards.append({"file": name, "count": 0, "split": self.split})

    def _close_current(self) -> None:
        if self._shard is None:
            return
        path = self.directory / self.shards[-1]["file"]
        self.shards[-1]["sha256"] = self._shard.finish(path)
        self.shards[-1]["bytes"] = path.stat().st_size  # lets readers catch a truncated copy by a stat
        self._shard = None

    def add(self, key: str, ext: str, image: bytes, *, idx: int, label: int, clean: Optional[int],
            train_idx: Optional[int] = None) -> None:
        """Append one sample: ``<key>.<ext>``, ``<key>.cls``, ``<key>.clean.cls`` (if known), ``<key>.idx``,
        ``<key>.train_idx`` (samples of a val split held out of train: their position there)."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        if self._shard is None or self.shards[-1]["count"] == self.shard_size:
            self._close_current()
            self._open_next()
        self._shard.add(f"{key}.{ext}", image)
        self._shard.add(f"{key}.cls", str(int(label)).encode())
        if clean is not None and clean >= 0:
            self._shard.add(f"{key}.clean.cls", str(int(clean)).encode())
        self._shard.add(f"{key}.idx", str(int(idx)).encode())
        if train_idx is not None:
            self._shard.add(f"{key}.train_idx", str(int(train_idx)).encode())
        self.shards[-1]["count"] += 1
        self.count += 1

    def close(self) -> List[Dict[str, Any]]:
        """Finish the last shard; returns ``[{"file", "count", "split", "sha256", "bytes"}, ...]``."""
        self._close_current()
        return self.shards


def write_json(path: Path, obj: Any) -> None:
    """JSON to ``path`` through a temp file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(out: Path) -> Path:
    """A fresh ``<out>.partial-<pid>``; leftovers of dead earlier runs are removed (and logged)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f"{out.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            log.warning("removing %s left by an interrupted prepare", old)
            shutil.rmtree(old, ignore_errors=True)
    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    return partial


def commit_dir(partial: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished ``partial`` to ``out``; an old ``out`` is replaced only now (``overwrite``)."""
    out = Path(out)
    check_out(out, overwrite=overwrite)
    old = None
    if out.is_dir():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
