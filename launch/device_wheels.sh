#!/usr/bin/env bash
# Wheels for the lent GPU machine, which reaches no package registry. Its image (Python 3.12)
# holds jax 0.11.2 with CUDA 13, flax, optax, orbax-checkpoint, xarray, torch and most of what
# launch/gpu_benchmark.sh imports; this downloads the rest, here, into .whl/ (git-ignored):
# jax_corrdiff's own dependencies the image lacks, and PhysicsNeMo 2.2.2 with those of its
# imports that the side-by-side benchmarks reach (warp-lang, 149 MB, is served by mocks there:
# tests/fixtures/README.md). Versions are those the CPU environments test with (numcodecs: the
# release pip takes for Python 3.12, whose wheel is 1.4 MB where 0.16.6's is 9.3 MB). About
# 41 MB: with the repository's 14 MB, inside the device tool's 64 MiB. Then a device call with
# carry [".whl"] runs `bash launch/gpu_benchmark.sh $OUT PART ...`, which installs them into
# /tmp/site. Checked in a Python 3.12 environment holding the image's packages (jax 0.10.2 and
# torch 2.13 on a CPU): the benchmarks and PhysicsNeMo import, and a sample runs side by side.
#   bash launch/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OURS=(array-record==0.8.6 bottleneck==1.6.1 cftime==1.6.6.1 donfig==0.8.1.post1 google-crc32c==1.9.0
  grain==0.2.18 ml-collections==1.1.0 netcdf4==1.7.5.1.post1 numcodecs==0.17.1 portpicker==1.6.0
  tensorboardx==2.6.5 zarr==3.1.6)
PHYSICSNEMO=(nvidia-physicsnemo==2.2.2 aiobotocore==3.10.0 aioitertools==0.13.0 botocore==1.43.117
  httpcore2==2.16.2 httpx2==2.16.2 importlib-metadata==10.2.0 jmespath==1.1.0 lazy-importer==0.1.0
  nvtx==0.2.17 omegaconf==2.3.1 pyvers==0.2.3 s3fs==2026.9.0 tensordict==0.15.3 treelib==1.8.0 truststore==0.10.5)
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${OURS[@]}" "${PHYSICSNEMO[@]}"
# omegaconf's parser runtime is published as source only: built here into a pure-Python wheel.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
