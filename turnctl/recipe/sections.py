"""The recipe's sections: one pydantic model per key of a recipe, each forbidding unknown keys.

turnctl/recipe/__init__.py puts them together as :class:`~turnctl.recipe.Recipe`; every default and
range of a hyper-parameter lives here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from turnctl.trackers import TRACKER_NAMES

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
    # How image batches enter the network. channels_last (NHWC) lets oneDNN / cuDNN pick their fast
    # convolution kernels: EfficientNet-Lite0 at 64 px on 2 CPU cores trains 1.6x faster with it
    # (benchmarks/RESULTS.md, bench_overhead.py). auto: channels_last for the convolutional families
    # (efficientnet_*, convnext, resnet), unchanged for the transformers (a patch embedding is one
    # convolution). Only the input is converted; weights, checkpoints and exports are unaffected.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # Activation checkpointing while fine-tuning: recompute each layer's activations in the backward
    # pass (transformers families only; about a third more compute for much less activation memory).
    # An `activation_checkpointing` section in a --deepspeed file turns it on.
    gradient_checkpointing: bool = False

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


class _Training(Section):
    """What the linear probe and fine-tuning both set; the defaults are the probe's (the fine-tuning
    section overrides those that differ)."""

    epochs: int = Field(default=20, ge=0, le=10000)
    loss: Literal["ce", "gce", "elr"] = "gce"
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=1e-2, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-3, ge=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(default=128, ge=1)
    schedule: Literal["constant", "cosine"] = "cosine"


class ProbeSection(_Training):
    """Linear probing on frozen features (TURN step 1; the LP baselines)."""

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
    # The paper cleanses every epoch, so the balanced subset is redrawn every epoch.
    redraw_each_epoch: bool = True
    seed: Optional[int] = None  # None: derived from the run seed and the epoch


class FinetuneSection(_Training):
    """Full fine-tuning with DeepSpeed (TURN step 2, the FFT baselines). ``batch_size`` is the
    global batch (paper: 128) = micro_batch_size x gradient accumulation x world size."""

    epochs: int = Field(default=4, ge=0, le=10000)  # TURN's E_FFT
    loss: Literal["ce", "gce", "elr"] = "ce"
    weight_decay: float = Field(default=1e-5, ge=0.0, le=1.0)
    baseline_epochs: int = Field(default=5, ge=0, le=10000)  # the FFT baselines (paper: 5)
    # At most this many optimizer steps per fine-tuning epoch (the rest of the epoch's subset is not
    # read): for smoke tests and scale rehearsals (benchmarks/bench_scale.py), never for results.
    # None: the whole subset, as the paper.
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=32, ge=1)
    # Linear LR warmup over this fraction of the fine-tuning (Hugging Face Trainer's `warmup_ratio`),
    # then the schedule over the rest. The fraction is of *training progress* (epochs done, as the
    # cosine), not of a step count TURN cannot know in advance: its clean subset, and with it the
    # epoch's length, is redrawn every epoch (turnctl/finetune.py). 0: no warmup (the paper's).
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=0.5)
    # Legacy: warmup over the first N optimizer steps, multiplied into the cosine. Still honoured so
    # older recipes reproduce their runs; a recipe sets this or warmup_ratio, not both.
    warmup_steps: int = Field(default=0, ge=0)
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
    # In a log file (stderr not a terminal): one progress line per long phase (extraction, loss
    # pass, fine-tuning epoch, evaluation) at most this often; TURNCTL_PROGRESS_EVERY_S overrides.
    progress_every_s: float = Field(default=60.0, gt=0, le=86400)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Legacy switch of the TensorBoard writer (<run>/tensorboard/): it decides only while report_to is
    # unset (null). Setting both and contradicting each other is an error.
    tensorboard: bool = True
    export_final: bool = True
    # During full fine-tuning, one "finetune_step" line in metrics.jsonl (and in the trackers) every
    # this many optimizer steps: the mean loss since the previous line, the LR, samples/s and the
    # gradient norm (HF Trainer's logging_steps, same default). 0 turns the per-step lines off.
    log_every_steps: int = Field(default=50, ge=0)
    # Experiment trackers, rank 0 only (turnctl/trackers.py; HF Trainer's report_to): a list of
    # tensorboard, mlflow, wandb. Every name listed must be installed (pip install 'turnctl[mlflow]'),
    # else the run stops before it starts, as HF Trainer does. null (the default): today's rule,
    # TensorBoard when output.tensorboard is true and it is installed (a notice once when it is not).
    # [] turns every tracker off.
    report_to: Optional[List[Literal[TRACKER_NAMES]]] = None  # type: ignore[valid-type]

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_name_is_a_list(cls, value: Any) -> Any:
        """``--set output.report_to=mlflow`` (one name) and "none" (HF's spelling of no tracker)."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: Optional[List[str]]) -> Optional[List[str]]:
        return None if value is None else list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _tensorboard_agrees(self):
        if self.report_to is not None and not self.tensorboard and "tensorboard" in self.report_to:
            raise ValueError("output.tensorboard is false but output.report_to lists tensorboard; "
                             "drop one of them")
        return self
