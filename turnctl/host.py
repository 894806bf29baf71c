"""Process-wide settings of a rank on its host: threads per rank and glibc's allocator (measured in
benchmarks/RESULTS.md, ``bench_overhead.py``), and where DeepSpeed's JIT ops are built. Each
leaves an explicit user choice alone (OMP_NUM_THREADS; MALLOC_* / GLIBC_TUNABLES / a preloaded
jemalloc or tcmalloc; TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Optional

log = logging.getLogger("turnctl")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# The largest M_MMAP_THRESHOLD glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above
# it are always mapped afresh, which is why CPU recipes keep eval batches under it (demo: 128).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 256 << 20


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, the DeepSpeed launcher's LOCAL_SIZE, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            return max(1, int(os.environ[key]))
        except (KeyError, ValueError):
            continue
    return 1


def set_threads_per_rank() -> Optional[int]:
    """Give each rank its share of this node's cores when OMP_NUM_THREADS does not say.

    torch gives every process all the cores, so N ranks on a node run N x cores threads that spin
    against each other: two CPU ranks of 2 threads each on 2 cores fine-tune about 20% slower than
    with 1 thread each (benchmarks/RESULTS.md). torchrun sets OMP_NUM_THREADS=1 for the same
    reason; the DeepSpeed launcher only with --bind_cores_to_rank. Returns the count set, or None
    when OMP_NUM_THREADS (the user's choice) is set or there is one rank per node.
    """
    if os.environ.get("OMP_NUM_THREADS") or local_world_size() == 1:
        return None
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // local_world_size())
    torch.set_num_threads(threads)
    log.info("%d torch threads per rank (%d cores / %d ranks on this node); set OMP_NUM_THREADS to choose",
             threads, cores, local_world_size())
    return threads


def allocator_is_users_choice() -> bool:
    """MALLOC_* or GLIBC_TUNABLES set, or jemalloc / tcmalloc preloaded: not ours to change."""
    env = os.environ
    preload = env.get("LD_PRELOAD", "")
    return (any(k.startswith("MALLOC_") for k in env) or "GLIBC_TUNABLES" in env
            or "jemalloc" in preload or "tcmalloc" in preload)


def tune_allocator() -> bool:
    """Keep freed activation memory in glibc's heap instead of unmapping it (Linux, glibc).

    By default glibc maps every large block (an activation, a batch) afresh and unmaps it on free,
    and the kernel zero-fills each page on first touch again: on 2 CPU cores a no-grad pass of
    EfficientNet-Lite0 at 64 px over 1,258 images took 636k page faults at batch 128 (1.5M at 256)
    and 1.3 s of system time (bench_overhead.py). A fixed mmap threshold at its maximum (32 MiB), a
    1 GiB trim threshold and a 256 MiB top pad (the heap grows in large steps) make the heap keep and
    reuse that memory: no page faults after the first batch, the no-grad passes 1.8-1.9x faster, at the
    price of a resident size that stays at its peak. The same idea as the jemalloc / tcmalloc
    preload that PyTorch's CPU performance guides recommend. ``TURNCTL_MALLOC_TUNING=0`` turns it
    off; a user's own allocator settings are kept. Returns whether it was applied.
    """
    if os.environ.get("TURNCTL_MALLOC_TUNING", "1") == "0" or allocator_is_users_choice():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        return False
    return ok


def isolate_extension_builds(environ=os.environ) -> Optional[str]:
    """Give this Python environment its own torch-extension build directory when
    TORCH_EXTENSIONS_DIR is unset; return it (None: the user's setting is kept).

    torch builds DeepSpeed's JIT ops under ``~/.cache/torch_extensions/py311_cpu/`` for *every*
    environment of that Python: two virtualenvs with different torch or DeepSpeed versions load
    each other's builds (an ABI mismatch at best) and wait on each other's locks. The directory
    here is keyed by the environment's prefix and the torch and DeepSpeed versions, under the
    same cache root torch uses (``$XDG_CACHE_HOME`` or ``~/.cache``), so it survives between runs
    and is shared only by the processes of one environment (every rank of a job computes the same).
    """
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    import hashlib
    import sys
    from importlib import metadata

    versions = []
    for dist in ("torch", "deepspeed"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    key = hashlib.sha256("\n".join([os.path.realpath(sys.prefix), *versions]).encode()).hexdigest()[:12]
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(cache, "torch_extensions", f"turnctl-py{sys.version_info.major}{sys.version_info.minor}-{key}")
    environ["TORCH_EXTENSIONS_DIR"] = root
    return root
