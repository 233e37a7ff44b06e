#!/usr/bin/env bash
# One command on a GPU machine: the full-width Taiwan model at 448 x 448 in bf16 side by side
# with PhysicsNeMo (18-step and 8-step samples, then the training steps, whose XLA:GPU compile
# took over 5 minutes on an H200), then ours alone (matmul peak, compile cold and warm),
# rematerialisation's memory/time effect, a 1056 x 1792 CONUS sample, whether XLA:GPU keeps
# remat, and float32 side by side. Most important first: each results file is written when its
# command ends (and each finished row is printed), so a run cut short keeps what it finished.
#   bash launch/gpu_benchmark.sh [RESULTS_DIR]      (results: RESULTS_DIR/*_gpu_*.json)
# PYTHON names the interpreter (installs jax_corrdiff with CUDA unless it already imports);
# PHYSICSNEMO_PYTHON the one with PhysicsNeMo 2.2.2 (default: the same).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PYTHON=${PYTHON:-python}
export PHYSICSNEMO_PYTHON=${PHYSICSNEMO_PYTHON:-$PYTHON}
"$PYTHON" -c "import jax_corrdiff" 2>/dev/null || "$PYTHON" -m pip install -q -e ".[cuda12]"
source launch/xla_flags.sh
TAIWAN_448=(--grid 448 --width full --batch 8)
"$PYTHON" benchmarks/speed_physicsnemo.py "${TAIWAN_448[@]}" --dtype bfloat16 \
    --only sample_heun18,sample_euler8,diffusion_step,regression_step --out "$OUT/vs_physicsnemo_gpu_448_bf16.json"
"$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" --dtype bfloat16 --only matmul_peak,compile \
    --out "$OUT/speed_gpu_448_bf16.json"
for remat in dots full; do
  "$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" --dtype bfloat16 --remat "$remat" \
      --only diffusion_step --out "$OUT/speed_gpu_448_bf16_remat_$remat.json"
done
"$PYTHON" benchmarks/speed.py --grid 1056x1792 --dtype bfloat16 --only sample_heun18 \
    --out "$OUT/speed_gpu_conus_bf16.json"
"$PYTHON" benchmarks/remat_schedule.py --out "$OUT/remat_schedule_gpu.json"
"$PYTHON" benchmarks/speed_physicsnemo.py "${TAIWAN_448[@]}" --dtype float32 \
    --only sample_heun18,diffusion_step --out "$OUT/vs_physicsnemo_gpu_448_fp32.json"
