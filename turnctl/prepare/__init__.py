"""``turnctl prepare``: raw datasets -> WebDataset shards with reproducible label noise.

Data flow (one module per step)::

    cifar / arrays / listed   raw layout -> Source (ordered splits of key, label, true label, image)
    labels                    CIFAR-N human label sets and key,label CSVs
    noise                     seeded generators: symmetric, asymmetric, instance, + rates/matrices
    images                    image bytes (PNG for arrays; files verified, kept, or shrunk)
    writer                    deterministic tar shards, temp names, <out>.partial-<pid> -> <out>
    valsplit                  --val-fraction: a val split held out of the noised train split
    manifest                  sizes.json and manifest.json from the splits as written (manifest last)
    pipeline                  prepare_dataset(): all of the above, renamed to --out when complete

The default ``--out`` is under the current directory (skipped in the test run, which must not
write there; turnctl/prepare/pipeline.py's examples write to a temporary directory)::

    >>> from turnctl.prepare import prepare_dataset
    >>> prepare_dataset("digits", noise="symmetric:0.6")["out"]  # doctest: +SKIP
    'shards/digits-symmetric-0.6'
"""

from turnctl.prepare.noise import NoiseSpec, parse_spec
from turnctl.prepare.pipeline import (
    DATASETS, DEFAULT_SHARD_SIZE, apply_noise, default_out, default_root, default_workers, load_source,
    prepare_dataset,
)

__all__ = ["DATASETS", "DEFAULT_SHARD_SIZE", "NoiseSpec", "apply_noise", "default_out", "default_root",
           "default_workers", "load_source", "parse_spec", "prepare_dataset"]
