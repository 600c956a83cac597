#!/bin/bash
# One measurement run on a GPU machine (the H100 of issue 5): the kernels against their torch
# references, then `vlmserve bench latency` and `vlmserve bench throughput` on LLaVA-1.5-7B-shaped
# random weights made on the GPU, each beside HF generate. Results and logs go to $OUT.
#   OUT=/tmp/out bash scripts/gpu_bench.sh [num_prompts] [hf_batch_sizes] [max_num_seqs]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
N=${1:-500}; HFB=${2:-64}; SEQS=${3:-128}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
[ -n "$SKIP_CHECK" ] || python scripts/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log"
M="--random-model --model-shape llava-1.5-7b --input-len 32 --output-len 128 --source-image-size 336x336"
python -m vlmserve.entrypoints.cli bench latency $M --backends vlmserve,hf --num-iters 3 --num-iters-warmup 1 \
    --output-json "$OUT/latency.json" 2>&1 | grep -v "Warning\|Loading weights" | tee "$OUT/latency.log"
python -m vlmserve.entrypoints.cli bench throughput $M --num-prompts "$N" --backends vlmserve,hf \
    --hf-batch-size "$HFB" --max-num-seqs "$SEQS" --output-json "$OUT/throughput.json" 2>&1 \
    | grep -v "Warning\|Loading weights" | tee "$OUT/throughput.log"
