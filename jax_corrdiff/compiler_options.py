"""Compiler options per program, and the platform programs are compiled for.

XLA:CPU's convolution library: YNNPACK (XLA's default) or Eigen.

YNNPACK runs the 32-channel SongUNet's convolutions on one core: 103 GFLOP/s for a 3 x 3,
32-channel convolution at 64 x 64 on a 2-core EPYC whose two cores reach 184 GFLOP/s in a
matmul, and in a profile of the 32-channel regression step one of XLA's two worker threads was
busy for 402 ms of 511 ms, both for 105 ms. XLA's own (Eigen) convolution splits it over both
cores (165 GFLOP/s).

- Programs without weight gradients (sampling, guided sampling, validation losses, regression
  means) compile their convolutions through Eigen: at 32 channels the 18-step CorrDiff sample
  took 0.80x YNNPACK's time and a forward pass with its input gradient 0.72x; at full width
  0.98x and 1.00x; outputs agree to 6e-8 (``benchmarks/conv_library.py``).
- Training steps on one device (the step has the process's cores to itself) compile their
  convolutions through Eigen on x86 CPUs, measured on two: on an AVX2-only 2-core Zen 3 EPYC
  the full-width regression step took 0.81x YNNPACK's time, diffusion 0.82x, 32-channel 0.92x
  and 0.82x; on a 2-core AVX-512 Xeon (Emerald Rapids, family 6 model 207) full width 0.96x
  and 0.94x (median of 11), 32-channel 0.78x and 0.86x (median of 5); on a 2-core Zen 4 EPYC
  (family 25 model 17, AVX-512) full width 1.00x and 1.01x, 32-channel 0.77x and 0.83x (median
  of 11), where one device also beats the split (``cpu_devices``). An earlier 1.11x at 32
  channels, on a machine whose vector extension was not recorded, was not seen again on
  either. Split over several devices in one process (``cpu_devices``), whose kernels share one
  Eigen thread pool, Eigen is slower (32-channel regression 1.71x on the Zen 3, 1.17x on the
  Xeon, diffusion 1.24x there), so a split step keeps YNNPACK; so do CPUs other than x86,
  where neither was measured.

On a GPU, training steps compile their matmuls for cuBLAS instead of Triton
(``xla_gpu_enable_triton_gemm``): with XLA's defaults the 448 x 448 bf16 diffusion step did not
finish compiling in 250-330 s on an H200 (the last log line from XLA:GPU's autotuner), and
compiled without a GPU for an H100 (``benchmarks/gpu_aot_compile.py``, no autotuning) both
training steps failed: Triton found no tiling for a fusion around a 1 x 1 convolution's input
gradient (a 401,408 x 512 bf16 dot, which compiles alone). With cuBLAS's matmuls they compile
there in 88-90 s on two CPU cores. Their speed against Triton's is unmeasured on a GPU.
Sampling keeps XLA's defaults: it compiled in 39.7 s on the H200.

``compiling_for(platform)`` traces and compiles for another platform than this host's default
backend: a GPU's programs compiled ahead of time on a CPU-only machine.
benchmarks/README.md (*Eigen's convolutions for programs without weight gradients*, *Which
library trains faster depends on the CPU*, *Compiled for a GPU without one*).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax

_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's default YNNPACK library fusions (jaxlib 0.10.2: dots, reductions and single
# convolutions), without and with the convolutions.
_YNN_DOTS_AND_REDUCTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
EIGEN_CONVOLUTIONS = {_YNN_OPTION: _YNN_DOTS_AND_REDUCTIONS}
# XLA's defaults, named: compile options given to ``Lowered.compile`` replace the ones ``jax.jit``
# was given, so a benchmark compiling a program both ways names the default side too.
YNNPACK_CONVOLUTIONS = {_YNN_OPTION: _YNN_DOTS_AND_REDUCTIONS + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
CUBLAS_MATMULS = {"xla_gpu_enable_triton_gemm": False}


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if not name.strip():
                    break  # the end of the first processor's block
                info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return frozenset(cpuinfo().get("flags", "").split())


def cpu_vendor() -> str:
    """The host CPU's vendor (``/proc/cpuinfo``'s vendor_id: GenuineIntel, AuthenticAMD; empty
    where it cannot be read)."""
    return cpuinfo().get("vendor_id", "")


# The platform programs are traced and compiled for when it is not this host's (``compiling_for``).
_target_platform: str | None = None


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within it, programs take ``platform``'s code paths and compiler options ("cpu" or "gpu"),
    whatever this host's default backend: to compile a GPU's programs ahead of time on a
    machine without one (``jax.experimental.topologies``). Only what is traced within it: JAX
    reuses a function's earlier traces."""
    global _target_platform
    previous, _target_platform = _target_platform, platform
    try:
        yield
    finally:
        _target_platform = previous


def target_platform() -> str:
    """The platform programs are compiled for: ``compiling_for``'s, else the default backend's."""
    return _target_platform or jax.default_backend()


def network_evaluation_options() -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a program with no weight gradients: on CPU,
    convolutions through XLA's multi-threaded Eigen kernels; XLA's defaults elsewhere."""
    if target_platform() != "cpu":
        return None
    return EIGEN_CONVOLUTIONS


def training_step_options(local_devices: int) -> dict[str, str | bool] | None:
    """``compiler_options`` for a training step run on ``local_devices`` devices of this process:
    on a GPU, cuBLAS's matmuls instead of Triton's; on an x86 CPU (AVX2 or later), Eigen's
    convolutions when the step has the process's cores to itself (one device); XLA's defaults
    otherwise."""
    platform = target_platform()
    if platform == "gpu":
        return CUBLAS_MATMULS
    flags = cpu_flags()
    if platform != "cpu" or local_devices != 1 or "avx2" not in flags:
        return None
    return EIGEN_CONVOLUTIONS
