#!/usr/bin/env bash
# The GPU checks, in one run: the Triton BRA kernel tests on CUDA, the Triton-vs-SDPA
# benchmark (docs/BENCHMARKS.md), then the vidsieve-tiny recipe on the GPU (the same seeded
# steps as the CPU run, so its test accuracy shows how reproducible the recipe is).
#   bash eval/cuda_checks.sh OUT_DIR [TRAIN_SECONDS]     (TRAIN_SECONDS 0: the kernel checks only)
set -u -o pipefail
out=${1:?usage: cuda_checks.sh OUT_DIR [TRAIN_SECONDS]}
train_s=${2:-420}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_bra_triton.py tests/test_bra.py tests/test_attention_dispatch.py
  timeout 180 python3 -m eval.bench_attention --cuda  # autotunes the kernel at each length first
} 2>&1 | tee "$out/kernels.log"
if [ "$train_s" -gt 0 ]; then
  timeout "$train_s" python3 -m server.cli train tiny --out "$out/tiny" --device cuda --workers 12 2>&1 | tee "$out/train.log"
fi
