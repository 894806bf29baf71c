"""How an export is laid out on disk.

An export is written in the layout of a stock transformers class that computes turnctl's logits
whenever one exists, so that AutoModelForImageClassification.from_pretrained(export) gives the logits
`turnctl eval` gives. turnctl.json records the outcome: ``auto_model_for_image_classification``,
``logits_python`` (the lines that give those logits outside turnctl, from `d` = the export directory
and `x` = preprocessed pixels; a stock call where there is one) and ``load`` (the turnctl family and
pooling that rebuild the model from config.json: what load_exported does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from turnctl.models.exportdir import HEAD_FILE
from turnctl.models.families import HF_SPECS, ModelError, resolve_pooling
from turnctl.models.hub import quiet_transformers

# config.model_type of the encoder -> its kind; a kind is also the turnctl family of that architecture
# (an MAE encoder is already a ViTConfig here).
ENCODER_KIND = {"vit": "vit", "vit_msn": "vit_msn", "clip": "clip", "clip_vision_model": "clip",
                "dinov2": "dinov2", "convnext": "convnext", "resnet": "resnet"}


@dataclass(frozen=True)
class Layout:
    family: str        # the turnctl family that rebuilds the export from its config.json
    pooling: str       # that family's model.pooling giving the same features
    classifier: str    # "head" as is; "cls_half"/"mean_half": zero-padded into DINOv2's [CLS, mean] input
    stock: bool        # AutoModelForImageClassification(...).logits are turnctl's logits
    from_vit: bool = False  # ViT weights written as the same network in DINOv2's layout (layer scale 1)


# (encoder kind, resolved pooling) -> layout. An auto model pooled otherwise (ViT's tanh pooler,
# ConvNeXt's mean without the final layernorm, other architectures) keeps AutoModel's layout.
_LAYOUTS: Dict[Tuple[str, str], Layout] = {
    ("vit", "cls"): Layout("vit", "cls", "head", True),
    # No ViT class mean-pools. DINOv2 is a ViT with layer scale; its head reads [CLS, mean of the patch
    # tokens] after the same final layernorm, so zeros on the CLS half leave turnctl's mean pooling.
    ("vit", "mean"): Layout("dinov2", "mean", "mean_half", True, from_vit=True),
    ("vit_msn", "cls"): Layout("vit_msn", "cls", "head", True),
    ("vit_msn", "mean"): Layout("dinov2", "mean", "mean_half", True, from_vit=True),
    ("clip", "mean"): Layout("clip", "mean", "head", True),
    # CLIP's layernorm right after the embeddings exists in no class with a CLS head (and a layernorm
    # cannot be folded into weights): CLIPForImageClassification's weights, turnctl's pooling spelled out.
    ("clip", "pooler"): Layout("clip", "pooler", "head", False),
    ("clip", "cls"): Layout("clip", "cls", "head", False),
    ("dinov2", "cls+mean"): Layout("dinov2", "default", "head", True),
    ("dinov2", "cls"): Layout("dinov2", "cls", "cls_half", True),
    ("dinov2", "pooler"): Layout("dinov2", "cls", "cls_half", True),  # auto: Dinov2Model's pooler is the CLS
    ("dinov2", "mean"): Layout("dinov2", "mean", "mean_half", True),
    ("convnext", "pooler"): Layout("convnext", "pooler", "head", True),
    ("resnet", "pooler"): Layout("resnet", "pooler", "head", True),
    ("resnet", "mean"): Layout("resnet", "pooler", "head", True),  # auto: ResNet's pooler is the spatial mean
}


def export_layout(config, pooling: str) -> Optional[Layout]:
    """The stock layout for an encoder with this config pooled this way (None: there is none)."""
    kind = ENCODER_KIND.get(config.model_type)
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


def set_labels(config, num_classes: int, class_names: Optional[Sequence[str]]) -> None:
    """A transformers config's head size and label names (what its id2label shows users)."""
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


def write_layout(out: Path, layout: Layout, encoder: Mapping[str, torch.Tensor], config,
                 head: Tuple[torch.Tensor, torch.Tensor], class_names: Optional[Sequence[str]]) -> str:
    """config.json + model.safetensors of ``layout``'s transformers class, holding ``encoder`` (the
    encoder's state dict, without the class's prefix) and the head; returns the class name."""
    import copy

    import transformers

    spec = HF_SPECS[layout.family]
    if layout.from_vit:
        config, encoder = _vit_as_dinov2(config, encoder)
    elif layout.family == "clip" and config.model_type == "clip_vision_model":  # auto: a vision tower alone
        config = transformers.CLIPConfig(vision_config=config.to_dict())
    else:
        config = copy.deepcopy(config)
    set_labels(config, int(head[0].shape[0]), class_names)
    # A skeleton on the meta device (no memory): every tensor is replaced below. Built with the class
    # itself, not _from_config, which under ZeRO-3 would partition it with collectives while only
    # rank 0 exports.
    with torch.device("meta"), quiet_transformers():
        model = getattr(transformers, spec.cls_name)(config)
    state = {f"{spec.base_attr}.{k}": v.detach().cpu() for k, v in encoder.items()}
    state.update(_classifier_state(model, layout.classifier, *head))
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in state]
    if missing:  # pragma: no cover - a layout whose weights this code does not map
        raise ModelError(f"cannot export as {spec.cls_name}: no weights for {missing[0]}")
    # keys the class has no use for (ViTModel's pooler, non-persistent buffers) are left out
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
    return spec.cls_name


# turnctl.models.hf's _pool as Python over `out`, a transformers model output
_POOL_PYTHON = {
    "pooler": "features = out.pooler_output.flatten(1)",
    "cls": "features = out.last_hidden_state[:, 0]",
    "mean": "h = out.last_hidden_state\nfeatures = h.mean((-2, -1)) if h.dim() == 4 else h[:, 1:].mean(1)",
}


def hf_logits_python(layout: Layout, interpolate: bool) -> str:
    call = "pixel_values=x, interpolate_pos_encoding=True" if interpolate else "pixel_values=x"
    lines = ["import transformers", "model = transformers.AutoModelForImageClassification.from_pretrained(d)"]
    if layout.stock:
        return "\n".join(lines + [f"logits = model({call}).logits"])
    pooling = resolve_pooling(layout.family, layout.pooling)
    return "\n".join(lines + [f"out = model.{HF_SPECS[layout.family].base_attr}({call})", _POOL_PYTHON[pooling],
                              "logits = model.classifier(features)"])


def auto_logits_python(pooling: str) -> str:
    return "\n".join(["import torch, transformers", "from safetensors.torch import load_file",
                      "model = transformers.AutoModel.from_pretrained(d)",
                      f"head = load_file(d + '/{HEAD_FILE}')", "out = model(pixel_values=x)", _POOL_PYTHON[pooling],
                      "logits = torch.nn.functional.linear(features, head['weight'], head['bias'])"])


def load_fields(family: str, pooling: str, hf_class: Optional[str], stock: bool, python: str) -> Dict[str, Any]:
    """turnctl.json's account of how to load an export (see the module docstring)."""
    return {"hf_class": hf_class, "auto_model_for_image_classification": stock,
            "load": {"family": family, "pooling": pooling}, "logits_python": python}
