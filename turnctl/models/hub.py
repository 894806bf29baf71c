"""Reading checkpoints from the Hugging Face hub or a local directory, offline-friendly and without
remote code: config files (an ``auto_map`` or unknown ``model_type`` is refused before transformers
reads it), ``from_pretrained`` with one-line errors that name the hub id, the cache directory and how
to pass a local path, the image-processor config, and ``HfDeepSpeedConfig`` for ZeRO-3.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import pickle
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from turnctl.models.families import DEFAULT_TYPE, ModelError

log = logging.getLogger("turnctl")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers prints load reports and progress bars on every rank; we log one summary."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _looks_like_path(name: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything else that is not a directory is a path typo.
    return (name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".pth", ".pt", ".safetensors", ".bin")))


def _offline(local_files_only: Optional[bool]) -> bool:
    if local_files_only:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def _not_found(name: str, family: str, revision: Optional[str], local_files_only: Optional[bool]) -> str:
    if os.path.isdir(name):
        return (f"model.name_or_path '{name}' is a directory without a loadable config.json/weights for "
                f"family {family}; point it at a Hugging Face checkpoint directory (save_pretrained output)")
    if _looks_like_path(name):
        return (f"model.name_or_path '{name}' does not exist (resolved to {os.path.abspath(os.path.expanduser(name))}); "
                f"pass an existing checkpoint directory: --set model.name_or_path=/path/to/dir")
    rev = f" at revision {revision}" if revision else ""
    how = ("offline (HF_HUB_OFFLINE / local_files_only) and it is not in the Hugging Face cache"
           if _offline(local_files_only) else "it could not be downloaded and is not in the Hugging Face cache")
    return (f"cannot load {family} model '{name}'{rev}: no local directory of that name, and {how} "
            f"({_hub_cache_dir()}); download it where the hub is reachable (huggingface-cli download {name}) "
            f"or pass a local checkpoint directory: --set model.name_or_path=/path/to/dir")


def _hub_kwargs(revision: Optional[str], local_files_only: Optional[bool]) -> Dict[str, Any]:
    kw: Dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    if local_files_only is not None:
        kw["local_files_only"] = bool(local_files_only)
    return kw


def _config_file(name: str, revision, local_files_only) -> Optional[str]:
    """The config.json transformers would read for ``name`` (None: none found; transformers then says why)."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(name, "config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **_hub_kwargs(revision, local_files_only))
    except Exception:  # not reachable or not cached: AutoConfig below gives the one-line error
        return None


def refuse_remote_code(config_path: str) -> None:
    """Raise a one-line :class:`ModelError` when ``config_path`` asks transformers for the checkpoint's
    own Python code: an ``auto_map`` key, or a ``model_type`` transformers has no class for.

    Left unset, ``trust_remote_code`` makes transformers *ask* on stdin ("Do you wish to run the
    custom code? [y/N]") and run a ``*.py`` planted next to the config on "y"; turnctl passes
    ``trust_remote_code=False`` to every load, and this check, run before transformers reads the
    file, turns the refusal into one line that names the file and the key.
    """
    try:
        with open(config_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return  # AutoConfig reports unreadable files with its own wording
    if not isinstance(raw, dict):
        return
    if "auto_map" in raw:
        auto_map = raw["auto_map"]
        what = ", ".join(f"{k} -> {v}" for k, v in list(auto_map.items())[:2]) if isinstance(auto_map, dict) \
            else repr(auto_map)[:80]
        raise ModelError(f"{config_path}: key 'auto_map' ({what}) asks to run Python code shipped with the "
                         f"checkpoint; turnctl never runs remote code: use a checkpoint of a built-in "
                         f"transformers model_type, or delete 'auto_map' if the model is a stock architecture")
    model_type = raw.get("model_type")
    if model_type is not None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if raw.get("turnctl_family") and model_type == "turnctl_efficientnet_lite":
            raise ModelError(f"{config_path}: an exported {raw['turnctl_family']} model, not a transformers one; "
                             f"set model.family={raw['turnctl_family']}")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ModelError(f"{config_path}: key 'model_type' is {model_type!r}, which transformers "
                             f"{_transformers_version()} has no class for (custom code, which turnctl never runs, "
                             f"or a newer transformers); use a checkpoint of a built-in model_type")


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "(unknown version)"


def load_config(name: str, family: str, revision, local_files_only):
    from transformers import AutoConfig

    path = _config_file(name, revision, local_files_only)
    if path:
        refuse_remote_code(path)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(name, trust_remote_code=False, **_hub_kwargs(revision, local_files_only))
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and os.path.isdir(name):
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelError(f"model.name_or_path '{name}': unreadable config.json ({first})") from None
        raise ModelError(_not_found(name, family, revision, local_files_only)) from None


def config_from_dict(family: str, d: Mapping[str, Any]):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None) or DEFAULT_TYPE.get(family)
    if model_type is None:
        raise ModelError(f"model.config for family {family} needs a 'model_type' key (e.g. vit, convnext)")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as err:
        raise ModelError(f"model.config: cannot build a '{model_type}' config ({str(err).splitlines()[0]})") from None


def read_processor_config(source: str, revision, local_files_only) -> Optional[Dict[str, Any]]:
    path: Optional[str] = None
    if os.path.isdir(source):
        cand = os.path.join(source, "preprocessor_config.json")
        path = cand if os.path.isfile(cand) else None
    else:
        try:
            from transformers.utils import cached_file

            path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False,
                               **_hub_kwargs(revision, local_files_only))
        except Exception:  # a missing processor config is normal; fall back to family defaults
            path = None
    if not path:
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        return None

def maybe_hf_ds_config(ds_config: Optional[Mapping[str, Any]]):
    """``HfDeepSpeedConfig`` for ZeRO-3, built before any ``from_pretrained`` (and kept alive)."""
    if not ds_config or int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        # transformers keeps the last HfDeepSpeedConfig in a module global: a ZeRO-3 model built
        # earlier in this process (turnctl compare, benchmarks) would make this one partitioned too.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return None
    from transformers.integrations import HfDeepSpeedConfig

    try:
        return HfDeepSpeedConfig(dict(ds_config))
    except (ImportError, importlib.metadata.PackageNotFoundError):
        # transformers checks for accelerate here (its zero.Init loading path lives there)
        raise ModelError("loading a model under ZeRO-3 needs accelerate (transformers' HfDeepSpeedConfig): "
                         "pip install 'accelerate>=1.1.0', or use deepspeed.zero_stage=2") from None


def _check_loading(info: Mapping[str, Any], source: str, family: str, head_prefixes: Sequence[str]) -> List[str]:
    """Raise when encoder weights are missing; return the head keys that were (re)initialised."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(k if isinstance(k, str) else k[0] for k in (info.get("mismatched_keys") or []))
    fresh = [k for k in missing + mismatched if k.startswith(tuple(head_prefixes))]
    bad = [k for k in missing + mismatched if not k.startswith(tuple(head_prefixes))]
    if bad:
        raise ModelError(
            f"checkpoint '{source}' lacks {len(bad)} encoder weights for family {family} (first: {bad[0]}); "
            f"check model.family (or use pooling=cls/mean if only a pooler is missing)"
        )
    return fresh


def from_pretrained(cls, source: str, *, family: str, config, revision, local_files_only,
                    head_prefixes: Sequence[str] = ("classifier",)):
    kw = dict(config=config, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32,
              trust_remote_code=False)
    kw.update(_hub_kwargs(revision, local_files_only))
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(source, **kw)
    except OSError:
        raise ModelError(_not_found(source, family, revision, local_files_only)) from None
    except pickle.UnpicklingError as exc:  # a *.bin checkpoint: transformers reads it weights_only=True
        from turnctl.safeload import refusal_reason

        raise ModelError(f"'{source}': weights refused by torch.load(weights_only=True): {refusal_reason(exc)}; "
                         "use a model.safetensors checkpoint") from None
    fresh = _check_loading(info, source, family, head_prefixes)
    if fresh:
        log.info("%s: new classifier (%d tensors initialised; the linear probe replaces it)", source, len(fresh))
    return model

