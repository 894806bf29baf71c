"""``--deepspeed ds_config.json``: a user's own DeepSpeed config, merged into the recipe.

HF Trainer's flag, with one rule for who decides what (the README's section on it shows an example):

1. **Keys with a recipe equivalent** are read *into the recipe* (so ``recipe.yaml`` in the run
   directory records them and ``--resume`` compares them): ``train_batch_size`` ->
   ``finetune.batch_size``, ``train_micro_batch_size_per_gpu`` -> ``finetune.micro_batch_size``,
   ``gradient_clipping``, ``zero_optimization.stage`` -> ``deepspeed.zero_stage``,
   ``zero_optimization.offload_optimizer.device`` (``cpu`` / ``none``) and the old ``cpu_offload``
   -> ``deepspeed.offload_optimizer``, ``zero_optimization.stage3_param_persistence_threshold``,
   ``bf16.enabled`` / ``fp16.enabled`` -> ``deepspeed.precision``, and an ``activation_checkpointing``
   section -> ``model.gradient_checkpointing``. The file overrides the recipe file; a ``--set`` of
   the same key to another value is a conflict (one line naming both). ``"auto"`` (HF's "fill this
   in") leaves turnctl's value. ``gradient_accumulation_steps`` is checked against the batch triad.
2. **Keys turnctl owns** (its optimizer and learning-rate schedule, which DeepSpeed would replace
   or fight: ``optimizer``, ``scheduler``, ``zero_allow_untested_optimizer``,
   ``zero_force_ds_cpu_optimizer``; NVMe offload) are refused with one line saying what to set.
3. **Everything else** (communication: ``overlap_comm``, ``reduce_bucket_size``,
   ``allgather_bucket_size``, ``communication_data_type``, ...; ZeRO-3 tuning; loss scaling;
   ``activation_checkpointing`` itself; profilers; logging) goes to ``deepspeed.extra``, merged into
   the generated config last, over the recipe's own ``deepspeed.extra``. An ``"auto"`` there is
   dropped with a notice (DeepSpeed's default then applies; turnctl does not guess HF's formulas).

    >>> raw = {"deepspeed": {"zero_stage": 2}}
    >>> out, mapped = merge_ds_config(raw, {"zero_optimization": {"stage": 3, "overlap_comm": True},
    ...                                     "bf16": {"enabled": "auto"}}, "ds.json")
    >>> out["deepspeed"]["zero_stage"], out["deepspeed"]["extra"], mapped
    (3, {'zero_optimization': {'overlap_comm': True}}, {'deepspeed.zero_stage': 3})
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from turnctl.errors import RecipeError
from turnctl.logger import log

MAX_DS_CONFIG_BYTES = 1 << 20

# DeepSpeed key -> recipe key, for the plain values that map one to one.
_ONE_TO_ONE = {
    ("train_batch_size",): "finetune.batch_size",
    ("train_micro_batch_size_per_gpu",): "finetune.micro_batch_size",
    ("gradient_clipping",): "finetune.gradient_clipping",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "stage3_param_persistence_threshold"): "deepspeed.stage3_param_persistence_threshold",
}
_OWNED = {
    "optimizer": ("turnctl builds the optimizer from finetune.optimizer/lr/weight_decay/momentum; set those "
                  "(e.g. --set finetune.optimizer=adamw) instead"),
    "scheduler": ("turnctl sets every step's learning rate from finetune.lr/schedule/warmup_ratio; set those "
                  "instead"),
    "zero_allow_untested_optimizer": "turnctl sets it (its SGD and AdamW need it under ZeRO)",
    "zero_force_ds_cpu_optimizer": "turnctl sets it with deepspeed.offload_optimizer",
}


def read_ds_config(path: str) -> Dict[str, Any]:
    """The JSON object in ``path`` (at most 1 MiB), or a one-line error naming the file."""
    p = Path(path)
    try:
        size = os.stat(p).st_size
        if not p.is_file():
            raise RecipeError(f"--deepspeed {path}: not a file")
        if size > MAX_DS_CONFIG_BYTES:
            raise RecipeError(f"--deepspeed {path}: {size} bytes, over the {MAX_DS_CONFIG_BYTES} bytes a "
                              "DeepSpeed config may have")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"--deepspeed {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"--deepspeed {path}: not UTF-8 text") from None
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise RecipeError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"--deepspeed {path}: the top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _get(raw: Dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: Dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise RecipeError(f"{source}: recipe key '{part}' is a value, not a section")
        node = node[part]
    node[parts[-1]] = value


def _pop(cfg: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    node = cfg
    for part in path[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return None
    return node.pop(path[-1], None)


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == "auto"


def merge_ds_config(raw: Dict[str, Any], cfg: Dict[str, Any], source: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``raw`` (a recipe mapping, before validation) with the DeepSpeed config ``cfg`` merged in by
    the module's rule; also returns {recipe key: value} of what the file set through the recipe,
    which :func:`check_no_conflict` holds ``--set`` to."""
    out, cfg = copy.deepcopy(raw), copy.deepcopy(cfg)
    mapped: Dict[str, Any] = {}

    def to_recipe(dotted: str, value: Any) -> None:
        mapped[dotted] = value
        _set(out, dotted, value, source)

    for key, why in _OWNED.items():
        if key in cfg:
            raise RecipeError(f"--deepspeed {source}: key '{key}' is not supported: {why}")
    for path, dotted in _ONE_TO_ONE.items():
        value = _pop(cfg, path)
        if value is not None and not _is_auto(value):
            to_recipe(dotted, value)
    accum = cfg.pop("gradient_accumulation_steps", None)
    zero = cfg.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        raise RecipeError(f"--deepspeed {source}: zero_optimization must be an object")
    if isinstance(zero, dict):
        offload = zero.pop("offload_optimizer", None)
        old = zero.pop("cpu_offload", None)
        if offload is not None:
            device = offload.get("device") if isinstance(offload, dict) else None
            if device in ("cpu", "none"):
                to_recipe("deepspeed.offload_optimizer", device == "cpu")
            elif not _is_auto(device):
                raise RecipeError(f"--deepspeed {source}: zero_optimization.offload_optimizer.device {device!r} "
                                  "is not supported: turnctl offloads to 'cpu' (or 'none'); NVMe offload is not "
                                  "implemented")
            extra_keys = sorted(set(offload) - {"device", "pin_memory"}) if isinstance(offload, dict) else []
            if extra_keys:
                log.info("--deepspeed %s: zero_optimization.offload_optimizer.%s ignored (turnctl sets the "
                         "offload itself; pin_memory follows the device)", source, ", ".join(extra_keys))
        elif isinstance(old, bool):
            to_recipe("deepspeed.offload_optimizer", old)
        if not zero:
            cfg.pop("zero_optimization")
    enabled: Dict[str, Any] = {}
    for name in ("bf16", "fp16"):
        section = cfg.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise RecipeError(f"--deepspeed {source}: {name} must be an object")
        enabled[name] = section.pop("enabled", None)
        if not section:
            cfg.pop(name)
    on = [name for name, e in enabled.items() if e is True]
    if len(on) == 2:
        raise RecipeError(f"--deepspeed {source}: bf16.enabled and fp16.enabled are both true")
    if on:
        to_recipe("deepspeed.precision", on[0])
    elif any(e is False for e in enabled.values()):
        to_recipe("deepspeed.precision", "fp32")
    if cfg.pop("bfloat16", None) is not None:
        raise RecipeError(f"--deepspeed {source}: 'bfloat16' is DeepSpeed's old name; use bf16.enabled")
    if isinstance(cfg.get("activation_checkpointing"), dict):
        to_recipe("model.gradient_checkpointing", True)
    for dropped in _drop_auto(cfg):
        log.info("--deepspeed %s: %s is \"auto\": left to DeepSpeed's default", source, dropped)
    if cfg:
        extra = out.setdefault("deepspeed", {}).setdefault("extra", {}) if isinstance(out.get("deepspeed"), dict) \
            else _new_extra(out)
        _deep_update(extra, cfg)
    if accum is not None and not _is_auto(accum):
        mapped["gradient_accumulation_steps"] = accum
    return out, mapped


def _new_extra(out: Dict[str, Any]) -> Dict[str, Any]:
    out["deepspeed"] = {"extra": {}}
    return out["deepspeed"]["extra"]


def _drop_auto(cfg: Dict[str, Any], prefix: str = "") -> List[str]:
    dropped = []
    for k in list(cfg):
        v = cfg[k]
        if _is_auto(v):
            del cfg[k]
            dropped.append(prefix + k)
        elif isinstance(v, dict):
            dropped += _drop_auto(v, f"{prefix}{k}.")
            if not v:
                del cfg[k]
    return dropped


def _deep_update(base: Dict[str, Any], extra: Dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def check_no_conflict(final_raw: Dict[str, Any], mapped: Dict[str, Any], source: str,
                      overrides: List[str]) -> None:
    """A ``--set`` that changed a key the file set: one line naming both."""
    for dotted, value in mapped.items():
        if dotted == "gradient_accumulation_steps":
            continue
        now = _get(final_raw, dotted)
        if now != value:
            given = next((o for o in reversed(overrides) if o.split("=", 1)[0].strip() == dotted), f"{dotted}={now}")
            raise RecipeError(f"--deepspeed {source} sets {dotted}={json.dumps(value)} but --set {given} says "
                              "otherwise; keep one of the two")


def check_accumulation(mapped: Dict[str, Any], derived: int, source: Optional[str]) -> None:
    """``gradient_accumulation_steps`` from the file must be what the batch triad gives."""
    given = mapped.get("gradient_accumulation_steps")
    if given is not None and given != derived:
        raise RecipeError(f"--deepspeed {source}: gradient_accumulation_steps={given} but finetune.batch_size / "
                          f"(micro_batch_size x world size) = {derived}; drop it or make them agree")
