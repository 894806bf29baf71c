"""The ``key`` column of a report: each sample's ``__key__``, read back from the run's shards.

A selection file stores idx, not keys; the keys come from the shards' ``idx`` and ``cls`` members
(no image is decoded). The shards must still be the run's: a moved, missing or re-prepared dataset
leaves the column empty with a warning saying why, never filled with another dataset's names.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Optional, Tuple, Union

import numpy as np

from turnctl.data import iter_tar, open_split
from turnctl.data.format import IDX_TAR_ORDER, MAX_SOURCES_BYTES, SOURCES_FILE, read_label
from turnctl.data.tar import numbered_members
from turnctl.logger import printable_name
from turnctl.report.selection import Selection


def _read_idx_members(info: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(keys, given)`` per idx from the shards' ``idx`` and ``cls`` members only.

    Images are skipped by seeking past them (turnctl.data.iter_tar with a suffix filter), so
    this costs a header read per member, not a decode.
    """
    n = info.num_samples
    keys = np.full(n, "", dtype=object)
    given = np.full(n, -1, dtype=np.int64)
    if info.layout.idx == IDX_TAR_ORDER:
        return _read_tar_order(info, keys, given)

    def flush(key, idx, cls):
        if key is not None and idx is not None and 0 <= idx < n:
            keys[idx] = key
            if cls is not None:
                given[idx] = cls

    for shard in info.shard_paths:
        # A sample's members are contiguous in a shard (webdataset's grouping rule), in any order.
        key = idx = cls = None
        with open(shard, "rb", buffering=1 << 20) as f:
            for name, data in iter_tar(f, (".idx", ".cls")):
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)  # webdataset's key rule, as turnctl.data.tar.group_samples
                if dot <= slash + 1:
                    continue
                k, ext = name[:dot], name[dot + 1:].lower()
                if k != key:
                    flush(key, idx, cls)
                    key, idx, cls = k, None, None
                try:
                    if ext == "idx":
                        idx = int(data)
                    elif ext == "cls":  # not clean.cls
                        cls = int(data)
                except ValueError:
                    pass  # a malformed member: the reader counts such samples as corrupt
        flush(key, idx, cls)
    return keys, given


def _read_tar_order(info: Any, keys: np.ndarray, given: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(keys, given)`` of ``turnctl index`` shards: idx = the shard's first idx + the sample's
    position, the label from the split's label field (the reader's own numbering and parser)."""
    first = {name: start for name, start, _ in info.layout.shards}
    member = info.layout.label_member
    for shard in info.shard_paths:
        with open(shard, "rb", buffering=1 << 20) as f:
            for name, data, pos in numbered_members(iter_tar(f, ("." + member,))):
                i = first[shard.name] + pos
                if 0 <= i < len(keys):
                    keys[i] = name[:name.find(".", name.rfind("/") + 1)]
                    try:
                        given[i] = read_label({member: data}, info.layout.label_field)
                    except (KeyError, ValueError):
                        pass  # the reader counts such samples as corrupt
    return keys, given


def sample_keys(shards: Union[str, os.PathLike], *, split: str = "train") -> np.ndarray:
    """The ``__key__`` of every sample of ``split``, indexed by idx ('' where a shard lacks it).

    Raises :class:`~turnctl.errors.DataError` when the shards cannot be opened.

    >>> sample_keys("shards/toy", split="train")[:2].tolist()     # doctest: +SKIP
    ['train_000000', 'train_000001']
    """
    return _read_idx_members(open_split(shards, split))[0]


def keys_for(sel: Selection) -> Tuple[np.ndarray, Optional[str]]:
    """Keys for ``sel``'s samples (in its order), or all '' and a warning saying why."""
    empty = np.full(sel.num_samples, "", dtype=object)
    if sel.split_info is None:
        return empty, (f"the run's shards cannot be read ({sel.shards_problem}); the key column is empty "
                       "(pass --shards DIR if they moved)")
    info = sel.split_info
    if info.num_samples != sel.num_samples or sel.idx.min(initial=0) < 0 or sel.idx.max(initial=0) >= info.num_samples:
        return empty, (f"{info.root}: split {info.split!r} holds {info.num_samples} samples, the selection "
                       f"{sel.num_samples}; not the run's dataset, the key column is empty")
    try:
        keys, given = _read_idx_members(info)
    except (OSError, ValueError, tarfile.TarError) as exn:
        return empty, f"{info.root}: cannot read the shards ({type(exn).__name__}: {exn}); the key column is empty"
    # Re-prepared data (another noise seed) would pair idx with other images: the labels tell.
    differ = int((given[sel.idx] != sel.given).sum())
    if differ:
        return empty, (f"{info.root}: {differ} given label(s) differ from the run's; the shards were "
                       "re-prepared since the run, so the key column is empty")
    # Escaped here, not in sample_keys: the CSV, the summary and the terminal need text.
    return np.array([printable_name(k) for k in keys[sel.idx]], dtype=object), None


def source_paths(sel: Selection) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """The file each of ``sel``'s samples was prepared from (``sources.jsonl``, relative to the
    manifest's ``sources.root``), in ``sel``'s order, escaped for text; ``(None, None)`` when the
    dataset has no source map (array datasets, ``turnctl index``, older prepares), ``(None, why)``
    when it has one that cannot be used (the report then goes on without the column).
    """
    info = sel.split_info
    record = info.manifest.get("source_map") if info is not None else None
    if not record:
        return None, None
    path = info.root / SOURCES_FILE
    try:
        size = path.stat().st_size
        if size > MAX_SOURCES_BYTES or size != record.get("bytes"):
            return None, (f"{path}: {size:,} bytes, not the {record.get('bytes')} the manifest records (at most "
                          f"{MAX_SOURCES_BYTES:,}); the source column is left out")
        by_idx = np.full(info.num_samples, "", dtype=object)
        with open(path, "rb") as f:
            for line in f:
                entry = json.loads(line)
                if entry.get("split") == info.split:
                    i = entry["idx"]
                    if not (isinstance(i, int) and 0 <= i < len(by_idx)):
                        raise ValueError(f"idx {i!r} outside the split")
                    by_idx[i] = printable_name(str(entry["source"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
        return None, f"{path}: unreadable ({type(exn).__name__}: {exn}); the source column is left out"
    if sel.idx.min(initial=0) < 0 or sel.idx.max(initial=0) >= len(by_idx):
        return None, None  # not the run's dataset: keys_for says so
    return by_idx[sel.idx], None
