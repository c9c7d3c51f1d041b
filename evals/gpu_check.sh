#!/usr/bin/env bash
# The full-depth bench on one GPU, in one call (issue 18): a Llama-2-7B-shaped base
# (32 layers, bf16), 16 community-shaped adapters, both commands on CUDA, seconds per
# stage and torch.cuda.max_memory_allocated per command, under one output folder.
#
#   bash evals/gpu_check.sh [OUT]      (OUT defaults to $OUT, else evals/results/gpu)
#
# Budget: at most 8 minutes on the device; the build (about 13.5 GB of random
# weights) is the slowest part on a fresh machine. mergekit's task_arithmetic over
# the same references is skipped here (--mergekit-adapters 0): it needs a full copy
# per adapter on disk, which the CPU bench measures.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-evals/results/gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 470 python -m evals.bench_7b --layers 32 --adapters 16 --device cuda --mergekit-adapters 0 \
  --root "${TMPDIR:-/tmp}/mergekit_fw_7b" --out "$out" 2>&1 | tee "$out/gpu_check.log"
