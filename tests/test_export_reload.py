"""Every family's export, for every pooling it supports: the logits `turnctl eval`'s loading of the
export gives are the trained model's, and AutoModelForImageClassification.from_pretrained(export)
gives them too, or, where no transformers class pools as turnctl does, the lines turnctl.json records
in ``logits_python`` do (run here exactly as recorded). Tiny random models built from configs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import transformers as T
from turnctl.models import load_backbone
from turnctl.evaluate import load_model
from turnctl.recipe import ModelSection, load_recipe
from turnctl.transforms import eval_transform

V = load_recipe("tiny").model.config  # the tiny recipe's 2-layer ViT, 32 px, patch 8
CNN = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
RESNET = {**CNN, "embedding_size": 8, "layer_type": "basic"}
EFFICIENTNET = {"width_coefficient": 0.25, "depth_coefficient": 0.25}  # fewer, narrower blocks: fast
CLASSES = ["a", "b", "c", "d", "e"]


def case(family, pooling, config, *, stock, size=None, flag=False, auto=None):
    """``stock``: AutoModelForImageClassification(...).logits must be turnctl's; ``flag``: that call
    needs interpolate_pos_encoding=True (a ViT-like model run at another size than its config's)."""
    name = f"{family}{'-' + auto if auto else ''}-{pooling}{f'-{size}px' if size else ''}"
    cfg = {"model_type": auto, **config} if auto else config
    return pytest.param(family, pooling, cfg, size, stock, flag, id=name)


CASES = [
    *(case("vit", p, V, stock=True) for p in ("default", "cls", "mean")),
    case("vit", "default", V, size=48, flag=True, stock=True),
    case("vit", "mean", V, size=48, stock=True),  # written as DINOv2, which always interpolates
    *(case(f, p, V, stock=True) for f in ("vit_mae", "vit_msn") for p in ("default", "mean")),
    *(case("clip", p, V, stock=False) for p in ("default", "pooler", "cls")),
    case("clip", "mean", V, stock=True),
    case("clip", "mean", V, size=48, flag=True, stock=True),
    case("clip", "default", V, size=48, stock=False),
    *(case("dinov2", p, V, stock=True) for p in ("default", "cls", "pooler", "mean")),
    case("dinov2", "cls", V, size=48, stock=True),
    *(case("convnext", p, CNN, stock=True) for p in ("default", "pooler", "mean")),
    *(case("resnet", p, RESNET, stock=True) for p in ("default", "pooler", "mean")),
    case("auto", "default", V, auto="vit", stock=False),  # ViTModel's tanh pooler: no class has it
    *(case("auto", p, V, auto="vit", stock=True) for p in ("cls", "mean")),
    case("auto", "cls", V, auto="vit_msn", stock=True),
    *(case("auto", p, V, auto="dinov2", stock=True) for p in ("default", "cls", "mean")),
    case("auto", "default", CNN, auto="convnext", stock=True),
    case("auto", "mean", CNN, auto="convnext", stock=False),  # the map's mean without ConvNeXt's layernorm
    *(case("auto", p, RESNET, auto="resnet", stock=True) for p in ("default", "mean")),
    case("auto", "default", V, auto="clip_vision_model", stock=False),
    case("auto", "mean", V, auto="clip_vision_model", stock=True),
    case("auto", "default", CNN, auto="convnextv2", stock=False),  # an architecture turnctl has no layout for
    *(case("efficientnet_lite0", p, EFFICIENTNET, stock=False) for p in ("default", "mean")),
    case("efficientnet_lite1", "default", EFFICIENTNET, stock=False),
]


@pytest.fixture(scope="module", autouse=True)
def _quiet_hf():
    T.utils.logging.disable_progress_bar()
    yield
    T.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 52), (64, 64), (37, 90))]


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    # A random init leaves every layernorm at (1, 0), DINOv2's layer scales at 1 and batch-norm statistics
    # at (0, 1): an export that swapped or dropped one of them would still give the same logits.
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.add_(0.1 * torch.randn_like(b))
        elif name.endswith("running_var"):
            b.mul_(0.5 + torch.rand_like(b))


def _needs(family):
    if family.startswith("efficientnet"):
        pytest.importorskip("efficientnet_lite_pytorch")


@pytest.mark.parametrize("family,pooling,config,size,stock,flag", CASES)
def test_export_reloads_with_the_logits_turnctl_eval_gives(family, pooling, config, size, stock, flag,
                                                            images, tmp_path):
    _needs(family)
    torch.manual_seed(0)
    bb = load_backbone(ModelSection(family=family, config=config, pooling=pooling, image_size=size),
                       num_classes=len(CLASSES), class_names=CLASSES)
    _perturb(bb)
    out = bb.save_pretrained(tmp_path / "final")
    meta = json.loads((out / "turnctl.json").read_text())

    model, _ = load_model(out)  # what `turnctl eval --checkpoint .../final` evaluates
    assert (model.family, model.requested_pooling, model.preprocess) == (family, pooling, bb.preprocess)
    x = torch.stack([eval_transform(model.preprocess)(im) for im in images])
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, bb(x), rtol=1e-5, atol=1e-5)  # the trained model's logits

    assert meta["auto_model_for_image_classification"] is stock
    if stock:
        hf, info = T.AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        kwargs = {"interpolate_pos_encoding": True} if flag else {}
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(pixel_values=x, **kwargs).logits, ours, rtol=1e-4, atol=1e-5)
        assert [hf.config.id2label[i] for i in range(len(CLASSES))] == CLASSES

    # The recorded lines, run as recorded (they are what turnctl.json tells a user without turnctl to do);
    # for stock exports they are the AutoModelForImageClassification call itself.
    scope = {"d": str(out), "x": x}
    with torch.no_grad():
        exec(meta["logits_python"], scope)  # noqa: S102 - our own export's recorded recipe
    torch.testing.assert_close(scope["logits"], ours, rtol=1e-4, atol=1e-5)


def test_a_mean_pooled_vit_is_exported_as_dinov2_and_reloaded_as_the_vit_it_was(tmp_path):
    bb = load_backbone(ModelSection(family="vit", config=V, pooling="mean"), num_classes=3)
    out = bb.save_pretrained(tmp_path / "e")
    assert json.loads((out / "config.json").read_text())["model_type"] == "dinov2"
    meta = json.loads((out / "turnctl.json").read_text())
    assert (meta["family"], meta["load"], meta["hf_class"]) == \
        ("vit", {"family": "dinov2", "pooling": "mean"}, "Dinov2ForImageClassification")
    again, _ = load_model(out)
    assert (again.family, again.pooling, again.feature_dim, again.head.in_features) == ("vit", "mean", 32, 32)
    # and an export of the reloaded model is the same export again
    twice = json.loads((again.save_pretrained(tmp_path / "f") / "turnctl.json").read_text())
    assert (twice["family"], twice["load"], twice["auto_model_for_image_classification"]) == \
        ("vit", meta["load"], True)


def test_an_export_without_a_load_record_loads_in_its_own_family(tmp_path):
    # exports written before turnctl.json recorded "load" are in their family's own layout
    bb = load_backbone(ModelSection(family="vit", config=V), num_classes=3)
    out = bb.save_pretrained(tmp_path / "e")
    meta = json.loads((out / "turnctl.json").read_text())
    del meta["load"]
    (out / "turnctl.json").write_text(json.dumps(meta))
    x = torch.randn(2, 3, 32, 32)
    again, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(x), bb(x))
