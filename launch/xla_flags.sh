#!/usr/bin/env bash
# XLA/JAX settings for multi-process GPU training, sourced by launch/slurm.sbatch before Python
# starts (so they are fixed for the whole run and visible in the job log). Override any of them
# in the environment before sourcing; XLA_FLAGS_EXTRA is appended to XLA_FLAGS.
#   source launch/xla_flags.sh
# Latency-hiding scheduler: overlap the gradient all-reduce with the backward pass.
: "${XLA_FLAGS:=--xla_gpu_enable_latency_hiding_scheduler=true}"
export XLA_FLAGS="${XLA_FLAGS}${XLA_FLAGS_EXTRA:+ $XLA_FLAGS_EXTRA}"
# Let JAX take most of each GPU up front (one process per GPU, nothing else on it).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
# NCCL: keep the defaults; uncomment to debug topology or hangs.
# export NCCL_DEBUG=INFO
echo "xla_flags.sh: XLA_FLAGS='$XLA_FLAGS' XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" >&2
