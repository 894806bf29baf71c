"""GPU fine-tuning throughput: samples/s, model FLOPs utilisation and peak memory per GPU.

ViT-L/16 and CLIP-ViT-L/14 (random init from their configs: the weights do not change the speed),
ZeRO-2 and ZeRO-3, bf16, through turnctl's own FineTuner (the same engine, optimizer and step as a
real run), on synthetic 224 px batches so that data loading is out of the measurement. One command
on a GPU machine:

    deepspeed --num_gpus 1 benchmarks/bench_gpu_finetune.py        # or --num_gpus 8
    python benchmarks/bench_gpu_finetune.py --smoke                # CPU: tiny configs, checks it runs

MFU = achieved model FLOP/s / peak bf16 FLOP/s of the GPU (dense; --peak-tflops overrides the table).
Model FLOPs per sample for training = 3 x forward, forward = 2 x (matmul parameters) x tokens +
attention (4 x layers x tokens^2 x hidden), the usual accounting (no activation recomputation).
Writes benchmarks/results/gpu_finetune.json (rank 0); medians over --repeats timed windows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

MODELS = {
    # family, config (as the Hugging Face configs of google/vit-large-patch16-224 and the
    # vision tower of openai/clip-vit-large-patch14)
    "vit_l16": ("vit", dict(image_size=224, patch_size=16, hidden_size=1024, num_hidden_layers=24,
                            num_attention_heads=16, intermediate_size=4096)),
    "clip_l14": ("clip", dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                              num_attention_heads=16, intermediate_size=4096)),
}
SMOKE = {
    "vit_l16": ("vit", dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64)),
    "clip_l14": ("clip", dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64)),
}


def model_flops_per_sample(cfg: dict, num_classes: int) -> float:
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    d, layers, ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    matmul_params = layers * (4 * d * d + 2 * d * ff) + 3 * cfg["patch_size"] ** 2 * d + d * num_classes
    forward = 2 * matmul_params * tokens + 4 * layers * tokens * tokens * d
    return 3.0 * forward


def peak_tflops(name: str, override):
    if override:
        return override
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in name:
            return val
    return None


def run_one(name: str, family: str, cfg: dict, *, stage: int, micro: int, steps: int, warmup: int,
            repeats: int, num_classes: int, smoke: bool) -> dict:
    import torch

    from turnctl import distributed as dist
    from turnctl.models import load_backbone
    from turnctl.finetune import FineTuner
    from turnctl.recipe import validate_recipe

    world = dist.world_size()
    recipe = validate_recipe({
        "name": f"bench-{name}", "model": {"family": family, "config": cfg},
        "finetune": {"optimizer": "adamw", "lr": 1e-5, "batch_size": micro * world, "micro_batch_size": micro},
        "deepspeed": {"zero_stage": stage, "precision": "fp32" if smoke else "bf16",
                      "stage3_param_persistence_threshold": 0 if smoke else None},
    })
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds_cfg = recipe.deepspeed_config(world, device)
    dist.set_seed(0, per_rank=False)
    backbone = load_backbone(recipe.model, num_classes=num_classes, ds_config=ds_cfg if stage == 3 else None)
    tuner = FineTuner(backbone, recipe)
    eng = tuner.engine
    x = torch.randn(micro, 3, cfg["image_size"], cfg["image_size"], device=tuner.device, dtype=tuner.input_dtype)
    y = torch.randint(0, num_classes, (micro,), device=tuner.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = torch.nn.functional.cross_entropy(eng(x).float(), y)
        eng.backward(loss)
        eng.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_gpu = micro * steps / statistics.median(times)
    flops = model_flops_per_sample(cfg, num_classes)
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_tflops(gpu_name, ARGS.peak_tflops) if device == "cuda" else None
    out = {"model": name, "zero_stage": stage, "precision": tuner.precision, "world_size": world,
           "micro_batch_per_gpu": micro, "samples_per_s_per_gpu": per_gpu, "samples_per_s_total": per_gpu * world,
           "model_tflops_per_gpu": per_gpu * flops / 1e12, "mfu": (per_gpu * flops / 1e12 / peak) if peak else None,
           "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else None,
           "params_m": sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters()) / 1e6,
           "device": gpu_name, "timed_windows_s": times}
    del tuner, backbone  # the step closure holds the engine until this function returns
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_l16,clip_l14")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--micro", type=int, default=64, help="micro-batch per GPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU: checks the script, measures nothing")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_finetune.json"))
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ARGS = ap.parse_args(argv)

    import torch

    from turnctl import distributed as dist

    if not ARGS.smoke and not torch.cuda.is_available():
        print("bench_gpu_finetune: no CUDA device; use --smoke to check the script on CPU", file=sys.stderr)
        return 2
    if ARGS.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ARGS.micro, ARGS.steps, ARGS.warmup, ARGS.repeats = 2, 1, 1, 1
    dist.init_distributed(30)
    table = SMOKE if ARGS.smoke else MODELS
    results = []
    for name in ARGS.models.split(","):
        family, cfg = table[name]
        for stage in (int(s) for s in ARGS.stages.split(",")):
            res = run_one(name, family, cfg, stage=stage, micro=ARGS.micro, steps=ARGS.steps, warmup=ARGS.warmup,
                          repeats=ARGS.repeats, num_classes=1000, smoke=ARGS.smoke)
            results.append(res)
            if dist.rank() == 0:
                print(json.dumps(res), flush=True)
    if dist.rank() == 0:
        payload = {"benchmark": "gpu_finetune", "smoke": ARGS.smoke, "results": results,
                   "flops_accounting": "3 x (2 x matmul params x tokens + 4 x layers x tokens^2 x hidden)"}
        out = Path(ARGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, out)
    dist.destroy()
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
