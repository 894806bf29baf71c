"""One rank of tests/test_ds_config.py: for each ``--deepspeed`` file given, resolve the tiny recipe
with it exactly as ``turnctl train --deepspeed FILE`` does, build the backbone and turnctl's
FineTuner (the real DeepSpeed engine), take two optimizer steps on a fixed batch, and record what
the engine says it runs with. Rank 0 writes one JSON object {file: record} to OUT.

    deepspeed --num_gpus 2 ds_families.py OUT.json A.json B.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from turnctl import distributed as dist  # noqa: E402
from turnctl.commands.train import resolve  # noqa: E402
from turnctl.finetune import FineTuner  # noqa: E402
from turnctl.models import load_backbone  # noqa: E402


def one(path: str) -> dict:
    r = resolve("tiny", None, None, "fft-ce", ("finetune.batch_size=8", "finetune.micro_batch_size=2"), path)
    ds_config = r.deepspeed_config(dist.world_size())
    dist.set_seed(0, per_rank=False)
    bb = load_backbone(r.model, num_classes=3, ds_config=ds_config if r.deepspeed.zero_stage == 3 else None)
    if r.model.gradient_checkpointing:
        bb.enable_gradient_checkpointing()
    tuner = FineTuner(bb, r)
    eng = tuner.engine
    g = torch.Generator().manual_seed(10 + dist.rank())
    x = torch.randn(2, 3, 32, 32, generator=g).to(tuner.input_dtype)
    y = torch.randint(0, 3, (2,), generator=g)
    losses = []
    eng.train()
    for _ in range(2 * tuner.accum):
        loss = torch.nn.functional.cross_entropy(eng(x).float(), y)
        eng.backward(loss)
        eng.step()
        losses.append(float(loss))
    return {
        "recipe": r.model_dump(mode="json"),
        "zero_stage": eng.zero_optimization_stage(),
        "cpu_offload": bool(eng.zero_cpu_offload()),
        "bf16": bool(eng.bfloat16_enabled()),
        "fp16": bool(eng.fp16_enabled()),
        "overlap_comm": bool(eng.zero_overlap_comm()),
        "reduce_bucket_size": int(eng.zero_reduce_bucket_size()),
        "communication_data_type": str(eng.communication_data_type),
        "gradient_checkpointing": bool(getattr(bb.model, "is_gradient_checkpointing", False)),
        "optimizer_steps": int(eng.global_steps),
        "losses": losses,
    }


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    out, files = args[0], args[1:]
    dist.init_distributed(5)
    records = {}
    for f in files:
        records[f] = one(f)
        dist.barrier()
    if dist.rank() == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy()


if __name__ == "__main__":
    main()
