"""An export directory on disk: its format and file names, what may be replaced (only a directory
turnctl wrote, never a link's target or a user's directory), the atomic swap of a fully written
temporary into place, and write failures (a full disk) turned into an OSError that names the path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from turnctl.models.families import ModelError

EXPORT_FORMAT = "turnctl-backbone/1"
META_FILE = "turnctl.json"
HEAD_FILE = "head.safetensors"

# What an export directory holds: transformers' config and weights (sharded as model-0000i-of-0000n plus
# an index for big models), turnctl's head, image-processor config and turnctl.json.
_EXPORT_FILE = re.compile(r"(config|preprocessor_config|generation_config|turnctl)\.json|head\.safetensors|"
                          r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


def check_replaceable(final: Path) -> None:
    """Raise a one-line :class:`ModelError` unless ``final`` is absent or an export turnctl wrote.

    Writing an export replaces (deletes) what is there: only a real directory holding a turnctl.json
    of this format and nothing but the files an export holds is replaced, never a symbolic link's
    target or a directory of the user's that happens to have the name.
    """
    final = Path(final)
    if final.is_symlink():
        raise ModelError(f"{final}: is a symbolic link (to {os.readlink(final)}); turnctl replaces only exports it "
                         f"wrote, never what a link points to: remove the link or write elsewhere")
    if not final.exists():
        return
    if not final.is_dir():
        raise ModelError(f"{final}: exists and is not a directory; turnctl will not replace it: move it away")
    try:
        meta = json.loads((final / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{final}: exists and is not a turnctl export (no {META_FILE} of format {EXPORT_FORMAT}); "
                         f"turnctl will not delete it: move it away or write elsewhere")
    foreign = sorted(e.name for e in os.scandir(final)
                     if not e.is_file(follow_symlinks=False) or not _EXPORT_FILE.fullmatch(e.name))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ModelError(f"{final}: holds {foreign[0]!r}{more}, which turnctl does not write into an export; "
                         f"turnctl will not delete it: move it away or write elsewhere")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp directory into place (readers never see a half export)."""
    old = None
    if final.exists() or final.is_symlink():
        check_replaceable(final)
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous export back rather than leave none
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _nearly_full(path: Path) -> bool:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < (16 << 20)
    except OSError:
        return False


def write_error(exc: BaseException, path) -> Optional[OSError]:
    """``exc``, raised while writing under ``path``, as an OSError that names a file; None when it is
    not an I/O failure.

    None of the writers says which file failed on a full disk: a plain write's failed flush is an
    OSError without a filename, safetensors raises ``SafetensorError('... (os error 28)')`` and
    torch.save's zip writer ``RuntimeError('[enforce fail at inline_container.cc] ... unexpected
    pos ...')`` without an errno (a full disk when the disk is full after it, else EIO). The CLI can
    only name the file when the exception carries it.
    """
    if isinstance(exc, OSError):
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", text)
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), str(path))
        return None
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        code = errno.ENOSPC if _nearly_full(path) else errno.EIO
        return OSError(code, os.strerror(code), str(path))
    return None


def remove_tmp(tmp: Path) -> None:
    try:
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # the failure being raised is the one to report
        pass
