"""XLA compiler options for programs that evaluate networks without differentiating their weights.

XLA:CPU hands convolutions to YNNPACK by default. YNNPACK keeps a convolution with fewer than
about 128 channels on one core: 80-100 GFLOP/s for the 32-channel SongUNet's 3 x 3
convolutions on a 2-core EPYC whose two cores reach 184 GFLOP/s in a matmul; a profile of the
32-channel training step had one core busy for 382 ms of its 473 ms and both for 82 ms. XLA's
own (Eigen) convolution splits the same forward convolutions over both cores (139-156 GFLOP/s
at 64 channels), but its kernel-gradient convolution is slower than YNNPACK's, so training
steps keep XLA's defaults. Sampling, guided sampling (input gradients only), validation losses
and regression means never take a kernel gradient and compile their convolutions through
Eigen: side by side in one process, the 18-step CorrDiff sample took 0.72x the time at 32
channels and 0.95x at full width, a forward pass with its input gradient 0.68x and 0.96x, with
outputs equal to 6e-8 (README, *Speed and memory*).
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
