"""``turnctl train --deepspeed ds_config.json``: the merge rule of turnctl/recipe/dsfile.py, and each
family of keys reaching the real DeepSpeed engine on two CPU ranks."""

import json

import pytest

from launch import REPO, check, deepspeed_cmd, run
from turnctl.errors import RecipeError
from turnctl.recipe import load_recipe


def _file(tmp_path, name, cfg) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(cfg))
    return str(p)


def test_recipe_keys_go_into_the_recipe_and_the_rest_to_deepspeed_extra(tmp_path):
    f = _file(tmp_path, "ds.json", {
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True,
                              "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto"},
        "fp16": {"enabled": False}, "bf16": {"enabled": True},
        "communication_data_type": "fp32", "activation_checkpointing": {"partition_activations": False},
        "steps_per_print": 50})
    r = load_recipe("tiny", deepspeed_file=f, world_size=2)
    assert (r.finetune.batch_size, r.finetune.micro_batch_size, r.finetune.gradient_clipping) == (32, 8, 0.5)
    assert (r.deepspeed.zero_stage, r.deepspeed.offload_optimizer, r.deepspeed.precision) == (3, True, "bf16")
    assert r.deepspeed.stage3_param_persistence_threshold == 0 and r.model.gradient_checkpointing
    assert r.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}, "communication_data_type": "fp32",
                                 "activation_checkpointing": {"partition_activations": False},
                                 "steps_per_print": 50}
    cfg = r.deepspeed_config(2, "cuda")
    assert cfg["zero_optimization"]["overlap_comm"] is True and "reduce_bucket_size" not in cfg["zero_optimization"]
    assert cfg["steps_per_print"] == 50 and cfg["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("cfg,overrides,message", [
    ({"optimizer": {"type": "Adam"}}, [], "key 'optimizer' is not supported: turnctl builds the optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, [], "key 'scheduler' is not supported"),
    ({"zero_optimization": {"stage": 3}}, ["deepspeed.zero_stage=2"],
     "sets deepspeed.zero_stage=3 but --set deepspeed.zero_stage=2 says otherwise"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, [], "NVMe offload is not implemented"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], "both true"),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 3}, [], "gradient_accumulation_steps=3 but"),
    ({"zero_optimization": {"stage": 5}}, [], "deepspeed.zero_stage"),
])
def test_conflicts_and_owned_keys_are_one_line_naming_the_key(tmp_path, cfg, overrides, message):
    f = _file(tmp_path, "ds.json", cfg)
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe("tiny", overrides, deepspeed_file=f, world_size=1)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert f in str(e.value)


def test_the_same_value_in_the_file_and_set_is_no_conflict(tmp_path):
    f = _file(tmp_path, "ds.json", {"zero_optimization": {"stage": 3}})
    assert load_recipe("tiny", ["deepspeed.zero_stage=3"], deepspeed_file=f).deepspeed.zero_stage == 3


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), (None, "cannot read it")])
def test_unreadable_files_are_one_line(tmp_path, content, message):
    p = tmp_path / "ds.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny", deepspeed_file=str(p))


@pytest.mark.multirank
def test_each_family_of_keys_reaches_the_engine_on_two_cpu_ranks(tmp_path):
    files = {
        "base": {},
        "zero3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
        "offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
        "bf16": {"bf16": {"enabled": True}},
        "comm": {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123456},
                 "communication_data_type": "fp32"},
        "ckpt": {"activation_checkpointing": {"partition_activations": False}},
    }
    paths = {k: _file(tmp_path, f"{k}.json", v) for k, v in files.items()}
    out = tmp_path / "records.json"
    cmd = deepspeed_cmd([str(out), *paths.values()])
    cmd[cmd.index("turnctl")] = str(REPO / "tests" / "scripts" / "ds_families.py")
    check(run(cmd, timeout=400))
    rec = {k: json.loads(out.read_text())[p] for k, p in paths.items()}
    base = rec["base"]
    assert base["zero_stage"] == 2 and not base["cpu_offload"] and not base["bf16"] and not base["overlap_comm"]
    assert not base["gradient_checkpointing"] and base["optimizer_steps"] == 2
    assert rec["zero3"]["zero_stage"] == 3 and rec["offload"]["cpu_offload"]
    assert rec["bf16"]["bf16"] and not rec["bf16"]["fp16"]
    assert rec["comm"]["overlap_comm"] and rec["comm"]["reduce_bucket_size"] == 123456
    assert rec["comm"]["communication_data_type"] == "torch.float32"
    assert rec["ckpt"]["gradient_checkpointing"]
    for name, r in rec.items():
        assert r["optimizer_steps"] == 2 and all(l == l and l < 10 for l in r["losses"]), (name, r["losses"])
    # The same arithmetic: offload, communication settings and recomputing activations change where
    # things live, not what is computed (bf16 does change it; a ZeRO-3 model is initialised
    # partitioned, so its random start differs).
    for name in ("offload", "comm", "ckpt"):
        assert rec[name]["losses"] == pytest.approx(base["losses"], rel=1e-4, abs=1e-5), name
