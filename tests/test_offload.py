"""DeepSpeed settings are honoured or refused, never silently dropped.

* deepspeed.extra may not set what turnctl derives from the recipe or does itself (the optimizer,
  the LR schedule, the batch triad, clipping, ZeRO stage, offload, precision): one line names the
  key and the recipe key to set instead.
* ZeRO-Offload of the optimizer (deepspeed.offload_optimizer) on two CPU ranks: train, checkpoint,
  --stop-after, --resume and eval work, and the run equals the uninterrupted one without offload.
  DeepSpeed refuses a client optimizer under ZeRO-Offload unless zero_force_ds_cpu_optimizer is
  false (turnctl/recipe/__init__.py sets it); turnctl's own SGD/AdamW then steps the CPU partitions. On CPU
  ranks the arithmetic is the same as without offload, so conftest's reference run (ZeRO-2, no
  offload, same recipe) is what the offloaded, interrupted and resumed run must reproduce.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from launch import RUN_ARGS, check, deepspeed_cmd, last_json, run, turnctl_cmd
from turnctl.errors import RecipeError
from turnctl.recipe import load_recipe


@pytest.mark.parametrize("extra,key,instead", [
    ("{optimizer: {type: Adam, params: {lr: 0.1}}}", "optimizer", "finetune.optimizer"),
    ("{scheduler: {type: WarmupLR}}", "scheduler", "finetune.lr/schedule/warmup_ratio"),
    ("{train_micro_batch_size_per_gpu: 2, gradient_accumulation_steps: 4}", "train_micro_batch_size_per_gpu",
     "batch triad"),
    ("{gradient_clipping: 0.5}", "gradient_clipping", "finetune.gradient_clipping"),
    ("{zero_optimization: {stage: 3}}", "zero_optimization.stage", "deepspeed.zero_stage"),
    ("{zero_optimization: true}", "zero_optimization", "deepspeed.zero_stage"),  # replaces the section
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}", "zero_optimization.offload_optimizer",
     "deepspeed.offload_optimizer"),
    ("{zero_force_ds_cpu_optimizer: true}", "zero_force_ds_cpu_optimizer", "deepspeed.offload_optimizer"),
    ("{bf16: {enabled: true}}", "bf16.enabled", "deepspeed.precision"),
])
def test_extra_may_not_set_what_turnctl_owns(extra, key, instead):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny", [f"deepspeed.extra={extra}"])
    msg = str(err.value)
    assert f"deepspeed.extra: key '{key}' is not supported: " in msg and instead in msg and "\n" not in msg


def test_other_extra_keys_are_merged():
    extra = "{zero_optimization: {reduce_bucket_size: 1000}, steps_per_print: 5, fp16: {initial_scale_power: 8}}"
    cfg = load_recipe("tiny", [f"deepspeed.extra={extra}"]).deepspeed_config(2, "cuda")
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert cfg["steps_per_print"] == 5 and cfg["fp16"] == {"initial_scale_power": 8}


def test_offload_config_lets_deepspeed_step_turnctls_optimizer():
    cfg = load_recipe("tiny", ["deepspeed.offload_optimizer=true"]).deepspeed_config(2, "cuda")
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in load_recipe("tiny").deepspeed_config(2)
    # Stage 0 has no optimizer partitions to offload: said, not ignored.
    with pytest.raises(RecipeError, match=r"deepspeed: offload_optimizer needs ZeRO .*deepspeed.zero_stage"):
        load_recipe("tiny", ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])


def _fft_lines(run_dir):
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if l["phase"] == "fft"]


def _eval(checkpoint):
    """``turnctl eval`` on the noisy train split: the toy test split is classified perfectly by any
    decent model, the noisy labels are not, so equal figures there mean equal predictions."""
    res = check(run(turnctl_cmd(["eval", "--checkpoint", str(checkpoint), "--split", "train", "--json"]),
                    timeout=180))
    return last_json(res.stdout)["results"]


@pytest.mark.multirank
@pytest.mark.slow
def test_offload_trains_stops_resumes_and_evaluates_like_no_offload(run_shards, tiny_reference_run, tmp_path):
    from safetensors.numpy import load_file

    ref, _ = tiny_reference_run
    out = tmp_path / "offload"
    args = ["train", *RUN_ARGS, "--shards", str(run_shards), "--out", str(out), "--json",
            "--set", "deepspeed.offload_optimizer=true"]
    first = check(run(deepspeed_cmd(args + ["--stop-after", "0"]), timeout=300))
    assert last_json(first.stdout)["stopped_after_epoch"] == 0
    # Logged from the engine (not the recipe): DeepSpeed did set up the CPU optimizer partitions.
    assert "ZeRO-Offload: optimizer state and fp32 master weights on the CPU, stepped by AdamW" in first.stderr
    assert (out / "checkpoints" / "latest").read_text() == "epoch_0000"
    check(run(deepspeed_cmd(args + ["--resume"]), timeout=300))

    fa, fb = _fft_lines(ref), _fft_lines(out)
    assert [l["epoch"] for l in fb] == [0, 1]
    for la, lb in zip(fa, fb):
        for key in ("train_loss", "samples", "steps", "selected", "test_accuracy", "val_accuracy"):
            assert la[key] == pytest.approx(lb[key], rel=1e-6), key
        assert lb["lr_per_step"] == la["lr_per_step"] and len(lb["lr_per_step"]) == lb["optimizer_steps"]
    for e in (0, 1):
        a, b = np.load(ref / "selection" / f"epoch_{e}.npz"), np.load(out / "selection" / f"epoch_{e}.npz")
        assert np.array_equal(a["selected"], b["selected"]), f"epoch {e}: a different clean subset"
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # The DeepSpeed checkpoint (offloaded optimizer partitions, consolidated by zero_to_fp32) and the
    # exported final model predict the same. Two single-process evals: side by side.
    with ThreadPoolExecutor(2) as pool:
        by_run, by_checkpoint = pool.map(_eval, [out, out / "checkpoints"])
    exported, consolidated = by_run["last"], by_checkpoint["checkpoints"]
    assert 0.0 < exported["accuracy"] < 1.0  # noisy labels: not a saturated figure
    assert consolidated["num_samples"] == exported["num_samples"]
    assert consolidated["accuracy"] == pytest.approx(exported["accuracy"], abs=1e-9)
    assert consolidated["per_class_accuracy"] == pytest.approx(exported["per_class_accuracy"], abs=1e-9)
    assert consolidated["most_confused"] == exported["most_confused"]


def test_cpu_ranks_skip_the_contiguous_gradient_copy_unless_extra_says():
    # On CPU it only costs time (benchmarks/RESULTS.md); on GPUs DeepSpeed's default stays.
    assert load_recipe("tiny").deepspeed_config(2, "cpu")["zero_optimization"]["contiguous_gradients"] is False
    assert "contiguous_gradients" not in load_recipe("tiny").deepspeed_config(2, "cuda")["zero_optimization"]
    assert "contiguous_gradients" not in load_recipe("tiny", ["deepspeed.zero_stage=3"]).deepspeed_config(2, "cpu")[
        "zero_optimization"]
    extra = "deepspeed.extra={zero_optimization: {contiguous_gradients: true}}"
    assert load_recipe("tiny", [extra]).deepspeed_config(2, "cpu")["zero_optimization"]["contiguous_gradients"] is True
