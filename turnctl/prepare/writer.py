"""Deterministic WebDataset shards and crash-safe output directories.

Shards are plain tar files whose headers carry no time, user or host (mtime 0, uid/gid 0, empty
user names, mode 0644), so the same samples give the same bytes and the same sha256 anywhere.
Every file is written under a temporary name and renamed; the whole dataset is written into
``<out>.partial-<pid>`` and renamed to ``<out>`` only once ``manifest.json`` (the last file) is in
place, so an interrupted prepare never leaves something that looks complete.

``--overwrite`` only ever deletes what turnctl wrote: a directory with a turnctl manifest, or one
holding nothing but names turnctl writes (shards, their temporary names, ``sizes.json``, the
hold-out spool), as an interrupted run leaves them. A user's folder given as ``--out`` by mistake
is refused. The partial directory is created (and a probe file written) before any image is read,
so an unwritable ``--out`` is found in a second, not after an hour; a write that fails (disk full)
is a :class:`WriteFailed` naming the file, and the caller removes the partial directory.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> w = SplitWriter(d, "train", shard_size=2)
    >>> for i in range(3):
    ...     w.add(f"s{i}", "png", b"x", idx=i, label=0, clean=None)
    >>> [(s["file"], s["count"]) for s in w.close()]
    [('train-000000.tar', 2), ('train-000001.tar', 1)]
    >>> import shutil; shutil.rmtree(d)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from turnctl.data.format import FORMAT
from turnctl.errors import DataError
from turnctl.logger import log

SPOOL_NAME = ".train-before-holdout.spool"  # valsplit's spool of encoded train images
# The names an interrupted prepare can leave in its output directory. Not manifest.json: it is
# written last, so a directory with one is finished (and then only the "format" says whose it is).
_OWN_NAMES = re.compile(r"(?:train|val|test)-\d{6}\.tar|\.(?:train|val|test)-\d{6}\.tar\.tmp"
                        r"|sizes\.json|\.(?:sizes|manifest)\.json\.tmp|\.probe-\d+|sources\.jsonl|\.sources\.jsonl\.tmp|"
                        + re.escape(SPOOL_NAME))


class WriteFailed(DataError):
    """Writing ``path`` (under the output directory) failed: disk full, quota, I/O error, read-only."""

    def __init__(self, path: Path, exc: OSError):
        self.path, self.errno = Path(path), exc.errno
        self.strerror = exc.strerror or str(exc)
        super().__init__(f"{self.path}: {self.strerror}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError of the block into :class:`WriteFailed` naming ``path`` (a bare ``write()``
    error carries no file name)."""
    try:
        yield
    except OSError as exc:
        raise WriteFailed(path, exc) from None


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


class _Shard:
    """One tar file being written under a temp name, hashed as it is written."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        with writing(tmp):
            self.fh = open(tmp, "wb")
        self.sha = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as exc:
            self.abandon()
            raise WriteFailed(self.tmp, exc) from None
        self.sha.update(data)
        self.offset += len(data)

    def abandon(self) -> None:
        """Close the file after a failed write (the caller removes the whole directory)."""
        with contextlib.suppress(OSError):
            self.fh.close()

    def add(self, name: str, data: bytes) -> None:
        self.write(b"".join((_header(name, len(data)), data, b"\0" * (-len(data) % _BLOCK))))

    def finish(self, final: Path) -> str:
        end = self.offset + 2 * _BLOCK  # two zero blocks end the archive, then pad to a record
        self.write(b"\0" * (2 * _BLOCK + (-end) % _RECORD))
        try:  # a full disk often only shows here: buffered bytes meet the disk at flush / fsync
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, final)
        except OSError as exc:
            self.abandon()
            raise WriteFailed(self.tmp, exc) from None
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

    def abandon(self) -> None:
        """Close the open shard after a failure elsewhere (the caller removes the directory)."""
        if self._shard is not None:
            self._shard.abandon()
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
    with writing(tmp):
        with open(tmp, "w") as fh:
            fh.write(json.dumps(obj, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def is_turnctl_output(directory: Path) -> bool:
    """True when ``directory`` holds a manifest.json of :data:`FORMAT` (a finished prepare)."""
    try:
        meta = json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def holds_only_turnctl_files(directory: Path) -> bool:
    """True when every entry of ``directory`` is a plain file with a name turnctl prepare writes
    (an interrupted prepare's leftovers), or there is none."""
    try:
        with os.scandir(directory) as it:
            return all(e.is_file(follow_symlinks=False) and _OWN_NAMES.fullmatch(e.name) for e in it)
    except OSError:
        return False


def _entries(directory: Path) -> List[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as exc:
        raise DataError(f"--out {directory}: cannot list it ({exc.strerror or exc})") from None


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` and turnctl wrote it (checked
    before any work, and again just before the old output is replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    if os.path.ismount(out):  # the rename at the end would fail with EBUSY, after all the work
        raise DataError(f"--out {out} is a mount point and cannot be replaced (the finished output is renamed "
                        f"into place); use a folder inside it, e.g. --out {out / 'shards'}")
    entries = _entries(out)
    if not entries:
        return
    if is_turnctl_output(out) or holds_only_turnctl_files(out):
        if not overwrite:
            raise DataError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise DataError(f"--out {out} is not empty and was not written by turnctl prepare (no manifest.json of "
                    f"format {FORMAT}; it holds {shown}): turnctl replaces only its own output, even with "
                    f"--overwrite; choose another --out or empty it yourself")


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_apart(out: Path, root: Path) -> None:
    """Refuse an ``out`` that is ``root``, inside it or above it (symlinks resolved): replacing or
    writing into it would delete or mix into the raw data."""
    o, r = Path(out).resolve(), Path(root).resolve()
    if o == r:
        where = "is"
    elif _inside(o, r):
        where = "is inside"
    elif _inside(r, o):
        where = "contains"
    else:
        return
    via_link = o == r and (Path(out).absolute() != o or Path(root).absolute() != r)
    raise DataError(f"--out {out} {where} --root {root}{f' (both resolve to {o})' if via_link else ''}: "
                    f"shards must go to a folder apart from the raw data; choose another --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_leftovers(out: Path, kind: str) -> Iterator[Path]:
    """``<out>.<kind>-<pid>`` directories of processes that are gone (or of this pid)."""
    for old in out.parent.glob(f"{glob.escape(out.name)}.{kind}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))) and old.is_dir() \
                and not old.is_symlink():
            yield old


def staging_dir(out: Path) -> Path:
    """A fresh, writable ``<out>.partial-<pid>``, created (and probed with a small file) before any
    long work; leftovers of dead earlier runs that hold only turnctl's files are removed."""
    out = Path(out)
    created = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {out}: cannot create {out.parent} ({exc.strerror or exc})") from None
    for old in _dead_leftovers(out, "partial"):
        if holds_only_turnctl_files(old):
            log.warning("removing %s left by an interrupted prepare", old)
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning("leaving %s alone: it is named like turnctl's partial output but holds other files", old)
    if out.is_dir() and is_turnctl_output(out):  # a run killed after its commit, before the cleanup
        for old in _dead_leftovers(out, "old"):
            if is_turnctl_output(old):
                log.warning("removing %s, the output an interrupted prepare replaced", old)
                shutil.rmtree(old, ignore_errors=True)
    partial = out.parent / f"{out.name}.partial-{os.getpid()}"
    if partial.exists():
        raise DataError(f"--out {out}: {partial} exists and holds files turnctl did not write; move it away")
    try:
        partial.mkdir()
    except OSError as exc:
        raise DataError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc}); "
                        f"choose a writable --out") from None
    _CREATED[partial] = created
    probe = partial / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"turnctl")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        discard(partial)
        raise DataError(f"--out {out}: cannot write in {partial} ({exc.strerror or exc}); "
                        f"choose a writable --out") from None
    return partial


_CREATED: Dict[Path, List[Path]] = {}  # partial directory -> the parents staging_dir had to create


def discard(partial: Path) -> None:
    """Remove ``partial`` and the parent folders :func:`staging_dir` created for it (if empty):
    a failed prepare leaves nothing behind."""
    shutil.rmtree(partial, ignore_errors=True)
    for d in _CREATED.pop(Path(partial), []):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def bytes_under(directory: Path) -> int:
    """Total size of the files under ``directory`` (0 when it is gone)."""
    total = 0
    for dirpath, _, files in os.walk(directory):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def commit_dir(partial: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished ``partial`` to ``out``; an old ``out`` is replaced only now (``overwrite``)."""
    out = Path(out)
    check_out(out, overwrite=overwrite)
    old = None
    try:
        if out.is_dir():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(partial, out)
    except OSError as exc:
        if old is not None and not out.exists():
            with contextlib.suppress(OSError):
                os.replace(old, out)  # the old output stays where it was
        raise WriteFailed(out, exc) from None
    _CREATED.pop(Path(partial), None)
    if old is not None:
        _remove(old)
