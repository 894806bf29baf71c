"""Typed recipes: the one place every hyper-parameter lives.

A recipe is a YAML file (``recipes/NAME.yaml`` or any path) validated against :class:`Recipe` and
its sections (turnctl/recipe/sections.py). Like DeepSpeed's config models, every section forbids
unknown keys; unlike pydantic's default error, ours names the full key path and the closest valid
key, in one line::

    recipe recipes/clip_l14.yaml: unknown key 'finetune.lrr' (did you mean 'finetune.lr'?)

``--set a.b.c=value`` overrides (turnctl/recipe/overrides.py) are applied to the raw mapping
*before* validation, so they are typed, range-checked and spell-checked exactly like the file.
Files are found and read by turnctl/recipe/yamlio.py; ``method`` is checked against the method
registry (turnctl/methods/registry.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Dict, List, Optional

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from turnctl.errors import RecipeError
from turnctl.logger import log
from turnctl.methods.registry import METHODS
from turnctl.recipe.overrides import apply_overrides, format_validation_error, refuse_unknown_keys
from turnctl.recipe.sections import (
    FAMILIES, CleanseSection, DataSection, DeepSpeedSection, DivideMixSection, FeatureSection, FinetuneSection,
    LossSection, ModelSection, NMTuneSection, OutputSection, ProbeSection, Section, UniconSection,
)
from turnctl.recipe.yamlio import (
    MAX_RECIPE_BYTES, MAX_YAML_DEPTH, available_recipes, dump_yaml, load_yaml_file, recipe_dirs,
    resolve_recipe_path,
)

__all__ = [
    "FAMILIES", "MAX_RECIPE_BYTES", "MAX_YAML_DEPTH", "CleanseSection", "DataSection", "DeepSpeedSection",
    "DivideMixSection", "FeatureSection", "FinetuneSection", "LossSection", "ModelSection", "NMTuneSection",
    "OutputSection", "ProbeSection", "Recipe", "Section", "UniconSection", "apply_overrides",
    "available_recipes", "load_recipe", "load_yaml_file", "recipe_dirs", "resolve_recipe_path",
    "validate_recipe",
]


class Recipe(Section):
    name: str = "recipe"
    description: str = ""
    method: str = "turn"  # a name in turnctl.methods.registry.METHODS
    seed: int = Field(default=0, ge=0)
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    features: FeatureSection = Field(default_factory=FeatureSection)
    losses: LossSection = Field(default_factory=LossSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    cleanse: CleanseSection = Field(default_factory=CleanseSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    dividemix: DivideMixSection = Field(default_factory=DivideMixSection)
    unicon: UniconSection = Field(default_factory=UniconSection)
    nmtune: NMTuneSection = Field(default_factory=NMTuneSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method: str) -> str:
        """Read from the registry at validation time, not frozen into a Literal at import: a method
        registered later (a plugin, a test) is a valid recipe value at once."""
        if method not in METHODS:
            names = [repr(m) for m in METHODS]
            raise PydanticCustomError("literal_error", "Input should be " + (
                f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)))
        return method

    @field_validator("name")
    @classmethod
    def _name_is_one_path_part(cls, name: str) -> str:
        """The default run directory is runs/<name>-<time>: a name with a separator or '..' would put
        the run (and what it writes) outside runs/."""
        bad = (not name.strip() or ".." in name or "/" in name or "\\" in name or "\0" in name
               or len(name) > 200)
        if bad:
            raise PydanticCustomError("run_name", (
                "a run name is one directory name of at most 200 characters: not empty, no '/', '\\' "
                "or '..' (set output.dir or --out to choose where the run goes)"))
        return name

    # ---- derived settings -------------------------------------------------------------------
    def grad_accum(self, world_size: int) -> int:
        """Gradient-accumulation steps from the batch triad, or a clear error."""
        ft = self.finetune
        per_step = ft.micro_batch_size * world_size
        if ft.batch_size % per_step:
            raise RecipeError(
                f"finetune.batch_size={ft.batch_size} must be a multiple of finetune.micro_batch_size"
                f" ({ft.micro_batch_size}) x world size ({world_size}) = {per_step}; set "
                f"finetune.batch_size to a multiple of {per_step} or change finetune.micro_batch_size"
            )
        return ft.batch_size // per_step

    def precision_for(self, device_type: str) -> str:
        p = self.deepspeed.precision
        if p == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return p

    def deepspeed_config(self, world_size: int, device_type: str = "cpu",
                         steps_per_epoch: Optional[int] = None) -> Dict[str, Any]:
        """The DeepSpeed config dict: batch triad checked, clipping explicit, ZeRO stage as set.

        The optimizer and LR schedule are built by turnctl (so SGD, AdamW and the cosine schedule
        behave the same on every stage), hence ``zero_allow_untested_optimizer``, and under
        ZeRO-Offload ``zero_force_ds_cpu_optimizer: false`` (DeepSpeed otherwise refuses any optimizer
        but its DeepSpeedCPUAdam/Lion; turnctl's then steps the CPU partitions). ``deepspeed.extra`` is
        merged last; it cannot set what this method derives (checked when the recipe is validated).
        """
        ds, ft = self.deepspeed, self.finetune
        accum = self.grad_accum(world_size)
        zero: Dict[str, Any] = {"stage": ds.zero_stage}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
            if ds.stage3_param_persistence_threshold is not None:
                zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        if device_type == "cpu" and ds.zero_stage in (1, 2):
            # On CPU ranks the copy of every gradient into one contiguous buffer (which spares GPU
            # memory fragmentation) is pure cost: without it a ZeRO-2 epoch is about 10% faster on 1
            # and on 2 ranks, with bit-identical losses (benchmarks/RESULTS.md, bench_overhead.py).
            zero["contiguous_gradients"] = False
        if ds.offload_optimizer:  # validation refuses it with ZeRO stage 0
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
        cfg: Dict[str, Any] = {
            "train_batch_size": ft.batch_size,
            "train_micro_batch_size_per_gpu": ft.micro_batch_size,
            "gradient_accumulation_steps": accum,
            # Explicit: DeepSpeed >= 0.19.3 defaults to 1.0 silently; 0 disables clipping.
            "gradient_clipping": ft.gradient_clipping,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        precision = self.precision_for(device_type)
        if precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        elif precision == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
        if ds.offload_optimizer:
            cfg["zero_force_ds_cpu_optimizer"] = False
        return _deep_merge(cfg, ds.extra)

    def digest(self) -> str:
        """A short hash of the resolved recipe (ranks compare it to agree on one config)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        # No anchors: the run's recipe.yaml is read back by load_yaml_file, which refuses them.
        return dump_yaml(self.model_dump(mode="json"))


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Keys turnctl no longer reads, with why. Every run's recipe.yaml holds the full resolved recipe,
# so an older run would otherwise fail --resume and eval on an unknown key: these are dropped with
# a notice instead of refused.
RETIRED_KEYS = {
    ("cleanse", "balance"): "the clean subset is always class-balanced",
}


def _drop_retired(raw: Dict[str, Any], source: str) -> Dict[str, Any]:
    """``raw`` without :data:`RETIRED_KEYS` (a copy when one is present), one notice per key.

    >>> _drop_retired({"cleanse": {"tau": 0.5, "balance": True}}, "old.yaml")
    {'cleanse': {'tau': 0.5}}
    """
    for (section, key), why in RETIRED_KEYS.items():
        sub = raw.get(section)
        if isinstance(sub, dict) and key in sub:
            log.warning("recipe %s: '%s.%s' is no longer a setting and is ignored (%s); remove it",
                        source, section, key, why)
            raw = dict(raw, **{section: {k: v for k, v in sub.items() if k != key}})
    return raw


def validate_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """A raw mapping as a :class:`Recipe`, or one :class:`RecipeError` line naming ``source`` and the key."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: top level must be a mapping, got {type(raw).__name__}")
    raw = _drop_retired(raw, source)
    refuse_unknown_keys(raw, Recipe, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(source, err)) from None


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None, *,
                deepspeed_file: Optional[str] = None, world_size: Optional[int] = None) -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path, merge a DeepSpeed config file
    (``--deepspeed``, turnctl/recipe/dsfile.py) over it, apply ``--set`` overrides, validate.

    >>> r = load_recipe("tiny", ["finetune.lr=1e-3"])
    >>> r.finetune.lr
    0.001
    """
    path = resolve_recipe_path(name_or_path)
    raw = load_yaml_file(path)
    if raw is None:  # an empty file
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections (model:, data:, ...), "
                          f"got a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    if deepspeed_file is None:
        return validate_recipe(apply_overrides(raw, overrides or []), str(path))
    from turnctl.recipe import dsfile

    raw, mapped = dsfile.merge_ds_config(raw, dsfile.read_ds_config(deepspeed_file), deepspeed_file)
    raw = apply_overrides(raw, overrides or [])
    dsfile.check_no_conflict(raw, mapped, deepspeed_file, overrides or [])
    recipe = validate_recipe(raw, f"{path} with --deepspeed {deepspeed_file}")
    if world_size is not None:
        dsfile.check_accumulation(mapped, recipe.grad_accum(world_size), deepspeed_file)
    return recipe
