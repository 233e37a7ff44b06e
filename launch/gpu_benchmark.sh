#!/usr/bin/env bash
# One command on a GPU machine: install with CUDA, then measure the full-width Taiwan model at
# 448 x 448 (bf16 and float32; train steps, 18-step and 8-step samples, compile, matmul peak),
# the memory/time effect of rematerialisation (and whether XLA:GPU keeps it), and the on-paper
# 1056 x 1792 figures.
#   bash launch/gpu_benchmark.sh [RESULTS_DIR]      (results: RESULTS_DIR/speed_gpu_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip install -q -e ".[cuda12]"
source launch/xla_flags.sh
"$PYTHON" benchmarks/speed.py --grid 448 --dtype bfloat16 --batch 8 --out "$OUT/speed_gpu_448_bf16.json"
"$PYTHON" benchmarks/speed.py --grid 448 --dtype float32 --batch 8 \
    --only matmul_peak,regression_step,diffusion_step,sample_heun18 --out "$OUT/speed_gpu_448_fp32.json"
for remat in dots full; do
  "$PYTHON" benchmarks/speed.py --grid 448 --dtype bfloat16 --batch 8 --remat "$remat" \
      --only diffusion_step --out "$OUT/speed_gpu_448_bf16_remat_$remat.json"
done
"$PYTHON" benchmarks/speed.py --grid 1056x1792 --dtype bfloat16 --only sample_heun18 \
    --out "$OUT/speed_gpu_conus_bf16.json"
"$PYTHON" benchmarks/remat_schedule.py --out "$OUT/remat_schedule_gpu.json"
"$PYTHON" benchmarks/on_paper.py --out "$OUT/on_paper.json"
