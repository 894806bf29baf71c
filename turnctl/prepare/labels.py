"""Label files: CIFAR-N human labels (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``) and ``key,label`` CSVs.

CIFAR-N files are ``torch.save`` archives of a dict of int64 numpy arrays of length 50,000 in the
original CIFAR training order (CIFAR-10N: ``aggre_label``, ``worse_label``, ``random_label1..3``,
``clean_label``; CIFAR-100N: ``noisy_label``, ``clean_label``). They are read without executing
arbitrary pickle (:func:`turnctl.safeload.load_torch_file`). Short names work::

    human:aggre -> aggre_label    human:worse -> worse_label    human:random2 -> random_label2
    human:noisy -> noisy_label (CIFAR-100N)

    >>> resolve_label_set(["aggre_label", "random_label1"], "random1")
    'random_label1'
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from turnctl.errors import DataError
from turnctl.safeload import load_torch_file
from turnctl.prepare.source import check_range, is_int_text, sanitize_key


def resolve_label_set(available: Iterable[str], name: str) -> Optional[str]:
    """The key of ``available`` that ``name`` means (exact, ``<name>_label``, ``randomN``), or None."""
    available = list(available)
    m = re.fullmatch(r"random_?(\d)", name)
    for candidate in (name, f"{name}_label", f"random_label{m.group(1)}" if m else None):
        if candidate in available:
            return candidate
    return None


def load_human_labels(path: Path, *, name: str, num_samples: int, num_classes: int
                      ) -> Tuple[np.ndarray, str, Optional[np.ndarray]]:
    """(labels, resolved key, clean labels or None) from a CIFAR-N file, validated.

    ``num_samples`` is the size of the official training set the labels index by position; a
    length mismatch, an unknown label set or an out-of-range label is a one-line DataError.
    """
    path = Path(path)
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict of label arrays, found {type(obj).__name__}")
    keys = [str(k) for k in obj]
    key = resolve_label_set(keys, name)
    if key is None:
        raise DataError(f"{path}: no label set {name!r} (available: {', '.join(keys)})")

    def array(k: str) -> np.ndarray:
        a = np.asarray(obj[k])
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: '{k}' must be a 1-D integer array, found {a.dtype} {a.shape}")
        if len(a) != num_samples:
            raise DataError(f"{path}: '{k}' has {len(a)} labels but the dataset's official training set "
                            f"has {num_samples} (wrong file for this dataset?)")
        check_range(a, num_classes=num_classes, where=f"{path} '{k}'")
        return a.astype(np.int64)

    labels = array(key)
    clean = array("clean_label") if "clean_label" in keys and key != "clean_label" else None
    return labels, key, clean


def load_csv_labels(path: Path, *, num_classes: int) -> Dict[str, int]:
    """``key,label`` rows (an optional header line is skipped) as {sanitised key: label}.

    Keys go through the same sanitising as sample keys, so image paths (``images/0/a.jpg``) and
    shard keys (``images_0_a_jpg``) both work. Bad rows are one-line DataErrors naming ``file:line``.
    The file must be UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped. Labels are
    ASCII digits only.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading BOM is dropped
    except UnicodeDecodeError as exc:
        at = exc.start + (len(data) - len(exc.object))  # the file offset, a BOM included
        line = data[:at].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); "
                        f"save it as UTF-8") from None
    out: Dict[str, int] = {}
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        for lineno, row in enumerate(rows, 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{lineno}: expected 'key,label', found {','.join(row)[:80]!r}")
            key, value = row[0].strip(), row[1].strip()
            if not is_int_text(value):
                # a header such as "key,label": no digit of any script ('²' is a bad label, not a header)
                if lineno == 1 and not out and not any(ch.isdigit() for ch in value):
                    continue
                raise DataError(f"{path}:{lineno}: label {value!r} of key {key!r} is not an integer "
                                f"(ASCII digits)")
            label = int(value)
            if not 0 <= label < num_classes:
                raise DataError(f"{path}:{lineno}: label {label} of key {key!r} is outside 0..{num_classes - 1}")
            skey = sanitize_key(key)
            if skey in out:
                raise DataError(f"{path}:{lineno}: key {key!r} appears twice")
            out[skey] = label
    except csv.Error as exc:  # e.g. a NUL byte: not a text file
        raise DataError(f"{path}:{rows.line_num}: not a 'key,label' CSV ({exc})") from None
    if not out:
        raise DataError(f"{path}: no 'key,label' rows")
    return out
