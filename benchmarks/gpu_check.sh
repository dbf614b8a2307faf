#!/usr/bin/env bash
# The GPU checks, in one run of under 8 minutes on one H100/H200-class GPU (see docs/gpu.md for the last results):
#   1. exactness on CUDA kernels: the engine against a per-example fp32 oracle for several families, fp32 and bf16
#      autocast (benchmarks/gpu_exactness.py, ~1 minute);
#   2. cost and memory on a ~0.5B-parameter model, LoRA and full fine-tuning, bf16 autocast with precision="fp32"
#      (benchmarks/bench_gpu.py, ~3-5 minutes).
# Usage: bash benchmarks/gpu_check.sh [results folder, default $OUT or ./gpu-results]
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
status=0
timeout 150 python "$here/gpu_exactness.py" --out "$out/exactness.md" 2>&1 | tee "$out/exactness.log" || status=1
timeout 330 python "$here/bench_gpu.py" --out "$out/cost.md" 2>&1 | tee "$out/cost.log" || status=1
echo "gpu_check: exit $status; results in $out"
exit $status
