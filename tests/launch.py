"""Start turnctl under the real launchers (deepspeed, torchrun) on CPU ranks, for tests.

Every launch gets its own free rendezvous port, DS_ACCELERATOR=cpu (gloo), one thread per rank
(2-core CI machines), and a hard timeout so that a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# The recipe of conftest's reference run and of the fault tests' runs (a resumed copy must match it).
RUN_ARGS = ["--recipe", "tiny", "--set", "data.num_workers=0"]

PORTS_USED: set = set()  # conftest removes what killed ranks leave in /dev/shm under these ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    PORTS_USED.add(port)
    return port


def remove_leftover_shm() -> None:
    """DeepSpeed's CPU all-reduce buffers of the launches so far (turnctl unlinks its own at exit;
    a SIGKILLed rank cannot). /dev/shm is memory: on a 24 GB CI machine they add up."""
    import glob

    for port in sorted(PORTS_USED):
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass
    PORTS_USED.clear()


def cpu_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TURNCTL_NO_PROGRESS": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.pop("PYTHONPATH", None)
    for k in [k for k in env if k.startswith("SLURM_")]:  # the suite may itself run inside a Slurm job
        env.pop(k)
    if extra:
        env.update(extra)
    return env


def run(cmd: Sequence[str], *, cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command, capturing output; on timeout the whole process group is killed."""
    proc = subprocess.Popen(
        list(cmd), cwd=str(cwd or REPO), env=env or cpu_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def deepspeed_cmd(args: Sequence[str], *, nproc: int = 2, module: bool = False) -> List[str]:
    """``deepspeed --num_gpus N [--module] turnctl ARGS`` with a private port."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    if module:
        cmd.append("--module")
    return cmd + ["turnctl", *args]


def torchrun_cmd(args: Sequence[str], *, nproc: int = 2) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "turnctl", *args]


def turnctl_cmd(args: Sequence[str]) -> List[str]:
    return [str(BIN / "turnctl"), *args]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}: {' '.join(result.args)}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def last_json(text: str) -> dict:
    """The last line of stdout that parses as a JSON object."""
    import json

    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON line in output:\n{text[-3000:]}")


def run_metrics(run_dir) -> list:
    """metrics.jsonl of a run, one dict per line."""
    import json

    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(ref, other) -> None:
    """Same selections, same fine-tuning metrics, same final weights."""
    import numpy as np
    import pytest
    from safetensors.numpy import load_file

    for e in (0, 1):
        a = np.load(ref / "selection" / f"epoch_{e}.npz")
        b = np.load(other / "selection" / f"epoch_{e}.npz")
        assert np.array_equal(a["selected"], b["selected"]), f"epoch {e}: a different clean subset"
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    # (only the per-epoch fine-tuning lines: per-step lines depend on output.log_every_steps)
    fa = [l for l in run_metrics(ref) if l["phase"] == "fft"]
    fb = [l for l in run_metrics(other) if l["phase"] == "fft"]
    assert [l["epoch"] for l in fb] == [0, 1]  # no epoch logged twice by the interrupted attempt
    for la, lb in zip(fa, fb):
        for key in ("train_loss", "samples", "steps", "selected", "test_accuracy", "val_accuracy"):
            assert la[key] == pytest.approx(lb[key], rel=1e-6), key
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(other / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=k)
