"""A prepared dataset's ``sizes.json`` and ``manifest.json``, built from the splits as written.

The pipeline (turnctl/prepare/pipeline.py) writes every split's shards, then hands each split's
:class:`Written` record here: the per-split counts and label tallies, the noise as realised against
the known true labels, and the shard table. ``manifest.json`` is written last, so its presence marks
a complete dataset; the fields are listed in docs/ARCHITECTURE.md and checked by every reader
(turnctl/data/format.py).

    >>> rate(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]))
    0.25
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from turnctl import __version__
from turnctl.data.format import FORMAT, SOURCES_FILE
from turnctl.prepare import noise as nz
from turnctl.prepare.source import NOISED_SPLITS, Source, Split
from turnctl.prepare.writer import write_json, writing

# The manifest lists this many unreadable inputs per split at most (the count is always exact): a
# dataset with a million broken files must not write a manifest that readers refuse as too large.
MAX_SKIPPED_LISTED = 10_000


@dataclasses.dataclass
class Written:
    """One split as it went to disk: the samples in idx order, their given labels, shards, skips."""

    split: Split
    given: np.ndarray
    kept: np.ndarray  # positions in ``split`` that were written (unreadable ones are skipped)
    shards: List[Dict[str, Any]]
    skipped: List[Dict[str, str]]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more fields for splits.<name>


def rate(true: np.ndarray, given: np.ndarray) -> Optional[float]:
    """The share of ``given`` labels that differ from ``true``, to 6 places (None for no samples)."""
    r = nz.realised_rate(true, given)
    return None if r is None else round(r, 6)


def split_record(w: Written, *, num_classes: int, noised: bool) -> Dict[str, Any]:
    """``splits.<name>`` of the manifest for the samples ``w`` wrote."""
    g = w.given[w.kept]
    c = None if w.split.clean is None else w.split.clean[w.kept]
    known = np.zeros(len(g), bool) if c is None else c >= 0
    return {
        "count": int(len(g)),
        "shards": [s["file"] for s in w.shards],
        "per_class_given": np.bincount(g, minlength=num_classes).tolist(),
        "per_class_clean": np.bincount(c[known], minlength=num_classes).tolist() if known.any() else None,
        "has_clean": bool(known.any()),
        "clean_known": int(known.sum()),
        "noised": noised,
        "realised_noise_rate": rate(c[known], g[known]) if known.any() else None,
        "skipped": {"count": len(w.skipped), "items": w.skipped[:MAX_SKIPPED_LISTED],
                    "items_truncated": len(w.skipped) > MAX_SKIPPED_LISTED},
        **w.extra,
    }


def given_only_split_record(*, count: int, shards: List[str], per_class_given: List[int],
                            **extra: Any) -> Dict[str, Any]:
    """``splits.<name>`` for a split known only by its given labels, tallied as its shards were read
    (``turnctl index``): the fields :func:`split_record` writes, with no true labels, no noise
    turnctl applied and nothing skipped; ``extra`` adds fields (e.g. where idx comes from)."""
    return {
        "count": int(count),
        "shards": list(shards),
        "per_class_given": [int(n) for n in per_class_given],
        "per_class_clean": None,
        "has_clean": False,
        "clean_known": 0,
        "noised": False,
        "realised_noise_rate": None,
        "skipped": {"count": 0, "items": [], "items_truncated": False},
        **extra,
    }


def _source_of(path: str, root: Optional[Path]) -> str:
    """A sample's file as prepared: relative to ``root`` (the manifest's ``sources.root``) when
    inside it, POSIX separators; else as given."""
    p = Path(path)
    if root is not None:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def write_source_map(directory: Path, written: Mapping[str, Written], root: Optional[Path]) -> Optional[Dict[str, Any]]:
    """``sources.jsonl`` (turnctl.data.format.SOURCES_FILE) for the file-based splits of ``written``:
    one line ``{"split", "idx", "key", "source"}`` per written sample, idx in write order; returns
    the manifest's ``source_map`` record, or None when no split comes from files (array datasets).

    Keys are sanitised paths (dots and slashes become '_'), so the path cannot be read back from a
    key: this map is how the report shows the file a label issue is about.
    """
    files = [(name, w) for name, w in written.items() if not w.split.is_array]
    if not files:
        return None
    path = Path(directory) / SOURCES_FILE
    tmp = path.with_name(f".{SOURCES_FILE}.tmp")
    digest, count, size = hashlib.sha256(), 0, 0
    with writing(tmp):
        with open(tmp, "wb") as fh:
            for name, w in files:
                for idx, i in enumerate(w.kept.tolist()):
                    # surrogateescape'd (non-UTF-8) file names stay lossless as JSON \udcXX escapes
                    line = (json.dumps({"split": name, "idx": idx, "key": w.split.keys[i],
                                        "source": _source_of(w.split.images[i], root)}) + "\n").encode("ascii")
                    fh.write(line)
                    digest.update(line)
                    count += 1
                    size += len(line)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return {"file": SOURCES_FILE, "count": count, "bytes": size, "sha256": digest.hexdigest(),
            "relative_to": "sources.root"}


def write_sizes_then_manifest(directory: Path, sizes: Mapping[str, int], manifest: Mapping[str, Any]) -> None:
    """``sizes.json``, then ``manifest.json`` (each atomically): the manifest last, so its presence
    marks a complete dataset."""
    write_json(Path(directory) / "sizes.json", dict(sizes))
    write_json(Path(directory) / "manifest.json", dict(manifest))


def noise_summary(record: Dict[str, Any], written: Mapping[str, Written], *, num_classes: int) -> Dict[str, Any]:
    """The manifest's ``noise``: ``record`` (what was asked for) plus what the written labels show."""
    trues, gives, bases = [], [], []
    for name in record["applies_to"] or [n for n in NOISED_SPLITS if n in written]:
        w = written[name]
        s, k = w.split, w.kept
        bases.append(s.labels[k])
        gives.append(w.given[k])
        if s.clean is not None:
            mask = s.clean[k] >= 0
            trues.append((s.clean[k][mask], w.given[k][mask]))
    out = dict(record)
    if trues and sum(len(t) for t, _ in trues) > 0:
        t = np.concatenate([a for a, _ in trues])
        g = np.concatenate([b for _, b in trues])
        out["realised_noise_rate"] = rate(t, g)
        out["transition_matrix"] = np.round(nz.transition_matrix(t, g, num_classes=num_classes), 6).tolist()
        out["measured_on"] = int(len(t))
    else:  # no true labels (WebVision): nothing to measure against
        out["realised_noise_rate"] = None
        out["transition_matrix"] = None
        out["measured_on"] = 0
    if bases:
        out["changed_fraction"] = rate(np.concatenate(bases), np.concatenate(gives))
    return out


def write_manifest(directory: Path, written: Mapping[str, Written], *, dataset: str, source: Source,
                   root: Optional[Path], noise: Dict[str, Any], options: Dict[str, Any]
                   ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """``sizes.json``, then ``manifest.json`` into ``directory``; returns (splits, manifest, shard table).

    ``noise`` is the noise record of the splits as written (after any hold-out); ``source`` gives
    the dataset-wide fields (classes, where the true labels come from).
    """
    splits: Dict[str, Any] = {}
    shard_table: Dict[str, Any] = {}
    sizes: Dict[str, int] = {}
    for name, w in written.items():
        splits[name] = split_record(w, num_classes=source.num_classes, noised=name in noise["applies_to"])
        for s in w.shards:
            shard_table[s["file"]] = {"sha256": s["sha256"], "bytes": s["bytes"], "count": s["count"],
                                      "split": name}
            sizes[s["file"]] = s["count"]
    manifest = {
        "format": FORMAT,
        "dataset": dataset,
        "turnctl_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": dict(source.info, root=None if root is None else str(root)),
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "clean_labels": source.clean_labels,
        "splits": splits,
        "noise": noise_summary(noise, written, num_classes=source.num_classes),
        "options": options,
        "shards": shard_table,
    }
    source_map = write_source_map(directory, written, root)
    if source_map is not None:
        manifest["source_map"] = source_map
    write_sizes_then_manifest(directory, sizes, manifest)
    return splits, manifest, shard_table
