"""Process-group setup and the collectives turnctl relies on.

Rank and world size come from the environment that every launcher sets (``deepspeed``, ``torchrun``,
``deepspeed --module``); a plain ``turnctl ...`` is a world of one. Rules kept here:

* every collective runs on every rank;
* per-sample results are gathered *by idx* and checked: each idx must arrive exactly once;
* the process-group timeout comes from the recipe, so a long rank-0 step (the linear probe) does not
  trip the watchdog while a dead rank still fails the others in bounded time.
"""

from __future__ import annotations

import datetime as _dt
import glob
import logging
import os
import socket
import stat
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from turnctl.errors import DistributedError
from turnctl.host import set_threads_per_rank

log = logging.getLogger("turnctl")


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return env_rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_minutes: float = 60.0) -> None:
    """Create the default process group (idempotent).

    A single process gets a world of one on a private port, so that DeepSpeed and the collectives
    below behave the same with and without a launcher.
    """
    if is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env_world_size() > 1:
            raise DistributedError(
                "WORLD_SIZE > 1 but MASTER_PORT is not set: start turnctl through a launcher "
                "(deepspeed, torchrun) rather than setting WORLD_SIZE by hand"
            )
        os.environ["MASTER_PORT"] = str(_free_port())
    check_extension_locks()  # before DeepSpeed may JIT-build its ops and wait on their lock
    set_threads_per_rank()  # before DeepSpeed and the first op size torch's thread pool
    import deepspeed

    deepspeed.init_distributed(
        timeout=_dt.timedelta(minutes=timeout_minutes), verbose=False,
        auto_mpi_discovery=False,
    )


EXT_LOCK_STALE_S = 300.0  # default of TURNCTL_EXT_LOCK_STALE_S


def extension_build_roots() -> List[str]:
    """Where torch.utils.cpp_extension builds JIT extensions (DeepSpeed's ops among them): the root
    that ``_get_build_directory`` uses, without creating anything."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [root]
    try:
        import sys

        import torch
        from torch.utils.cpp_extension import get_default_build_root
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    # = torch's _get_build_directory (which also creates the directory, hence not called here)
    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return [os.path.join(get_default_build_root(), f"{py}_{accel}")]


def check_extension_locks(roots: Optional[Sequence[str]] = None, *, stale_s: Optional[float] = None) -> List[str]:
    """Deal with DeepSpeed JIT-build locks a killed build left behind; return the locks removed.

    torch builds an extension under a zero-byte ``<root>/<name>/lock`` (``torch.utils.file_baton``)
    and every other process that loads the extension (even one built long ago) waits, silently and
    for ever, until that file is gone. A build killed half-way (Ctrl-C, a job time limit) never
    removes it. The file holds no PID, so its age decides: a ``lock`` in a ``deepspeed*`` build
    directory older than ``stale_s`` (``TURNCTL_EXT_LOCK_STALE_S``, default 300 s; a build takes
    well under a minute) is removed with a one-line warning; a younger one gets a one-line notice
    that this process is about to wait on it. Nothing else is touched.
    """
    if stale_s is None:
        try:
            stale_s = float(os.environ.get("TURNCTL_EXT_LOCK_STALE_S", EXT_LOCK_STALE_S))
        except ValueError:
            stale_s = EXT_LOCK_STALE_S
    removed: List[str] = []
    for root in extension_build_roots() if roots is None else roots:
        for lock in sorted(glob.glob(os.path.join(glob.escape(root), "deepspeed*", "lock"))):
            try:
                st = os.lstat(lock)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
                continue  # not the empty file FileBaton creates: not ours to judge
            age = time.time() - st.st_mtime
            if age < stale_s:
                log.warning("waiting for %s (another build in progress, %.0f s old; delete it if no build is "
                            "running)", lock, max(age, 0.0))
                continue
            try:
                again = os.lstat(lock)
                # Another process may have removed the stale lock and taken a new one meanwhile.
                if (again.st_ino, again.st_mtime_ns) != (st.st_ino, st.st_mtime_ns):
                    continue
                os.unlink(lock)
            except OSError:
                continue
            removed.append(lock)
            log.warning("removed %s, a DeepSpeed build lock %.0f s old (a build that was killed leaves it, and "
                        "every later start would wait on it for ever)", lock, age)
    return removed


def destroy() -> None:
    """Tear the process group down (DeepSpeed warns and can hang at exit otherwise)."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
        release_node_resources()


def deepspeed_shm_path(rank: int) -> Optional[str]:
    """The shared-memory buffer DeepSpeed's CPU all-reduce creates for ``rank`` of this job, if any.

    With DS_ACCELERATOR=cpu and all ranks on one machine (LOCAL_SIZE == WORLD_SIZE, which the
    deepspeed launcher sets), DeepSpeed 0.19 creates one 66 MB buffer per rank in /dev/shm, named
    after the user, MASTER_ADDR and MASTER_PORT, and never unlinks it: /dev/shm is memory, so every
    run would keep 66 MB x ranks until the machine reboots.
    """
    if os.environ.get("DS_ACCELERATOR") != "cpu" or os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return None
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_node_resources() -> None:
    """What must not outlive this process, also when it exits without tearing anything down: this
    rank's DeepSpeed shared-memory buffer."""
    # Every peer mapped this buffer when the process group was created; unlinking the name at the
    # end leaves their mappings valid and returns the memory once the last one exits.
    path = deepspeed_shm_path(env_rank())
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def world_size() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def rank() -> int:
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return 0


def all_gather_object(obj: Any) -> List[Any]:
    if not is_initialized() or world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "ProcessGroupNCCL is aborted")


def describe_collective_failure(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because another rank died or hung; None otherwise.

    gloo and NCCL report these as RuntimeError (or DistBackendError) with a source path and a
    multi-line hint; users need to know which of the two happened and where to look.

    >>> describe_collective_failure(RuntimeError("[x/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    'another rank died (Connection closed by peer [127.0.0.1]:1); its own log has the cause'
    """
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    detail = detail.split(". This is typically")[0].strip()
    if any(p in text for p in _PEER_LOST):
        return f"another rank died ({detail}); its own log has the cause"
    if "Timed out" in text or "timed out" in text or "Watchdog caught collective operation timeout" in text:
        return (f"a collective timed out ({detail}): another rank hung or is far behind; the limit is "
                "deepspeed.timeout_minutes in the recipe")
    return None


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective)."""
    if not is_initialized() or world_size() == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(bool(flag))], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[[], Any], *, what: str) -> Any:
    """Run ``fn`` on rank 0 alone and hand its result to every rank; if it raises, every rank raises.

    Rank-0-only work (the linear probe, the GMM) is followed by a broadcast anyway; without this, a
    failure on rank 0 would leave the other ranks waiting in that broadcast until the process-group
    timeout instead of stopping with rank 0's message. Collective.

    >>> run_on_main(lambda: 41 + 1, what="the answer")
    42
    """
    payload, error = None, None
    if rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as exc:  # re-raised below, on rank 0 as itself and elsewhere as a copy
            error = exc
            payload = ("error", type(exc).__name__, str(exc))
    payload = broadcast_object(payload)
    if error is not None:
        raise error
    if payload[0] == "error":
        raise DistributedError(f"rank 0 failed during {what}: {payload[1]}: {payload[2]}")
    return payload[1]


def comm_device():
    """The device tensors must live on for collectives of the current backend."""
    import torch
    import torch.distributed as dist

    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_device(device: Any = None):
    """The device this rank computes on: ``device`` when one is named (not None or "auto"), else its
    local GPU (LOCAL_RANK modulo the visible GPUs) when there is one, else the CPU.

    >>> str(compute_device("cpu"))
    'cpu'
    """
    import torch

    if device is not None and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", env_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def all_reduce(tensor, *, op: str = "sum"):
    """``tensor`` summed (``op="sum"``) or maxed (``"max"``) over all ranks, on the tensor's own
    device; ``tensor`` itself in a world of one. Collective.

    >>> import torch
    >>> all_reduce(torch.tensor([1.0, 2.0]), op="max").tolist()
    [1.0, 2.0]
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    t = tensor.to(comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.to(tensor.device)


def _padded(tensor):
    """This rank's tensor on the comm device, padded along dim 0 to the longest rank's, and every
    rank's true length (one all_gather of the lengths)."""
    import torch
    import torch.distributed as dist

    dev = comm_device()
    t = tensor.to(dev).contiguous()
    n = torch.tensor([t.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    longest = max(sizes_i)
    if t.shape[0] < longest:
        pad = torch.zeros((longest - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
        t = torch.cat([t, pad], 0)
    return t, sizes_i


def all_gather_variable(tensor) -> list:
    """All-gather tensors whose first dimension differs between ranks (pad, gather, trim)."""
    import torch
    import torch.distributed as dist

    if not is_initialized() or world_size() == 1:
        return [tensor]
    t, sizes = _padded(tensor)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return [p[:s] for p, s in zip(parts, sizes)]


def gather_variable(tensor, dst: int = 0) -> Optional[list]:
    """Gather tensors of differing first dimension to ``dst`` only (None on other ranks).

    Unlike :func:`all_gather_variable`, only rank ``dst`` holds the whole result: features of a
    million-image split are gathered for the linear probe without every rank holding a copy.
    """
    import torch
    import torch.distributed as dist

    if not is_initialized() or world_size() == 1:
        return [tensor]
    t, sizes = _padded(tensor)
    parts = [torch.empty_like(t) for _ in range(world_size())] if rank() == dst else None
    dist.gather(t, gather_list=parts, dst=dst)
    if parts is None:
        return None
    return [p[:s] for p, s in zip(parts, sizes)]


def check_coverage(idx: np.ndarray, num_samples: int, what: str = "gather") -> None:
    """Raise unless ``idx`` holds every integer in ``[0, num_samples)`` exactly once."""
    idx = np.asarray(idx).astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
        bad = idx[(idx < 0) | (idx >= num_samples)][0]
        raise DistributedError(f"{what}: idx {int(bad)} is outside [0, {num_samples})")
    counts = np.bincount(idx, minlength=num_samples)
    dup = np.flatnonzero(counts > 1)
    missing = np.flatnonzero(counts == 0)
    if dup.size or missing.size:
        parts = []
        if dup.size:
            parts.append(f"{dup.size} duplicated (first idx {int(dup[0])})")
        if missing.size:
            parts.append(f"{missing.size} missing (first idx {int(missing[0])})")
        raise DistributedError(
            f"{what}: expected each of {num_samples} idx exactly once, got " + ", ".join(parts)
        )


def gather_by_idx(
    idx, values: Dict[str, Any], *, num_samples: int, what: str = "gather", dst: Optional[int] = None
) -> Optional[Dict[str, np.ndarray]]:
    """Gather per-sample ``values`` keyed by ``idx``; return them ordered by idx.

    ``idx`` is a 1-D integer tensor of this rank's samples (padding rows must already be removed);
    each value is a tensor whose first dimension matches. The result maps each name to a numpy
    array of length ``num_samples`` in idx order, plus ``"idx"`` itself. With ``dst=None`` every
    rank gets the result; with ``dst=r`` only rank r does (others get None). A gap or a duplicate
    raises :class:`DistributedError`; the idx are all-gathered in both modes so that every rank
    raises together instead of leaving the others waiting in the next collective.
    """
    import torch

    idx_t = torch.as_tensor(idx, dtype=torch.long)
    all_idx = torch.cat([p.cpu() for p in all_gather_variable(idx_t)]).numpy()
    check_coverage(all_idx, num_samples, what)
    order = np.argsort(all_idx, kind="stable")
    mine = dst is None or rank() == dst
    out: Dict[str, np.ndarray] = {"idx": all_idx[order]}
    for name, value in values.items():
        v = torch.as_tensor(value)
        if v.shape[0] != idx_t.shape[0]:
            raise DistributedError(f"{what}: '{name}' has {v.shape[0]} rows for {idx_t.shape[0]} idx")
        parts = all_gather_variable(v) if dst is None else gather_variable(v, dst)
        if mine:
            out[name] = torch.cat([p.cpu() for p in parts]).numpy()[order]
    return out if mine else None


def host_info() -> Dict[str, Any]:
    return {"rank": env_rank(), "local_rank": env_local_rank(), "pid": os.getpid(),
            "host": socket.gethostname()}


def set_seed(seed: int, *, per_rank: bool = True) -> int:
    """Seed python, numpy and torch; with ``per_rank`` each rank gets ``seed + rank``."""
    import random as _random

    import torch

    s = seed + (env_rank() if per_rank else 0)
    _random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return s
