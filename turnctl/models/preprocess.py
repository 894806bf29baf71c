"""A checkpoint's preprocessing as a :class:`~turnctl.transforms.Preprocess`: the family defaults,
the Hugging Face ``preprocessor_config.json`` read into one (and written back next to an export),
and the recipe's ``model.image_size`` over both.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from turnctl.models.families import EFFICIENTNET
from turnctl.models.hub import read_processor_config
from turnctl.recipe import ModelSection
from turnctl.transforms import RESAMPLE_BY_CODE, Preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD = (0.498,) * 3, (0.502,) * 3


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
        s = image_size or EFFICIENTNET[family][3]
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


def preprocess_to_hf(pp: Preprocess) -> Dict[str, Any]:
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


def derive_preprocess(family: str, native: int, source: Optional[str], mc: ModelSection,
                      local_files_only: Optional[bool]) -> Preprocess:
    """Family defaults at the native size, then the checkpoint's image-processor config when there is
    one, then the recipe's ``model.image_size``: the order in which each may override the last."""
    pp = family_default_preprocess(family, native)
    if source:
        pcfg = read_processor_config(source, mc.revision, local_files_only)
        if pcfg:
            pp = preprocess_from_hf(pcfg, pp)
    if mc.image_size:
        pp = pp.with_image_size(mc.image_size)
    return pp

