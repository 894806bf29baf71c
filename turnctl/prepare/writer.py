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
import io
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


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SplitWriter:
    """Writes one split's samples into equal-size shards (the last one may be short)."""

    def __init__(self, directory: Path, split: str, *, shard_size: int):
        self.directory, self.split, self.shard_size = Path(directory), split, shard_size
        self.count = 0
        self.shards: List[Dict[str, Any]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._tmp: Optional[Path] = None

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.directory / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self.shards.append({"file": name, "count": 0, "split": self.split})

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.directory / self.shards[-1]["file"]
        os.replace(self._tmp, final)
        self.shards[-1]["sha256"] = sha256_file(final)
        self._tar = None

    def add(self, key: str, ext: str, image: bytes, *, idx: int, label: int, clean: Optional[int]) -> None:
        """Append one sample: ``<key>.<ext>``, ``<key>.cls``, ``<key>.clean.cls`` (if known), ``<key>.idx``."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        if self._tar is None or self.shards[-1]["count"] == self.shard_size:
            self._close_current()
            self._open_next()
        members = [(ext, image), ("cls", str(int(label)).encode())]
        if clean is not None and clean >= 0:
            members.append(("clean.cls", str(int(clean)).encode()))
        members.append(("idx", str(int(idx)).encode()))
        for suffix, data in members:
            self._tar.addfile(_member(f"{key}.{suffix}", data), io.BytesIO(data))
        self.shards[-1]["count"] += 1
        self.count += 1

    def close(self) -> List[Dict[str, Any]]:
        """Finish the last shard; returns ``[{"file", "count", "split", "sha256"}, ...]``."""
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
