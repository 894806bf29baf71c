#!/usr/bin/env bash
# The embedded default, end to end: scikit-learn's digits with 60% symmetric label noise, a real
# ImageNet-pretrained EfficientNet-Lite0, TURN vs LP-CE vs FFT-CE on two ranks through the DeepSpeed
# launcher (CPU ranks when there is no GPU), then eval and the label-issue page. Writes
# runs/demo/summary.json and runs/demo/turn-seed0/report/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
  [ "$NPROC" -le "$gpus" ] || NPROC=$gpus   # one rank per GPU
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export HF_HUB_OFFLINE=1

shards=shards/digits-symmetric-0.6
if [ ! -f "$shards/manifest.json" ]; then
  # Several shards per split, so that every rank (and worker) reads shards of its own.
  turnctl prepare digits --noise symmetric:0.6 --noise-seed 0 --shard-size 256
fi
rm -rf runs/demo
deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29517}" --module turnctl \
  compare --recipe demo --shards "$shards" --methods turn,lp-ce,fft-ce --out runs/demo
turnctl eval --checkpoint runs/demo/turn-seed0
# The label issues TURN found, as a page to open offline: the 100 top suspects with their images.
turnctl report runs/demo/turn-seed0 --html
echo "label issues: runs/demo/turn-seed0/report/index.html"
echo "summary: runs/demo/summary.json"
cat runs/demo/summary.json
