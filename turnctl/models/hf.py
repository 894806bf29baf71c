"""The transformers families: a ``*ForImageClassification`` model whose classifier is the head
(vit, vit_mae, vit_msn, clip, dinov2, convnext, resnet), and ``auto``, any ``AutoModel`` plus an
``nn.Linear``; how each pools its features, checks its input and builds itself from a checkpoint
or a ``model.config``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from turnctl.models.families import FAMILY_OF_TYPE, HF_SPECS, HFSpec, ModelError, resolve_pooling
from turnctl.models.hub import config_from_dict, from_pretrained, load_config, quiet_transformers
from turnctl.models.interface import Backbone
from turnctl.models.layouts import (
    ENCODER_KIND, Layout, auto_logits_python, export_layout, hf_logits_python, load_fields, set_labels,
    write_layout,
)
from turnctl.models.preprocess import derive_preprocess
from turnctl.recipe import ModelSection
from turnctl.transforms import Preprocess


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

    def __init__(self, *, spec: HFSpec, **kw):
        super().__init__(**kw)
        self.spec = spec

    @property
    def head(self) -> nn.Linear:
        clf = self.model.classifier
        return clf[1] if isinstance(clf, nn.Sequential) else clf  # ResNet: Flatten, Linear

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        base = getattr(self.model, self.spec.base_attr)
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        return _pool(base(pixel_values=self._layout(pixel_values), **kwargs), self.pooling)

    def _save_weights(self, out, sd, head, class_names):
        sd = sd if sd is not None else self.model.state_dict()
        base = self.spec.base_attr + "."
        encoder = {k[len(base):]: v for k, v in sd.items() if k.startswith(base)}
        config = self.model.config
        # No stock equivalent (clip's pooler/cls; a ViT whose MLP width DINOv2 cannot hold): this class, with
        # turnctl's pooling spelled out in logits_python.
        layout = export_layout(config, self.pooling) or \
            Layout(ENCODER_KIND[config.model_type], self.pooling, "head", False)
        hf_class = write_layout(out, layout, encoder, config, head, class_names)
        interpolate = self.interpolate_pos_encoding and HF_SPECS[layout.family].interpolate_flag
        return load_fields(layout.family, layout.pooling, hf_class, layout.stock,
                           hf_logits_python(layout, interpolate))


class AutoBackbone(Backbone):
    """Any ``AutoModel`` with a pooled (or token / map) output, plus an ``nn.Linear`` head."""

    def __init__(self, *, classifier: nn.Linear, **kw):
        super().__init__(**kw)
        self.classifier = classifier

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = _pool(self.model(pixel_values=self._layout(pixel_values)), self.pooling)
        if f.shape[-1] != self.feature_dim:
            raise ModelError(f"auto backbone: the {self.pooling} output has {f.shape[-1]} dims, the config says "
                             f"{self.feature_dim}; use a dedicated family or another pooling")
        return f

    def _save_weights(self, out, sd, head, class_names):
        sd = sd if sd is not None else self.model.state_dict()
        layout = export_layout(self.model.config, self.pooling)
        if layout is not None:  # an architecture turnctl knows, pooled as one of its classes pools
            hf_class = write_layout(out, layout, sd, self.model.config, head, class_names)
            return load_fields(layout.family, layout.pooling, hf_class, layout.stock,
                               hf_logits_python(layout, False))
        with quiet_transformers():
            self.model.save_pretrained(str(out), state_dict=sd, safe_serialization=True)
        return load_fields("auto", self.requested_pooling, type(self.model).__name__, False,
                           auto_logits_python(self.pooling))


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


def build_hf(mc: ModelSection, *, num_classes: int, class_names, local_files_only,
             preprocess: Optional[Preprocess]) -> HFBackbone:
    import transformers

    family, spec = mc.family, HF_SPECS[mc.family]
    source = mc.name_or_path
    pooling = resolve_pooling(family, mc.pooling)
    if source:
        config = load_config(source, family, mc.revision, local_files_only)
    else:
        config = config_from_dict(family, mc.config or {})
    if config.model_type not in spec.model_types:
        hint = FAMILY_OF_TYPE.get(config.model_type, "auto")
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
    set_labels(config, num_classes, class_names)
    vcfg = _vision_config(config)

    pp = preprocess
    if pp is None:
        # DINOv2 configs carry the 518 px position grid, but the model is used (and its processor
        # crops) at 224; the others' config image_size is their training resolution.
        native = 224 if family == "dinov2" else int(getattr(vcfg, "image_size", 224) or 224)
        pp = derive_preprocess(family, native, source, mc, local_files_only)
    _check_input(family, vcfg, pp, source or "model.config", spec.patch)

    cls = getattr(transformers, spec.cls_name)
    if vision_only:
        with quiet_transformers():
            model = cls._from_config(config)
        if source:
            model.vision_model = from_pretrained(transformers.CLIPVisionModel, source, family=family,
                                                 config=vision_cfg, revision=mc.revision,
                                                 local_files_only=local_files_only, head_prefixes=())
    elif source:
        model = from_pretrained(cls, source, family=family, config=config, revision=mc.revision,
                                local_files_only=local_files_only)
    else:
        with quiet_transformers():
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


def build_auto(mc: ModelSection, *, num_classes, class_names, local_files_only, preprocess) -> AutoBackbone:
    from transformers import AutoModel

    pooling = resolve_pooling("auto", mc.pooling)
    source = mc.name_or_path
    if source:
        config = load_config(source, "auto", mc.revision, local_files_only)
        for k, v in (mc.config or {}).items():
            setattr(config, k, v)
        model = from_pretrained(AutoModel, source, family="auto", config=config, revision=mc.revision,
                                local_files_only=local_files_only, head_prefixes=())
    else:
        if not (mc.config or {}).get("model_type"):
            raise ModelError("family auto with model.config needs config.model_type (e.g. vit, convnext, swin)")
        config = config_from_dict("auto", mc.config)
        with quiet_transformers():
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
        pp = derive_preprocess("auto", native, source, mc, local_files_only)
    patch = getattr(vcfg, "patch_size", None)
    _check_input("auto", vcfg, pp, source or "model.config", isinstance(patch, int) and patch > 1)
    return AutoBackbone(classifier=nn.Linear(dim, num_classes), family="auto", model=model, preprocess=pp,
                        pooling=pooling, requested_pooling=mc.pooling, feature_dim=dim,
                        num_classes=num_classes, class_names=class_names, source=source)
