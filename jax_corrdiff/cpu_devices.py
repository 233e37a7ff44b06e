"""How many JAX devices a CPU training process splits its cores into.

XLA:CPU runs every operation on one pool of worker threads, one per core, and leaves it to each
operation to use several. YNNPACK, its convolution library, runs convolutions narrower than about
128 channels on a single thread: in a profile of the 32-channel 64 x 64 regression step on two
cores, one worker thread was busy for 402 ms of 511 ms and both for only 105 ms
(``benchmarks/conv_library.py --profile``). Splitting the batch over one device per core, data
parallelism as on GPUs (``mesh.DATA_AXIS``), runs those convolutions side by side: on two cores
the 32-channel 64 x 64 training step takes 0.80x as long (regression, batch 2), 0.81x
(diffusion, batch 2) and 0.72x (regression, batch 8). Every device holds a replica of the
parameters, optimizer state and EMA and runs the whole optimizer update, so the split costs
memory and loses on tiny images (32 x 32, batch 2: 1.06x and 1.12x); at 128 channels, where
YNNPACK threads the convolutions itself, it is level (0.97x) and would take the plan from 2.69
to 4.24 GB, so wide networks keep one device (``benchmarks/cpu_devices.py``).

A step on one device compiles its convolutions through Eigen's threaded kernels on x86
(``compiler_options.training_step_options``), and on AMD's AVX-512 cores that beats the split:
on a 2-core Zen 4 EPYC (family 25, model 17; 2026-12-07) the split took 1.087x one device's time
for the 32-channel regression step and 1.056x for the diffusion step (median of 11), where on a
Zen 3 (AVX2) and an AVX-512 Xeon the split had won (benchmarks/README.md, *A Zen 4*). There
narrow networks keep one device too, which also holds one replica of the training state.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from jax_corrdiff import distributed
from jax_corrdiff.compiler_options import cpu_flags, cpu_vendor
from jax_corrdiff.config import check_training_config

# YNNPACK threads convolutions of this many channels and more (jaxlib 0.10.2).
THREADED_CONVOLUTION_CHANNELS = 128


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM or container allotment)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def per_core_devices(batch_sizes: list[int], cores: int) -> int:
    """One device per core, as many as divide every global batch (the data axis must split each
    one evenly)."""
    batch = math.gcd(*(int(b) for b in batch_sizes))
    return max(d for d in range(1, max(cores, 1) + 1) if batch % d == 0)


def splits_narrow_networks() -> bool:
    """Whether this host trains networks narrower than ``THREADED_CONVOLUTION_CHANNELS`` faster
    split over per-core devices: all but AMD's CPUs with AVX-512 (module docstring)."""
    return not (cpu_vendor() == "AuthenticAMD" and "avx512f" in cpu_flags())


def cpu_device_count(model_channels: int, batch_sizes: list[int], cores: int) -> int:
    """``per_core_devices`` for a network narrower than ``THREADED_CONVOLUTION_CHANNELS`` on a
    host that ``splits_narrow_networks``, else 1."""
    if model_channels >= THREADED_CONVOLUTION_CHANNELS or not splits_narrow_networks():
        return 1
    return per_core_devices(batch_sizes, cores)


def training_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
    """``config.cpu_devices`` if set, else ``cpu_device_count`` for the widest network and the
    batches of the stages ``config`` trains."""
    if int(config.cpu_devices) < 0:
        raise ValueError(f"cpu_devices must be >= 0 (0 = automatic), got {config.cpu_devices!r}")
    if config.cpu_devices:
        return int(config.cpu_devices)
    stages = check_training_config(config)
    width = max(int(config[s].model.unet.model_channels) for s in stages)
    return cpu_device_count(width, [config[s].training.batch_size for s in stages], cores)


def use_cpu_devices(count: int) -> str:
    """Set ``jax_num_cpu_devices`` to ``count`` unless the environment already chose a CPU device
    count (``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count``, or a multi-process
    launcher, which gives each process its share of the cores). Must run before anything touches
    a JAX backend; on a GPU or TPU host it only shapes the unused CPU backend. Returns what it
    did, for the log."""
    if jax.config.jax_num_cpu_devices >= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return "CPU devices: as the environment set them"
    if distributed.describe_environment() != "single process":
        return "CPU devices: as the multi-process launcher set them (JAX_NUM_CPU_DEVICES, default 1)"
    jax.config.update("jax_num_cpu_devices", count)
    return f"CPU devices: {count} on {usable_cores()} cores"


def split_cores_for_training(config: ml_collections.ConfigDict) -> str:
    """``use_cpu_devices(training_cpu_devices(config))``: the train entry point's first step."""
    return use_cpu_devices(training_cpu_devices(config, usable_cores()))
