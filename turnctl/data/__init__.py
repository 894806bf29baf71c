"""Reading the shards ``turnctl prepare`` writes (docs/ARCHITECTURE.md), one module per job:

    format    the on-disk contract: FORMAT, manifest.json / sizes.json schema, open_split -> SplitInfo
    tar       shard tar files -> member dicts -> sample dicts (a fast drop-in for webdataset's)
    decode    image bytes -> RGB picture (pixel limit, no truncated images) -> tensor
    stages    the picklable pipeline stages: shard choice, parse/filter, shuffle, decode; counters
    batches   batching, and batches crossing from DataLoader workers through shared memory
    loaders   exact_loader (every sample once, lockstep) and train_loader (one epoch), one pipeline

The names below are imported on first use, so that ``turnctl.data.format`` (which prepare imports)
costs no torch or webdataset import.

    >>> from turnctl.data import FORMAT
    >>> FORMAT
    'turnctl-shards/1'
"""

from __future__ import annotations

import importlib
from typing import Any, List

# Public name -> the module of this package that defines it.
_HOMES = {
    "format": ("FORMAT", "IMAGE_EXTS", "MAX_MANIFEST_BYTES", "MAX_SIZES_BYTES", "SplitInfo", "open_split",
               "read_manifest", "read_sizes", "sha256_file"),
    "tar": ("iter_tar",),
    "decode": ("ToTensorResize", "decode_image"),
    "stages": ("shard_order",),
    "loaders": ("ExactLoader", "ShardPart", "TrainLoader", "exact_assignment", "exact_loader", "exact_steps",
                "shard_parts", "train_assignment", "train_loader"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
