"""Building a :class:`~turnctl.models.interface.Backbone`: :func:`load_backbone` from a recipe's
``model`` section (dispatching on ``model.family``), and :func:`load_exported`, which rebuilds a
``save_pretrained`` directory through the family and pooling its ``turnctl.json`` records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from turnctl.models.efficientnet import build_efficientnet
from turnctl.models.exportdir import EXPORT_FORMAT, HEAD_FILE, META_FILE
from turnctl.models.families import ModelError, uses_channels_last
from turnctl.models.hf import build_auto, build_hf
from turnctl.models.hub import maybe_hf_ds_config
from turnctl.models.interface import Backbone
from turnctl.recipe import FAMILIES, ModelSection
from turnctl.transforms import Preprocess

log = logging.getLogger("turnctl")


def load_backbone(model_cfg: ModelSection, *, num_classes: int, ds_config: Optional[Mapping[str, Any]] = None,
                  local_files_only: Optional[bool] = None, class_names: Optional[Sequence[str]] = None,
                  preprocess: Optional[Preprocess] = None) -> Backbone:
    """Build the recipe's backbone with a ``num_classes``-way head, in eval mode.

    ``model_cfg.name_or_path`` is a hub id or a local directory (``config`` then overrides config
    fields); without it, ``model_cfg.config`` builds a random-init model (tests), and the
    EfficientNet families fall back to their packaged ImageNet weights. ``ds_config`` with ZeRO
    stage 3 builds (and keeps) ``HfDeepSpeedConfig`` first. ``preprocess`` overrides the derived
    preprocessing (used by :func:`load_exported`).

    >>> import torch
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
    hf_ds = maybe_hf_ds_config(ds_config)  # before any from_pretrained: ZeRO-3 partitions while loading
    if model_cfg.family.startswith("efficientnet"):
        bb: Backbone = build_efficientnet(model_cfg, num_classes=num_classes, class_names=class_names,
                                          preprocess=preprocess)
    elif model_cfg.family == "auto":
        bb = build_auto(model_cfg, num_classes=num_classes, class_names=class_names,
                        local_files_only=local_files_only, preprocess=preprocess)
    else:
        bb = build_hf(model_cfg, num_classes=num_classes, class_names=class_names,
                      local_files_only=local_files_only, preprocess=preprocess)
    bb.hf_deepspeed_config = hf_ds
    bb.channels_last = uses_channels_last(model_cfg.family, model_cfg.memory_format)
    bb.eval()
    log.info("%s", bb.describe())
    return bb


def load_exported(path, *, ds_config: Optional[Mapping[str, Any]] = None) -> Backbone:
    """Reload a :meth:`Backbone.save_pretrained` directory: same family, pooling, preprocessing,
    class names and weights (head included), offline.

    >>> import tempfile, torch
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
