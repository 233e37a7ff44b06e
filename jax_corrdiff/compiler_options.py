"""XLA compiler options for programs that evaluate networks without differentiating their weights.

XLA:CPU hands convolutions to YNNPACK by default, and YNNPACK runs the 32-channel SongUNet's
convolutions on one core: 103 GFLOP/s for a 3 x 3, 32-channel convolution at 64 x 64 on a
2-core EPYC whose two cores reach 184 GFLOP/s in a matmul, and in a profile of the 32-channel
regression step one of XLA's two worker threads was busy for 402 ms of 511 ms, both for 105 ms.
XLA's own (Eigen) convolution splits it over both cores (165 GFLOP/s), but Eigen's
kernel-gradient convolution is slower than YNNPACK's (that training step: 1.11x the time), so
training steps keep XLA's defaults. Sampling, guided sampling (input gradients only), validation
losses and regression means never take a kernel gradient and compile their convolutions through
Eigen: at 32 channels the 18-step CorrDiff sample took 0.80x the time and a forward pass with
its input gradient 0.72x; at full width, where YNNPACK already uses both cores, 0.98x and 1.00x;
outputs agree to 6e-8 (``benchmarks/conv_library.py``; README, *Speed and memory*).
"""

from __future__ import annotations

import jax

# XLA:CPU's default YNNPACK library fusions (jaxlib 0.10.2: dots, reductions and single
# convolutions) without the convolutions.
_YNN_FUSIONS_WITHOUT_CONVOLUTION = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def network_evaluation_options() -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a program with no weight gradients: on CPU,
    convolutions through XLA's multi-threaded Eigen kernels; XLA's defaults elsewhere."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": _YNN_FUSIONS_WITHOUT_CONVOLUTION}
