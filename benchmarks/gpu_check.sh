#!/usr/bin/env bash
# The CUDA paths in one run of at most 10 minutes on one CUDA GPU, nothing downloaded (benchmarks/gpu_check.py):
# LoRA in bf16 through TRL, QLoRA when bitsandbytes is importable, the adapter saved and loaded back, K answers
# with transformers and with vLLM when it is importable; tokens/s and peak GPU memory per step.
# Without a CUDA GPU the CUDA steps are skipped with a line saying so and the rest runs small on the CPU.
#   benchmarks/gpu_check.sh [results.json]      (default: gpu_check.json here, or in $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
out="${1:-${OUT:-.}/gpu_check.json}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "nvidia-smi: not found (no CUDA GPU visible to this machine)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0  # nothing is downloaded
timeout 600 "$PY" benchmarks/gpu_check.py --out "$out"
