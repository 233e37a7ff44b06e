#!/usr/bin/env bash
# Run NPROC copies of COMMAND on this machine as one multi-process JAX job (CPU collectives:
# Gloo over localhost). Every copy gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, which jax_corrdiff.distributed.initialize() reads.
#
#   bash launch/local.sh NPROC COMMAND...
#   JAX_NUM_CPU_DEVICES=2 bash launch/local.sh 2 python -m jax_corrdiff.train \
#       --config=configs/demo.py:smoke --workdir=/tmp/smoke2x2
#
# Environment: JAX_NUM_CPU_DEVICES (CPU devices per process; default 1), JAX_PLATFORMS (default
# cpu), JAX_COORDINATOR_ADDRESS (default 127.0.0.1:<a free port>), PYTHON (used to find a port).
# Output lines are prefixed with [process id]. If one copy fails the others are stopped; the exit
# status is the first non-zero one (0 when all succeed).
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NPROC COMMAND..." >&2
    exit 2
fi
NPROC=$1
shift
# TCMalloc (or huge pages) for XLA:CPU's per-step temporaries: launch/cpu_env.sh says why.
source "$(dirname "$0")/cpu_env.sh"
PYTHON=${PYTHON:-python3}
if [[ -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
fi
export JAX_NUM_PROCESSES=$NPROC
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-1}
echo "local.sh: $NPROC processes x $JAX_NUM_CPU_DEVICES $JAX_PLATFORMS devices, coordinator $JAX_COORDINATOR_ADDRESS" >&2

set -m  # each copy in its own process group, so stopping it stops the whole pipeline
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < NPROC; i++)); do
    (
        set -o pipefail
        JAX_PROCESS_ID=$i "$@" 2>&1 | sed -u "s/^/[$i] /"
    ) &
    PIDS+=($!)
done

STATUS=0
REMAINING=$NPROC
while ((REMAINING > 0)); do
    set +e
    wait -n
    RC=$?
    set -e
    REMAINING=$((REMAINING - 1))
    if ((RC != 0 && STATUS == 0)); then
        STATUS=$RC
        echo "local.sh: a process exited with status $RC; stopping the others" >&2
        cleanup
    fi
done
exit $STATUS
