"""Slurm: ranks from ``srun``'s task variables, and the requeue after the time-limit warning.

``srun turnctl train ...`` starts one process per task and sets no launcher variables (RANK,
WORLD_SIZE, ...), only Slurm's own. :func:`launch_env` maps them the way PyTorch Lightning's and
submitit's Slurm environments do:

=================  ==========================================================================
RANK               ``SLURM_PROCID``
WORLD_SIZE         ``SLURM_STEP_NUM_TASKS`` (this step's tasks), else ``SLURM_NTASKS``
LOCAL_RANK         ``SLURM_LOCALID``
LOCAL_WORLD_SIZE   this node's entry of ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``
                   (``2(x3),1``: 2 tasks on each of 3 nodes, then 1), by ``SLURM_NODEID``
MASTER_ADDR        the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_NODELIST`` (``gpu[01-04]``)
MASTER_PORT        15000 + ``SLURM_JOB_ID`` mod 20000: the same on every task and after a requeue
=================  ==========================================================================

It applies only to a process ``srun`` started (``SLURM_STEP_ID`` is set) and only when no launcher
variable is: ``deepspeed`` / ``torchrun`` inside an allocation keep theirs. The batch script
itself (no ``srun``) also carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, but it is one
process: treating it as rank 0 of ``SLURM_NTASKS`` would wait for peers that never come.

Requeue: ``#SBATCH --signal=USR1@120`` sends SIGUSR1 to every task two minutes before the time
limit; turnctl writes a checkpoint (turnctl/preempt.py) and, under ``--requeue``, global rank 0 asks
Slurm to requeue the job (``scontrol requeue $SLURM_JOB_ID``), as Lightning does. The requeued job
runs the same sbatch line, and ``--resume auto`` continues the run. SIGTERM (scancel, preemption)
never requeues: Slurm's own preemption requeues by itself, and a cancel means stop.

    >>> expand_hostlist("gpu[01-03,07],login1")
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']
    >>> tasks_per_node("2(x3),1")
    [2, 2, 2, 1]
    >>> env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
    ...        "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODELIST": "n[7-8]",
    ...        "SLURM_JOB_ID": "123456"}
    >>> launch_env(env)["RANK"], launch_env(env)["MASTER_ADDR"], launch_env(env)["MASTER_PORT"]
    ('3', 'n7', '18456')
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from typing import Dict, List, Mapping, Optional

from turnctl.errors import DistributedError

log = logging.getLogger("turnctl")

# What launchers set; any of them present means a launcher started this process, not srun alone.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
PORT_BASE, PORT_SPAN = 15000, 20000
REQUEUE_SIGNAL = signal.SIGUSR1


def expand_hostlist(hostlist: str) -> List[str]:
    """Slurm's compressed host list (``node[01-03,7],gpu[1-2]x``) as host names, in order."""
    hosts: List[str] = []
    for part in _split_top_level(hostlist):
        hosts.extend(_expand_one(part))
    return hosts


def _split_top_level(text: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise DistributedError(f"SLURM_NODELIST: unbalanced brackets in {text!r}")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out: List[str] = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DistributedError(f"SLURM_NODELIST: cannot read the range {rng!r} in {name!r}")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{head}{i:0{width}d}{tail}"))
    return out


def tasks_per_node(spec: str) -> List[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) as one count per node."""
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistributedError(f"SLURM_TASKS_PER_NODE: cannot read {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def started_by_srun(environ: Mapping[str, str] = os.environ) -> bool:
    """A task of an ``srun`` step, with no launcher of its own in between."""
    return ("SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ
            and not any(k in environ for k in LAUNCHER_VARS))


def launch_env(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE,
    MASTER_ADDR, MASTER_PORT) this ``srun`` task implies; {} when it is not one (module docstring)."""
    if not started_by_srun(environ):
        return {}

    def need(*names: str) -> str:
        for n in names:
            if environ.get(n, "").strip():
                return environ[n].strip()
        raise DistributedError(f"started by srun but {names[0]} is not set; cannot tell this task's place")

    def integer(*names: str) -> int:
        raw = need(*names)
        if not raw.isdigit():
            raise DistributedError(f"{names[0]}={raw!r} is not a whole number")
        return int(raw)

    rank, world = integer("SLURM_PROCID"), integer("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if rank >= world:
        raise DistributedError(f"SLURM_PROCID={rank} but the step has {world} tasks")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(integer("SLURM_LOCALID"))}
    per_node = tasks_per_node(need("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")) \
        if environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") else [world]
    node = int(environ.get("SLURM_NODEID", "0") or 0)
    local = per_node[node] if node < len(per_node) else per_node[-1]
    out["LOCAL_WORLD_SIZE"] = out["LOCAL_SIZE"] = str(local)  # torchrun's name and DeepSpeed's
    if "MASTER_ADDR" not in environ:
        hosts = expand_hostlist(need("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"))
        if not hosts:
            raise DistributedError("SLURM_NODELIST names no host")
        out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = str(PORT_BASE + integer("SLURM_JOB_ID", "SLURM_JOBID") % PORT_SPAN)
    return out


def adopt_launch_env(environ=os.environ) -> Optional[Dict[str, str]]:
    """Set :func:`launch_env`'s variables in ``environ`` (the process environment by default) when
    this is an ``srun`` task; returns what was set, or None."""
    found = launch_env(environ)
    if not found:
        return None
    for k, v in found.items():
        environ.setdefault(k, v)
    return found


def requeue_on(signum: Optional[int], environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """After a checkpoint on ``signum``: ask Slurm to requeue this job when the signal was the
    time-limit warning (SIGUSR1) and the job may be requeued. Global rank 0 only. Returns the
    command run, or None. ``TURNCTL_SLURM_REQUEUE=0`` turns it off."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if (signum != REQUEUE_SIGNAL or not job or environ.get("TURNCTL_SLURM_REQUEUE", "1") == "0"
            or environ.get("RANK", "0") != "0"):
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("SIGUSR1 under Slurm job %s but no scontrol on PATH: requeue the job yourself", job)
        return None
    cmd = [scontrol, "requeue", job]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("scontrol requeue %s failed (%s): requeue the job yourself", job, exc)
        return None
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, (done.stderr or done.stdout).strip()[:300])
        return None
    log.warning("asked Slurm to requeue job %s; the requeued job continues this run (--resume auto)", job)
    return " ".join(cmd)
