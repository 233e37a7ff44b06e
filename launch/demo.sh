#!/usr/bin/env bash
# The embedded demo end to end: train both CorrDiff stages on the shipped ERA5 UK 2 m
# temperature (8x area-averaged input), generate an ensemble over the validation period
# (coarsened truth, so it can be scored), and print CorrDiff vs regression vs bilinear.
# Sampler: 18-step Heun from sigma 800 with churn 40, calibrated for the cross-fitted demo model by
# benchmarks/calibration.py (README, "Ensemble calibration").
#   bash launch/demo.sh [WORKDIR] [extra train flags...]
set -euo pipefail
WORKDIR=${1:-/tmp/jax_corrdiff_demo}
shift || true
PYTHON=${PYTHON:-python}
# TCMalloc (or huge pages) for XLA:CPU's per-step temporaries: launch/cpu_env.sh says why.
source "$(dirname "$0")/cpu_env.sh"
DATA=$("$PYTHON" -c 'from jax_corrdiff.data import demo_data_path; print(demo_data_path("era5_t2m_uk_0p25deg.nc"))')
"$PYTHON" -m jax_corrdiff.train --config="$(dirname "$0")/../configs/demo.py" --workdir="$WORKDIR" "$@"
"$PYTHON" -m jax_corrdiff.generate --workdir="$WORKDIR" --input="$DATA" --coarsen \
    --times=2019-03-19T00,2019-03-24T05 --members=8 --sampler=stochastic --churn=40 --batch_size=6 \
    --output="$WORKDIR/validation.nc"
"$PYTHON" -m jax_corrdiff.score --prediction="$WORKDIR/validation.nc" --output="$WORKDIR/scores"
