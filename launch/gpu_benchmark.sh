#!/usr/bin/env bash
# One command on a GPU machine: the full-width Taiwan model at 448 x 448 in bf16 against
# PhysicsNeMo, most important first. Each results file is written when its command ends (and
# each finished row is printed), so a run cut short keeps what it finished.
#   bash launch/gpu_benchmark.sh [RESULTS_DIR [PART ...]]     (results: RESULTS_DIR/*_gpu_*.json)
# Parts, in this order unless named (several device calls can each run some):
#   autotune  compile of the bf16 diffusion training step with and without XLA:GPU's autotuner,
#             each capped at AUTOTUNE_TIMEOUT s (default 150): with XLA's Triton matmuls it did not
#             finish in 250-330 s on an H200, its autotuner logging "Delay kernel timed out"; the
#             steps now take cuBLAS's (compiler_options.training_step_options)
#   train     both training steps side by side with PhysicsNeMo
#   sample    18-step and 8-step samples side by side
#   launches  the 18-step sample with XLA:GPU's command buffers (CUDA graphs) off, as XLA sets
#             them, and extended to the sampling loop (+WHILE): whether its 2,131 kernels a loop
#             step are bound by their launches (benchmarks/README.md, seventeenth sitting)
#   profile   where the 18-step sample's and the training steps' kernel time goes (kernel_profile.py)
#   compile   matmul peak; the diffusion step compiled cold, then loaded warm from the executable
#             cache without tracing (the warm start target: <= 5 s)
#   remat     rematerialisation's memory/time effect, and whether XLA:GPU keeps it
#   conus     a 1056 x 1792 CONUS sample
#   fp32      float32 side by side
# Every part that compiles a training step (train, compile, remat, fp32) runs under the autotuning
# setting whose cold compile finished first in `autotune` (TRAIN_XLA_FLAGS, if set, instead).
# PYTHON names the interpreter (installs jax_corrdiff with CUDA unless its dependencies import: from
# the wheels of launch/device_wheels.sh where .whl/ exists, as on the lent GPU machine, which
# reaches no package registry); PHYSICSNEMO_PYTHON the one with PhysicsNeMo 2.2.2 (default: the same).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
shift || true
PARTS=("$@")
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(autotune train sample launches profile compile remat conus fp32)
PYTHON=${PYTHON:-python3}
export PHYSICSNEMO_PYTHON=${PHYSICSNEMO_PYTHON:-$PYTHON}
# From the repository root jax_corrdiff itself always imports: ask for its dependencies.
if ! "$PYTHON" -c "import jax_corrdiff.training.loop, jax_corrdiff.inference.generate" 2>/dev/null; then
  if [[ -d .whl ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install -q -e ".[cuda12]"
  fi
fi
source launch/xla_flags.sh
BASE_XLA_FLAGS=$XLA_FLAGS
TAIWAN_448=(--grid 448 --width full --batch 8)
AUTOTUNE_SETTINGS=(level0 default)
declare -A AUTOTUNE_FLAGS=(
  [level0]="--xla_gpu_autotune_level=0"
  [default]=""
)
COMMAND_BUFFER_SETTINGS=(off default while)
declare -A COMMAND_BUFFER_FLAGS=(
  [off]="--xla_gpu_enable_command_buffer="
  [default]=""
  [while]="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
)

# XLA_FLAGS for programs with a training step: TRAIN_XLA_FLAGS, else those of the autotuning
# setting whose cold compile finished first, else the defaults.
train_xla_flags() {
  if [[ -n ${TRAIN_XLA_FLAGS:-} ]]; then
    echo "$TRAIN_XLA_FLAGS"
    return
  fi
  "$PYTHON" - "$OUT" "$BASE_XLA_FLAGS" <<'PY'
import glob, json, sys
finished = []
for path in glob.glob(f"{sys.argv[1]}/compile_gpu_448_bf16_autotune_*.json"):
    results = json.load(open(path))
    cold = results["rows"]["compile"]["cold"]
    if "compile_s" in cold:
        finished.append((cold["compile_s"], results["machine"]["xla_flags"]))
print(min(finished)[1] if finished else sys.argv[2])
PY
}

for part in "${PARTS[@]}"; do
  case $part in
    autotune)
      for name in "${AUTOTUNE_SETTINGS[@]}"; do
        XLA_FLAGS="$BASE_XLA_FLAGS ${AUTOTUNE_FLAGS[$name]}" "$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" \
            --dtype bfloat16 --only compile --timeout "${AUTOTUNE_TIMEOUT:-150}" \
            --out "$OUT/compile_gpu_448_bf16_autotune_$name.json"
      done ;;
    train)
      XLA_FLAGS=$(train_xla_flags) "$PYTHON" benchmarks/speed_physicsnemo.py "${TAIWAN_448[@]}" \
          --dtype bfloat16 --only diffusion_step,regression_step --out "$OUT/vs_physicsnemo_gpu_448_bf16_train.json" ;;
    sample)
      "$PYTHON" benchmarks/speed_physicsnemo.py "${TAIWAN_448[@]}" --dtype bfloat16 \
          --only sample_heun18,sample_euler8 --out "$OUT/vs_physicsnemo_gpu_448_bf16.json" ;;
    launches)
      for name in "${COMMAND_BUFFER_SETTINGS[@]}"; do  # a flag this XLA rejects fails its row only
        XLA_FLAGS="$BASE_XLA_FLAGS ${COMMAND_BUFFER_FLAGS[$name]}" "$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" \
            --dtype bfloat16 --only sample_heun18 --out "$OUT/speed_gpu_448_bf16_command_buffers_$name.json" ||
          echo "gpu_benchmark.sh: the sample with command buffers '$name' failed" >&2
      done ;;
    profile)
      "$PYTHON" benchmarks/kernel_profile.py "${TAIWAN_448[@]}" --dtype bfloat16 --programs sample_heun18 \
          --out "$OUT/kernel_profile_gpu_448_bf16_sample.json"
      XLA_FLAGS=$(train_xla_flags) "$PYTHON" benchmarks/kernel_profile.py "${TAIWAN_448[@]}" --dtype bfloat16 \
          --programs regression_step,diffusion_step --out "$OUT/kernel_profile_gpu_448_bf16_train.json" ;;
    compile)
      XLA_FLAGS=$(train_xla_flags) "$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" --dtype bfloat16 \
          --only matmul_peak,compile --out "$OUT/speed_gpu_448_bf16.json" ;;
    remat)
      for remat in dots full; do
        XLA_FLAGS=$(train_xla_flags) "$PYTHON" benchmarks/speed.py "${TAIWAN_448[@]}" --dtype bfloat16 \
            --remat "$remat" --only diffusion_step --out "$OUT/speed_gpu_448_bf16_remat_$remat.json"
      done
      "$PYTHON" benchmarks/remat_schedule.py --out "$OUT/remat_schedule_gpu.json" ;;
    conus)
      "$PYTHON" benchmarks/speed.py --grid 1056x1792 --dtype bfloat16 --only sample_heun18 \
          --out "$OUT/speed_gpu_conus_bf16.json" ;;
    fp32)
      XLA_FLAGS=$(train_xla_flags) "$PYTHON" benchmarks/speed_physicsnemo.py "${TAIWAN_448[@]}" \
          --dtype float32 --only sample_heun18,diffusion_step --out "$OUT/vs_physicsnemo_gpu_448_fp32.json" ;;
    *)
      echo "gpu_benchmark.sh: unknown part '$part'" >&2
      exit 2 ;;
  esac
done
