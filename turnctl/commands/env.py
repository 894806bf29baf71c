"""``turnctl env``: everything a bug report needs, as a table or JSON."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from typing import Any, Dict

import click
from rich.markup import escape
from rich.table import Table

from turnctl import __version__
from turnctl.commands.common import emit_json
from turnctl.logger import result_console

_PACKAGES = ("torch", "deepspeed", "transformers", "webdataset", "safetensors", "sklearn", "numpy",
             "PIL", "pydantic", "click", "rich", "yaml", "accelerate", "braceexpand", "efficientnet_lite_pytorch",
             "matplotlib", "tensorboard", "mlflow", "wandb")
# The distribution behind a module whose own name differs (its version is read from the metadata,
# so a module without __version__, e.g. rich, still reports one).
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml",
                  "efficientnet_lite_pytorch": "efficientnet-lite-pytorch", "mlflow": "mlflow-skinny"}
_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "TURNCTL_DATA", "HF_HOME",
             "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "LOCAL_SIZE", "TURNCTL_MALLOC_TUNING", "LD_PRELOAD",
             "TURNCTL_PROGRESS_EVERY_S", "TURNCTL_NO_PROGRESS", "TORCH_EXTENSIONS_DIR",
             "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
             "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "TURNCTL_SLURM_REQUEUE")


def _version(name: str) -> str:
    from importlib import metadata

    if importlib.util.find_spec(name) is None:
        return "not installed"
    for dist in (_DISTRIBUTIONS.get(name, name), name):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # a module without distribution metadata (a source checkout): ask it
        mod = importlib.import_module(name)
    except Exception as exc:  # broken: that matters in a bug report
        return f"broken ({type(exc).__name__})"
    return str(getattr(mod, "__version__", getattr(mod, "VERSION", "installed")))


def collect() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "turnctl": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in _PACKAGES},
    }
    try:
        import torch

        cuda = torch.cuda.is_available()
        acc: Dict[str, Any] = {
            "cuda_available": cuda,
            "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "device_count": torch.cuda.device_count() if cuda else 0,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
            "torch_threads": torch.get_num_threads(),
        }
    except Exception as exc:
        acc = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        from deepspeed.accelerator import get_accelerator

        a = get_accelerator()
        acc["deepspeed_accelerator"] = a.device_name()
        acc["deepspeed_comm_backend"] = a.communication_backend_name()
    except Exception as exc:
        acc["deepspeed_accelerator"] = f"unavailable ({type(exc).__name__})"
    info["accelerator"] = acc
    info["world"] = {k: os.environ.get(k) for k in _ENV_VARS}
    return info


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def command(as_json: bool) -> None:
    """Versions, accelerator and launcher environment (paste into bug reports)."""
    info = collect()
    if as_json:
        emit_json(info)
        return
    # Values are data (paths in HF_HOME, a platform string): rich must not read '[...]' in them as markup.
    table = Table(title=escape(f"turnctl {info['turnctl']}"), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    rows = [("python", info["python"]), ("platform", info["platform"]), ("cpu_count", info["cpu_count"])]
    rows += list(info["packages"].items()) + list(info["accelerator"].items())
    rows += [(f"env {k}", v) for k, v in info["world"].items() if v is not None]
    for k, v in rows:
        table.add_row(escape(str(k)), escape(str(v)))
    result_console().print(table)
