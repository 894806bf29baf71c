"""Typed recipes: the one place every hyper-parameter lives.

A recipe is a YAML file (``recipes/NAME.yaml`` or any path) validated against the models below.
Like DeepSpeed's config models, every section forbids unknown keys; unlike pydantic's default error,
ours names the full key path and the closest valid key, in one line::

    recipe recipes/clip_l14.yaml: unknown key 'finetune.lrr' (did you mean 'finetune.lr'?)

``--set a.b.c=value`` overrides are applied to the raw mapping *before* validation, so they are
typed, range-checked and spell-checked exactly like the file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)

from turnctl.errors import RecipeError

METHODS = (
    "turn", "lp-ce", "lp-gce", "lp-elr", "fft-ce", "fft-gce", "fft-elr",
    "lp-dividemix", "lp-unicon", "nmtune", "turn-nmtune",
)
FAMILIES = (
    "vit", "clip", "convnext", "resnet", "vit_mae", "vit_msn", "dinov2", "auto",
    "efficientnet_lite0", "efficientnet_lite1",
)


def _numeric_kind(annotation: Any) -> Tuple[Optional[type], bool]:
    """(int or float, whether a list of them) for a numeric field's annotation, else (None, False)."""
    if get_origin(annotation) is Union:  # Optional[X]
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if get_origin(annotation) in (list, List):
        (inner,) = get_args(annotation) or (None,)
        return (inner if inner in (int, float) else None), True
    return (annotation if annotation in (int, float) else None), False


class Section(BaseModel):
    # allow_inf_nan=False: every float in a recipe is meant finite (a learning rate, a tolerance, a
    # timeout); YAML's .inf / .nan and the strings "inf" / "nan" would otherwise pass.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads true as 1; YAML reads yes/no/on/off as booleans, so
        ``--set seed=yes`` would quietly become seed 1. Strict mode cannot be used instead: PyYAML
        reads ``1e-4`` (no dot) as a string, which lax mode rightly turns into a float."""
        from pydantic_core import PydanticCustomError

        field = cls.model_fields.get(info.field_name or "")
        kind, is_list = _numeric_kind(field.annotation) if field is not None else (None, False)
        if kind is None:
            return value
        values = value if is_list and isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values):
            what = "an integer" if kind is int else "a number"
            raise PydanticCustomError("bool_not_number", (
                f"expected {what}, not a boolean (YAML reads true/false/yes/no/on/off as booleans)"))
        return value


class ModelSection(Section):
    """The pre-trained backbone."""

    family: Literal[FAMILIES] = "vit"  # type: ignore[valid-type]
    # Hugging Face hub id or local directory. None with `config` set builds a random-init model.
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # transformers config kwargs for a model built from scratch (tests, benchmarks) or overrides.
    config: Optional[Dict[str, Any]] = None
    # Input side in pixels; None takes it from the checkpoint's image-processor config.
    image_size: Optional[int] = Field(default=None, ge=8, le=4096)
    # Which representation feeds the head: the family's documented default, or cls / pooler / mean.
    pooling: Literal["default", "cls", "pooler", "mean"] = "default"

    @model_validator(mode="after")
    def _source(self):
        if self.name_or_path is None and self.config is None and not self.family.startswith("efficientnet"):
            raise ValueError("set model.name_or_path (hub id or local dir) or model.config (random init)")
        return self


class DataSection(Section):
    """Where the prepared shards are and how they are read."""

    shards: str = "shards/digits-symmetric-0.6"
    # None: taken from the shards' manifest. Set: must agree with it (checked before training).
    num_classes: Optional[int] = Field(default=None, ge=2)
    train_split: str = "train"
    # Checkpoints and every "best" figure are chosen on the val split, never on test
    # (docs/PROTOCOL.md). Shards without one: hold out `val_fraction` of train here (stratified on
    # the given labels, seeded by `val_seed`; the same samples `turnctl prepare --val-fraction F
    # --noise-seed S` would write as a val split). 0 and no val split: no best/, last only.
    val_split: Optional[str] = "val"
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    val_seed: int = Field(default=0, ge=0)
    test_split: Optional[str] = "test"
    num_workers: int = Field(default=2, ge=0, le=64)
    shuffle_buffer: int = Field(default=1000, ge=0)
    # Training-time augmentation (paper): cifar = flip + random affine; imagenet = random resized
    # crop + flip + colour jitter; flip = horizontal flip only; none.
    augment: Literal["none", "flip", "cifar", "imagenet"] = "none"


class FeatureSection(Section):
    """Frozen-feature pre-extraction (step 1 input)."""

    batch_size: int = Field(default=256, ge=1)
    # Cache directory; None = <shards>/.features, or <run>/features-cache when the shards are
    # read-only (one warning; an existing <shards>/.features is still read). The cache key covers backbone, revision,
    # preprocessing and the shards' sha256, so a cache is never reused across them.
    cache_dir: Optional[str] = None
    cache: bool = True


class LossSection(Section):
    """Loss constants shared by the probe and fine-tuning."""

    gce_q: float = Field(default=0.7, gt=0.0, le=1.0)
    # literal: (1 - p_y^q) / q;  surrogate: CE * q * p_y^q (same gradient up to a factor q).
    gce_form: Literal["literal", "surrogate"] = "literal"
    # ELR: CIFAR-100 beta 0.9, lambda 7; CIFAR-10 beta 0.7, lambda 3.
    elr_beta: float = Field(default=0.7, ge=0.0, lt=1.0)
    elr_lambda: float = Field(default=3.0, ge=0.0)


class ProbeSection(Section):
    """Linear probing on frozen features (TURN step 1; the LP baselines)."""

    epochs: int = Field(default=20, ge=0, le=10000)
    loss: Literal["ce", "gce", "elr"] = "gce"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=1e-2, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-3, ge=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    # Standardise every feature dimension (mean and std of the train features) before step 1, for
    # every feature-space method alike; the affine map is folded into the exported linear head, so
    # inference on raw features gives the same logits. Without it SGD on raw 1280-d features swings
    # by tens of points of accuracy between epochs (docs/PROTOCOL.md).
    standardize: bool = True
    # Learning-rate search for step 1 of every feature-space method (LP-CE/GCE/ELR, DivideMix,
    # UNICON, NMTune, TURN's probe): multipliers of that method's own base learning rate, each run
    # with the full budget, the one with the highest last-epoch validation accuracy kept. Empty: no
    # search. Needs validation data (a val split or data.val_fraction).
    lr_search: List[float] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _positive_multipliers(self):
        if any(not (0.0 < m <= 1000.0) for m in self.lr_search):
            raise ValueError("probe.lr_search holds learning-rate multipliers in (0, 1000]")
        return self


class CleanseSection(Section):
    """Per-class GMM cleansing (TURN step 2)."""

    tau: float = Field(default=0.6, gt=0.0, lt=1.0)
    # Lineage defaults (DivideMix): a few EM steps on min-max normalised losses.
    gmm_max_iter: int = Field(default=10, ge=1, le=10000)
    gmm_tol: float = Field(default=1e-2, gt=0.0)
    gmm_reg_covar: float = Field(default=5e-4, gt=0.0)
    normalize: Literal["minmax", "none"] = "minmax"
    # A class keeping fewer than 2 samples falls back to its k lowest-loss samples (logged).
    min_per_class: int = Field(default=2, ge=1)
    fallback_k: int = Field(default=8, ge=1)
    balance: bool = True
    # The paper cleanses every epoch, so the balanced subset is redrawn every epoch.
    redraw_each_epoch: bool = True
    seed: Optional[int] = None  # None: derived from the run seed and the epoch


class FinetuneSection(Section):
    """Full fine-tuning with DeepSpeed (TURN step 2, the FFT baselines)."""

    epochs: int = Field(default=4, ge=0, le=10000)  # TURN's E_FFT
    baseline_epochs: int = Field(default=5, ge=0, le=10000)  # the FFT baselines (paper: 5)
    loss: Literal["ce", "gce", "elr"] = "ce"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=1e-2, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-5, ge=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    # Global batch (paper: 128) = micro_batch_size x gradient accumulation x world size.
    batch_size: int = Field(default=128, ge=1)
    micro_batch_size: int = Field(default=32, ge=1)
    # Linear LR warmup over this fraction of the fine-tuning (Hugging Face Trainer's `warmup_ratio`),
    # then the schedule over the rest. The fraction is of *training progress* (epochs done, as the
    # cosine), not of a step count TURN cannot know in advance: its clean subset, and with it the
    # epoch's length, is redrawn every epoch (turnctl/finetune.py). 0: no warmup (the paper's).
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=0.5)
    # Legacy: warmup over the first N optimizer steps, multiplied into the cosine. Still honoured so
    # older recipes reproduce their runs; a recipe sets this or warmup_ratio, not both.
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    gradient_clipping: float = Field(default=1.0, ge=0.0)
    # Keep BatchNorm layers in eval mode while fine-tuning: their running statistics stay those the
    # probe's features were computed with. Helps small per-rank batches on a shifted domain.
    freeze_norm_stats: bool = False
    eval_batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _one_warmup(self):
        from pydantic_core import PydanticCustomError

        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise PydanticCustomError("warmup", (
                f"set finetune.warmup_ratio ({self.warmup_ratio}) or the legacy finetune.warmup_steps "
                f"({self.warmup_steps}), not both; set the other to 0"))
        return self


_TRIAD = ("turnctl derives the batch triad from finetune.batch_size, finetune.micro_batch_size and the "
          "world size, and its data loader reads them; set those instead")
_OFFLOAD = ("set deepspeed.offload_optimizer instead (turnctl then lets DeepSpeed step turnctl's own "
            "optimizer on the CPU)")
_PRECISION = "set deepspeed.precision instead (turnctl casts the inputs to it)"
# DeepSpeed config keys that Recipe.deepspeed_config derives from recipe keys, or that DeepSpeed would
# ignore or fight with turnctl over; deepspeed.extra may not set them (nor a non-mapping above them).
_DS_KEYS_TURNCTL_OWNS = {
    ("optimizer",): ("turnctl builds the optimizer from finetune.optimizer/lr/weight_decay/momentum "
                     "(DeepSpeed ignores this one when handed an optimizer); set those instead"),
    ("scheduler",): ("turnctl sets the learning rate of every step from finetune.lr/schedule/warmup_ratio "
                     "(a DeepSpeed scheduler would change it after each step); set those instead"),
    ("train_batch_size",): _TRIAD,
    ("train_micro_batch_size_per_gpu",): _TRIAD,
    ("gradient_accumulation_steps",): _TRIAD,
    ("gradient_clipping",): "set finetune.gradient_clipping instead",
    ("zero_optimization", "stage"): ("set deepspeed.zero_stage instead (turnctl builds the model for that "
                                     "stage before DeepSpeed starts)"),
    ("zero_optimization", "offload_optimizer"): _OFFLOAD,
    ("zero_optimization", "cpu_offload"): _OFFLOAD,  # DeepSpeed's deprecated name for it
    ("zero_force_ds_cpu_optimizer",): _OFFLOAD,
    ("zero_allow_untested_optimizer",): "turnctl's SGD and AdamW need it on under ZeRO",
    ("bf16", "enabled"): _PRECISION,
    ("bfloat16",): _PRECISION,  # DeepSpeed's old name for bf16
    ("fp16", "enabled"): _PRECISION,
}


def _owned_key_in(extra: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(dotted key, why) of the first key of ``extra`` that would set a key turnctl owns."""
    for path, why in _DS_KEYS_TURNCTL_OWNS.items():
        node: Any = extra
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                break
            # A non-mapping above an owned key replaces the whole section it is in (deep merge).
            if depth == len(path) - 1 or not isinstance(node[part], dict):
                return ".".join(path[:depth + 1]), why
            node = node[part]
    return None


class DeepSpeedSection(Section):
    """DeepSpeed engine settings; the rest of the DeepSpeed config is derived from the recipe."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, else fp32
    # ZeRO-Offload: the optimizer's state and fp32 master weights live (and are stepped) on the CPU,
    # by turnctl's own SGD/AdamW (not DeepSpeedCPUAdam). Needs zero_stage >= 1.
    offload_optimizer: bool = False
    # DeepSpeed's default 1e5 leaves small parameters unpartitioned under ZeRO-3; tests set 0.
    stage3_param_persistence_threshold: Optional[int] = Field(default=None, ge=0)
    # Process-group timeout: long enough for rank 0's linear probe, short enough to fail a dead rank.
    timeout_minutes: float = Field(default=30.0, gt=0.0, le=1440.0)
    # Raw keys merged into the generated DeepSpeed config last (expert use). Keys turnctl derives
    # from the recipe, or that would fight its optimizer and schedule, are refused (_DS_KEYS_TURNCTL_OWNS).
    extra: Dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _no_owned_keys(cls, extra: Dict[str, Any]) -> Dict[str, Any]:
        from pydantic_core import PydanticCustomError

        owned = _owned_key_in(extra)
        if owned is not None:
            raise PydanticCustomError("owned_key", f"key '{owned[0]}' is not supported: {owned[1]}")
        return extra

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        from pydantic_core import PydanticCustomError

        if self.offload_optimizer and self.zero_stage == 0:
            raise PydanticCustomError("offload", (
                "offload_optimizer needs ZeRO (it offloads ZeRO's optimizer partitions); "
                "set deepspeed.zero_stage to 1, 2 or 3, or offload_optimizer to false"))
        return self


class DivideMixSection(Section):
    """lp-dividemix: DivideMix with two linear heads on cached features (turnctl/methods/dividemix.py).
    Epochs, optimizer, lr, weight decay, batch size and schedule are the probe's (``probe.*``), as for
    the other LP baselines.

    Defaults are the original code's CIFAR defaults. What the original changes per dataset and noise
    level (the DivideMix paper's appendix, Table 7, and its Clothing1M/WebVision training scripts):

    ============== ======================= ======== ================ ========== ========= ============
    key            CIFAR sym 20/50/80%     sym 90%  CIFAR-10 asym    Clothing1M WebVision default
    ============== ======================= ======== ================ ========== ========= ============
    p_threshold    0.5                     0.6      0.5              0.5        0.5       0.5
    lambda_u       C10: 0/25/25 C100: 25/  C10 50   0                0 (no Lu)  0 (no Lu) 25
                   150/150                 C100 150
    loss_window    1                       5        1                1          1         1
    alpha          4                       4        4                0.5        0.5       4
    warmup_penalty no                      no       yes              yes        no        no
    mixmatch_rows  all                     all      all              labeled    labeled   all
    ============== ======================= ======== ================ ========== ========= ============
    """

    # CE on all samples before co-division starts (our choice for a 20-epoch LP; DivideMix: 10
    # (CIFAR-10) or 30 (CIFAR-100) of 300, 1 of 80 on Clothing1M and WebVision).
    warmup_epochs: int = Field(default=5, ge=0)
    # Labeled = clean posterior > p_threshold. DivideMix: 0.5; 0.6 at 90% noise.
    p_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    temperature: float = Field(default=0.5, gt=0.0)  # MixMatch sharpening T (0.5 everywhere)
    # Beta(alpha, alpha) mixup: 4 on CIFAR, 0.5 on Clothing1M and WebVision.
    alpha: float = Field(default=4.0, gt=0.0)
    # Weight of the unlabeled MSE, ramped up linearly over rampup_epochs after warm-up. DivideMix
    # (Table 7): CIFAR-10 sym 20/50/80/90% 0/25/25/50, asym 40% 0; CIFAR-100 sym 20/50/80/90%
    # 25/150/150/150; Clothing1M and WebVision 0.
    lambda_u: float = Field(default=25.0, ge=0.0)
    rampup_epochs: float = Field(default=16.0, gt=0.0)  # DivideMix's rampup_length (16 everywhere)
    # GMM on the mean of the last K epochs' min-max normalised losses: DivideMix 5 at 90% noise, else 1.
    loss_window: int = Field(default=1, ge=1)
    gmm_max_iter: int = Field(default=10, ge=1)
    gmm_tol: float = Field(default=1e-2, gt=0.0)
    gmm_reg_covar: float = Field(default=5e-4, gt=0.0)
    # Warm-up: CE (+ the confidence penalty mean sum p log p where DivideMix adds it: asymmetric noise
    # on CIFAR, always on Clothing1M, never on WebVision) with batches of warmup_batch_factor x the
    # probe's batch size (DivideMix's warm-up loaders: 2x on every dataset).
    warmup_penalty: bool = False
    warmup_batch_factor: int = Field(default=2, ge=1, le=64)
    # Which mixed rows the head is trained on: "all" (CIFAR script: Lx on the labeled half, lambda_u
    # x Lu on the unlabeled half, the prior penalty on all) or "labeled" (Clothing1M/WebVision
    # scripts: only the labeled half is mixed, partners from all rows, no Lu, penalty on those rows).
    mixmatch_rows: Literal["all", "labeled"] = "all"
    # Views of a frozen feature: dropout rate and Gaussian jitter (in units of each dimension's std).
    view_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    view_noise: float = Field(default=0.1, ge=0.0)


class UniconSection(Section):
    """lp-unicon: UNICON with two linear heads on cached features (turnctl/methods/unicon.py). Epochs,
    optimizer, lr, weight decay, batch size and schedule are the probe's (``probe.*``).

    Defaults are the original code's CIFAR defaults. UNICON's authors keep the same hyper-parameters
    at every noise level except the unlabeled batch, which they enlarge for high noise (both stated
    by the authors on the original repository's issue tracker); per dataset:

    =================== ============== ========== ============ ========= =========
    key                 CIFAR sym<=80% CIFAR 90%  Clothing1M   WebVision default
    =================== ============== ========== ============ ========= =========
    lambda_u            30             30         - (no Lu)    - (no Lu) 30
    alpha               4              4          0.5          0.5       4
    d_u / tau           0.7 / 5        0.7 / 5    0.7 / 5      0.7 / 5   0.7 / 5
    unlabeled_batch_k   2              1          null (= B)   null      2
    warmup_batch_factor 2              2          4            4         2
    warmup_penalty      no (asym: yes) no         yes          no        no
    mixmatch_rows       all            all        labeled      labeled   all
    guess_views         weak           weak       strong       strong    weak
    =================== ============== ========== ============ ========= =========
    """

    warmup_epochs: int = Field(default=5, ge=0)  # our choice for a 20-epoch LP (UNICON: 10-30/350)
    temperature: float = Field(default=0.5, gt=0.0)  # sharpening T (0.5 everywhere)
    alpha: float = Field(default=4.0, gt=0.0)  # Beta(alpha, alpha): 4 on CIFAR, 0.5 Clothing1M/WebVision
    # Unlabeled-MSE weight, ramped up linearly over rampup_epochs: 30 at every CIFAR noise level
    # (Tiny-ImageNet 50); Clothing1M and WebVision have no Lu term (mixmatch_rows "labeled").
    lambda_u: float = Field(default=30.0, ge=0.0)
    rampup_epochs: float = Field(default=16.0, gt=0.0)
    lambda_c: float = Field(default=0.025, ge=0.0)  # weight of the contrastive loss (everywhere)
    contrastive_temperature: float = Field(default=0.05, gt=0.0)  # SupConLoss temperature
    # Threshold = mean JSD (natural log, so JSD <= ln 2 = 0.693); when the mean exceeds d_u it is
    # lowered by (mean - min) / filter_coefficient (UNICON's --d_u 0.7 and --tau 5 at every noise
    # level; with natural-log JSD the mean never exceeds 0.7, so the cut never fires at 0.7).
    # null: always the plain mean.
    d_u: Optional[float] = Field(default=0.7, gt=0.0, le=1.0)
    filter_coefficient: float = Field(default=5.0, gt=0.0)
    # Unlabeled batch size per labeled batch of B: int(B / (k * SR)), SR the selection rate
    # (UNICON's CIFAR loader: k = 2; its authors' setting for high noise: k = 1); null: B (its
    # Clothing1M and WebVision loaders).
    unlabeled_batch_k: Optional[float] = Field(default=2.0, gt=0.0)
    # Warm-up: CE (+ the confidence penalty mean sum p log p where UNICON adds it: asymmetric noise on
    # CIFAR, the Clothing1M script) with batches of warmup_batch_factor x B (CIFAR 2, WebVision and
    # Clothing1M 4).
    warmup_penalty: bool = False
    warmup_batch_factor: int = Field(default=2, ge=1, le=64)
    # "all" (CIFAR) or "labeled" (Clothing1M/WebVision): as dividemix.mixmatch_rows.
    mixmatch_rows: Literal["all", "labeled"] = "all"
    # Which pair of views label guessing/refinement reads: "weak" (CIFAR: guess on the weak views,
    # mixup and contrastive loss on the strong ones) or "strong" (Clothing1M/WebVision: the reverse).
    guess_views: Literal["weak", "strong"] = "weak"
    view_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    view_noise: float = Field(default=0.1, ge=0.0)
    strong_factor: float = Field(default=2.0, ge=1.0)  # strong views: dropout and jitter times this


class NMTuneSection(Section):
    """nmtune / turn-nmtune step 1: NMTune on cached features (turnctl/methods/nmtune.py)."""

    epochs: int = Field(default=30, ge=0, le=10000)
    batch_size: int = Field(default=64, ge=2)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)  # AdamW
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    schedule: Literal["constant", "cosine"] = "cosine"  # per step
    hidden_mult: int = Field(default=4, ge=1)  # MLP = Linear(D, 4D)-BN-ReLU-Linear(4D, D)
    mse_weight: float = Field(default=1.0, ge=0.0)
    cov_weight: float = Field(default=0.04, ge=0.0)
    svd_weight: float = Field(default=1e-3, ge=0.0)
    svd_top_k: int = Field(default=5, ge=1)
    # When NMTune is TURN's step 1 (turn-nmtune) only; the nmtune baseline always uses CE and the last
    # epoch, as NMTune's paper and code. step1_loss: gce (TURN's robust step-1 loss, losses.gce_q /
    # gce_form) or ce. step1_select: best_val keeps the epoch with the best val accuracy (before the
    # MLP memorises the noise; the last epoch without a val split), last keeps the last.
    step1_loss: Literal["gce", "ce"] = "gce"
    step1_select: Literal["best_val", "last"] = "best_val"
    # Ridge of the least-squares fold of the feature MLP into one linear head (relative to the mean
    # non-zero eigenvalue of the features' Gram matrix, so N < D is well-posed); null: the one of
    # 1e-4..1 whose fold agrees best with the NMTune model on the val features (no labels used; a
    # held-out fifth of train without val). See turnctl/methods/nmtune.py.
    fold_ridge: Optional[float] = Field(default=None, gt=0.0)


class OutputSection(Section):
    dir: Optional[str] = None  # None: runs/<recipe>-<timestamp>
    keep_checkpoints: int = Field(default=2, ge=1)
    tensorboard: bool = True
    export_final: bool = True


class Recipe(Section):
    name: str = "recipe"
    description: str = ""
    method: Literal[METHODS] = "turn"  # type: ignore[valid-type]
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

    @field_validator("name")
    @classmethod
    def _name_is_one_path_part(cls, name: str) -> str:
        """The default run directory is runs/<name>-<time>: a name with a separator or '..' would put
        the run (and what it writes) outside runs/."""
        from pydantic_core import PydanticCustomError

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
        return yaml.dump(self.model_dump(mode="json"), Dumper=_NoAliasDumper, sort_keys=False)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---- loading --------------------------------------------------------------------------------

# A recipe is a page of settings; the bound keeps a wrong path (a log, a dataset file) from being read
# whole into memory before it is refused.
MAX_RECIPE_BYTES = 1 << 20
# Deep enough for any transformers config; a bound keeps composing (and later deepcopy, pydantic and
# json, all recursive) from a RecursionError on a file of nested brackets.
MAX_YAML_DEPTH = 64


class _YamlRefused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use (anchors and aliases, excessive nesting)."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases.

    Aliases let a few hundred bytes stand for billions of values ("billion laughs": nine levels of
    nine aliases each). The composer shares the node, so loading is cheap, but everything after it
    (the digest's JSON, deep copies, printing) walks the full expansion and runs out of memory. A
    recipe has no use for them, so the first anchor or alias is refused, before anything is built.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _YamlRefused(problem=("YAML anchors and aliases (&name, *name, <<: *name) are not allowed in a "
                                        "recipe; write the value out"), problem_mark=event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise _YamlRefused(problem=f"nested more than {MAX_YAML_DEPTH} levels deep",
                               problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_load(text: str) -> Any:
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str = "recipe") -> Any:
    """The YAML in a recipe file or a run's ``recipe.yaml``, read the one safe way: at most
    :data:`MAX_RECIPE_BYTES`, UTF-8, safe tags only, no anchors or aliases. Every problem is a
    one-line :class:`RecipeError` that names the file (and the line where YAML knows it)."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # read-bounded: stat lies for /dev/zero and growing files
    except OSError as err:
        raise RecipeError(f"{where}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: larger than {MAX_RECIPE_BYTES // (1 << 20)} MiB; a recipe is a small "
                          "YAML file (is this the right path?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    try:
        return _yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        if isinstance(err, _YamlRefused):
            raise RecipeError(f"{where}{line}: {err.problem}") from None
        # PyYAML's reader errors span lines ("...\n  in <unicode string>, position N"): one line.
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(f"{where}{line}: not valid YAML ({problem})") from None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."

def recipe_dirs() -> List[Path]:
    """Where ``--recipe NAME`` is looked up: $TURNCTL_RECIPES, the checkout, the installed package."""
    dirs: List[Path] = []
    if os.environ.get("TURNCTL_RECIPES"):
        dirs.append(Path(os.environ["TURNCTL_RECIPES"]))
    dirs.append(Path(__file__).resolve().parent.parent / "recipes")  # source checkout / editable
    try:
        dirs.append(Path(str(resources.files("turnctl") / "recipes")))  # wheel install
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return dirs


def available_recipes() -> List[str]:
    names = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return p
    for d in recipe_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    names = available_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; available: {', '.join(names)}"
    raise RecipeError(f"unknown recipe '{name_or_path}'{hint}")


def _unknown_keys(raw: Any, model: Type[BaseModel], prefix: str = "") -> List[Tuple[str, List[str]]]:
    """Unknown keys in ``raw`` with their valid siblings, recursing into section models."""
    if not isinstance(raw, dict):
        return []
    found = []
    fields = model.model_fields
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            found.append((path, [f"{prefix}{f}" for f in fields]))
            continue
        ann = fields[key].annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            found.extend(_unknown_keys(value, sub, path + "."))
    return found


def _parse_override(item: str) -> Tuple[List[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set '{item}' must look like key.path=value (e.g. finetune.lr=1e-4)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set '{item}': empty key segment")
    try:
        parsed = _yaml_load(value) if value.strip() else None
    except _YamlRefused as err:
        raise RecipeError(f"--set '{_short(item)}': {err.problem}") from None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise RecipeError(f"--set '{item}': '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if "input" in first and not isinstance(first["input"], (dict, list)):
        msg += f" (got {first['input']!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"recipe {source}: {loc}: {msg}{more}"


def validate_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: top level must be a mapping, got {type(raw).__name__}")
    unknown = _unknown_keys(raw, Recipe)
    if unknown:
        path, valid = unknown[0]
        close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
        raise RecipeError(f"recipe {source}: unknown key '{path}'{hint}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(source, err)) from None


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None) -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path, apply ``--set`` overrides, validate.

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
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, str(path))
