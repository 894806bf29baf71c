#!/usr/bin/env bash
# Run every benchmark; each writes benchmarks/results/<name>.json (see benchmarks/RESULTS.md).
# CPU machines run the CPU suite; with a GPU the GPU fine-tuning suite runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
export TURNCTL_NO_PROGRESS=1
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else export DS_ACCELERATOR=cpu; fi
"$PY" benchmarks/bench_prepare.py
"$PY" benchmarks/bench_reader.py
"$PY" benchmarks/bench_select.py
"$PY" benchmarks/bench_probe.py
"$PY" benchmarks/bench_extract.py
"$PY" benchmarks/bench_overhead.py --repeats 5  # turnctl vs plain PyTorch per CPU-second, 1 and 2 ranks: ~5 min
"$PY" benchmarks/bench_overhead.py --repeats 5 --workers 1 --out benchmarks/results/overhead_workers1.json
"$PY" benchmarks/bench_overhead.py --repeats 5 --set 'deepspeed.extra={"zero_optimization": {"contiguous_gradients": true}}' \
  --out benchmarks/results/overhead_contiguous_gradients.json
"$PY" benchmarks/bench_overhead.py --repeats 3 --ranks 0 --out benchmarks/results/overhead_alloc_tuned.json
"$PY" benchmarks/bench_overhead.py --repeats 3 --ranks 0 --set deepspeed.zero_stage=0 \
  --out benchmarks/results/overhead_zero0.json
"$PY" benchmarks/bench_overhead.py --repeats 3 --ranks 0 --allocator glibc-default \
  --out benchmarks/results/overhead_alloc_glibc_default.json
"$PY" benchmarks/bench_overhead.py --repeats 3 --ranks 0 --allocator glibc-default --set finetune.eval_batch_size=256 \
  --out benchmarks/results/overhead_eval256_glibc_default.json
"$PY" benchmarks/bench_turn_vs_fft.py --cached --repeats "${REPEATS:-2}"
if [ -f ../shared/data/cifar10-jpg.tar.gz ]; then  # ~20 min on 2 cores
  "$PY" benchmarks/bench_turn_vs_fft.py --cifar-train 20000 --cached --out benchmarks/results/turn_vs_fft_cifar20k.json
fi
"$PY" benchmarks/bench_scale.py --sizes 240000,720000,1200000,2400000  # one TURN epoch at WebVision scale: ~35 min, 10 GB under data/scale (removed)
"$PY" benchmarks/bench_reproducible.py   # the demo twice, ~6 min
"$PY" benchmarks/bench_protocol.py       # every method, 2 noise levels, 3 seeds: ~1 h on 2 cores
if [ "$gpu" = 1 ]; then
  deepspeed --num_gpus 1 benchmarks/bench_gpu_finetune.py
else
  echo "no GPU: skipping benchmarks/bench_gpu_finetune.py (run it on a GPU machine)"
fi
