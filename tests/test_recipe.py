"""Typed recipes: unknown keys, typed --set overrides, ranges, the batch triad, shipped recipes."""

import pytest
import yaml

from turnctl.errors import RecipeError
from turnctl.recipe import available_recipes, load_recipe, resolve_recipe_path, validate_recipe

SHIPPED = ["vit_b16", "vit_l16", "clip_b16", "clip_l14", "convnext_t", "mae_b16", "msn_b16",
           "resnet50", "tiny", "demo"]


def test_all_shipped_recipes_exist_and_validate():
    assert set(SHIPPED) <= set(available_recipes())
    for name in SHIPPED:
        r = load_recipe(name)
        assert r.name == name
        r.deepspeed_config(world_size=1)


@pytest.mark.parametrize("name,lp,fft", [
    ("vit_b16", ("sgd", 1e-2, 1e-3), ("sgd", 1e-2, 1e-5)),
    ("convnext_t", ("sgd", 1e-1, 1e-4), ("adamw", 1e-4, 1e-4)),
    ("mae_b16", ("adamw", 1e-2, 1e-5), ("adamw", 1e-4, 1e-3)),
    ("msn_b16", ("sgd", 1e-2, 1e-2), ("sgd", 1e-3, 1e-5)),
    ("clip_b16", ("adamw", 1e-3, 1e-6), ("adamw", 1e-5, 1e-5)),
    ("resnet50", ("adamw", 1e-3, 1e-5), ("adamw", 1e-3, 1e-5)),
])
def test_paper_table8_hyper_parameters(name, lp, fft):
    r = load_recipe(name)
    assert (r.probe.optimizer, r.probe.lr, r.probe.weight_decay) == lp
    assert (r.finetune.optimizer, r.finetune.lr, r.finetune.weight_decay) == fft
    assert r.probe.epochs == 20 and r.finetune.epochs == 4 and r.finetune.batch_size == 128
    assert r.probe.loss == "gce" and r.losses.gce_q == 0.7 and r.cleanse.tau == 0.6


def test_gpu_recipes_use_bf16_and_zero2():
    for name in SHIPPED[:8]:
        r = load_recipe(name)
        assert r.deepspeed.precision == "bf16" and r.deepspeed.zero_stage == 2
        assert r.deepspeed_config(8, "cuda")["bf16"] == {"enabled": True}


def test_misspelt_key_in_file_names_it_and_the_closest_key(tmp_path):
    raw = yaml.safe_load(resolve_recipe_path("tiny").read_text())
    raw["cleanse"]["tua"] = 0.5
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'cleanse.tua' \(did you mean 'cleanse.tau'\?\)"):
        load_recipe(str(p))


def test_unknown_top_level_section():
    with pytest.raises(RecipeError, match=r"unknown key 'finetuning' \(did you mean 'finetune'\?\)"):
        validate_recipe({"model": {"family": "vit", "config": {}}, "finetuning": {}})


def test_set_overrides_are_typed():
    r = load_recipe("tiny", ["finetune.lr=1e-4", "deepspeed.zero_stage=3", "cleanse.redraw_each_epoch=false",
                             "data.shards=/tmp/x", "probe.epochs=7"])
    assert r.finetune.lr == pytest.approx(1e-4) and isinstance(r.finetune.lr, float)
    assert r.deepspeed.zero_stage == 3
    assert r.cleanse.redraw_each_epoch is False
    assert r.data.shards == "/tmp/x"
    assert r.probe.epochs == 7


@pytest.mark.parametrize("override,match", [
    ("finetune.lr=abc", r"finetune.lr: .*number"),
    ("cleanse.tau=1.5", r"cleanse.tau: .*less than 1"),
    ("probe.epochs=-1", r"probe.epochs: .*greater than or equal to 0"),
    ("deepspeed.zero_stage=5", r"deepspeed.zero_stage"),
    ("finetune.lrr=1", r"unknown key 'finetune.lrr' \(did you mean 'finetune.lr'\?\)"),
    ("method=dividemix", r"method: Input should be"),
    ("finetune", r"must look like key.path=value"),
    ("finetune.lr.x=1", r"'lr' is a value, not a section"),
])
def test_set_overrides_are_validated(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("tiny", [override])


def test_batch_triad_checked_against_world_size():
    r = load_recipe("tiny")  # batch 16, micro 4
    assert r.grad_accum(1) == 4 and r.grad_accum(2) == 2 and r.grad_accum(4) == 1
    with pytest.raises(RecipeError, match=r"finetune.batch_size=16 must be a multiple of .* world size \(3\) = 12"):
        r.deepspeed_config(world_size=3)


def test_deepspeed_config_is_explicit():
    r = load_recipe("tiny", ["deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"])
    cfg = r.deepspeed_config(world_size=2)
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "bf16" not in cfg  # auto precision is fp32 on CPU


def test_extra_deepspeed_keys_cannot_break_the_triad():
    with pytest.raises(RecipeError, match="batch triad"):
        load_recipe("tiny", ["deepspeed.extra={train_batch_size: 7}"]).deepspeed_config(1)


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  family: vit\n  config: {a: 1\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: not valid YAML"):
        load_recipe(str(p))


def test_recipe_by_path_and_digest_is_stable(tmp_path):
    a = load_recipe("tiny")
    p = tmp_path / "copy.yaml"
    p.write_text(a.to_yaml())
    b = load_recipe(str(p))
    assert a.digest() == b.digest()
    assert load_recipe("tiny", ["seed=1"]).digest() != a.digest()


def test_model_needs_a_source():
    with pytest.raises(RecipeError, match="model.name_or_path"):
        validate_recipe({"model": {"family": "vit"}})
