"""3 x 3 convolutions whose gradients run through Winograd's F(4x4, 3x3) on CPU.

Lavin & Gray (2016, "Fast algorithms for convolutional neural networks", section 4): a 4 x 4
output tile of a 3 x 3 correlation (stride 1) is  Y = A^T [(G g G^T) . (B^T d B)] A  for the
6 x 6 input tile d that covers it (the matrices below). Their interpolation points 0, +-1, +-2
and infinity round worse than 0, +-1, 1/2, -2 and infinity (Barabasz et al. 2020, "Error
analysis and improving the accuracy of Winograd convolution for deep neural networks"): one
tile of a 128-channel correlation of normal random numbers in float32 is off the exact one by
up to 1.15e-5 against 6.7e-6 of its largest value (median 2.7e-6 against 1.6e-6).

Differentiating it, the kernel gradient is  dg = G^T dU G  with, per position p of the 6 x 6
transformed tile,  dU_p = sum over tiles of V_p^T (A dY A^T)_p,  V = B^T d B: 36 matmuls of
(C_in, tiles) by (tiles, C_out), 36 multiply-adds per 4 x 4 output tile and channel pair
instead of the 144 of the direct kernel gradient (F(2x2, 3x3): 64). The input transform runs
as two 6 x 6 matmuls, one per side of the tile (``_input_tiles``); each other transform is one
small matmul over the flattened tiles (36 x 16, 36 x 9, 9 x 36 and 16 x 36 matrices of
Kronecker products), memory-bound, and each reads its operand once: written as separate sums of
shifted slices, XLA fused the output gradient's producers (up to six skip-connection gradients
added together) into every one of them, recomputing them each time. The tiles are 2.25x the
image (F(2x2, 3x3)'s were 4x), which makes gathering them cheap enough: in-process A/B on the
AVX-512 Xeon against F(2x2, 3x3) with its input transform as sums of strided slices (faster
there than its 4x gather and matmul: full-width regression step 0.925x), the full-width
regression step took 0.955x its time, diffusion 0.963x, the 32-channel split regression step
0.948x; F(4x4, 3x3)'s input transform as sums of strided slices took 0.967x, with 72 k more
HLO instructions against 5 k. Its larger transform entries round more: the gradients of the
full-width Taiwan UNet's Winograd layers (128 and 256 channels, normal random numbers) are off
the exact ones (float64) by 3.0e-6 - 6.0e-6 of their largest value, XLA's float32 convolutions'
by 0.5e-6 - 3.9e-6, far below bfloat16's rounding (4e-3). ``benchmarks/winograd_accuracy.py``
measures both accuracy comparisons.

XLA:CPU computes a kernel gradient as a convolution of the input with the output gradient, its
slowest convolution. Kernel gradient alone, F(2x2, 3x3) measured on a 2-core EPYC (float32,
batch 2, one process, timed in turn): 64 x 64, 128 -> 128: 16.0 against 36.1 ms; 32 x 32,
256 -> 256: 10.6 against 29.2 ms; 64 x 64, 16 -> 16: 0.93 against 2.19 ms. The input gradient,
a correlation of the output gradient with the turned kernel, runs as Winograd's forward form
from 128 channels (``MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS``). The forward stays XLA's direct
convolution, so its output is the reference's to the bit and generation does not change. GPUs
keep their libraries' convolutions (cuDNN chooses its own algorithms, Winograd among them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.compiler_options import target_platform

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_TILE = 4  # output pixels per tile side; input tiles are _TILE + 2 pixels wide
# Interpolation points 0, 1, -1, 1/2, -2 and infinity; the rows of A^T are their powers, those
# of G their powers over prod_{l != j} (a_j - a_l), and B^T completes the identity.
_B_T = np.array(
    [
        [1, -3 / 2, -2, 3 / 2, 1, 0],
        [0, -1, 1 / 2, 5 / 2, 1, 0],
        [0, 1, -5 / 2, 1 / 2, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 1 / 2, -1, -1 / 2, 1, 0],
        [0, 1, -3 / 2, -2, 3 / 2, 1],
    ],
    np.float64,
)
_G = np.array(
    [
        [1, 0, 0],
        [1 / 3, 1 / 3, 1 / 3],
        [-1 / 3, 1 / 3, -1 / 3],
        [-16 / 15, -8 / 15, -4 / 15],
        [1 / 15, -2 / 15, 4 / 15],
        [0, 0, 1],
    ],
    np.float64,
)
_A_T = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 1 / 2, -2, 0], [0, 1, 1, 1 / 4, 4, 0], [0, 1, -1, 1 / 8, -8, 1]], np.float64
)
_B_T32 = _B_T.astype(np.float32)
_B_T_PER_ROW = np.broadcast_to(_B_T32, (_TILE + 2, *_B_T.shape))
# The other two-sided transforms as matrices on row-major flattened tiles, vec(M X N^T) =
# (M kron N) vec(X): each runs as one matmul over all tiles and channels.
_OUTPUT_GRADIENT_TRANSFORM = np.kron(_A_T.T, _A_T.T).astype(np.float32)  # (36, 16): A dY A^T
_KERNEL_TRANSFORM = np.kron(_G, _G).astype(np.float32)  # (36, 9): G g G^T
_KERNEL_GRADIENT_TRANSFORM = _KERNEL_TRANSFORM.T  # (9, 36): G^T dU G
_OUTPUT_TRANSFORM = np.kron(_A_T, _A_T).astype(np.float32)  # (16, 36): A^T M A
# Smaller images keep XLA's kernel gradient: the full-width Taiwan UNet's training step gained
# nothing from F(2x2, 3x3) at its 16 x 16 and smaller levels (64 x 64 input, 1.01x), though
# single kernel gradients there gained (16 x 16, 256 channels: 3.4 against 9.3 ms). F(4x4, 3x3)
# from 16 x 16 (in-process A/B, AVX-512 Xeon): full-width regression step 0.966x, diffusion
# 0.998x, 32-channel split regression 1.002x, for 13 k more HLO instructions.
MIN_WINOGRAD_PIXELS = 32 * 32
# The input gradient through Winograd too from this many channels: with F(2x2, 3x3) the
# full-width regression step took 0.958x its time (Eigen convolutions, 64 x 64: 11.5 against
# 14.1 ms at 128 channels), the 32-channel split step 1.004x; with F(4x4, 3x3) from 64 or 32
# channels the 32-channel split step took 0.989x and 0.995x, for 6 k and 13 k more instructions.
MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS = 128


def direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's 3 x 3 convolution with zero padding 1 (NHWC x HWIO), as ``nn.Conv`` computes it."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS)


def _input_tiles(x: jax.Array) -> jax.Array:
    """B^T d B for every 6 x 6 tile d of the zero-padded image, tiles at stride 4: (36, tiles, C).

    Separably: B^T from the left, applied to the image's six row-strided copies (1.5 times its
    size), then B from the right, applied to the six column-strided copies of the result: 12
    multiply-adds per tile entry where one 36 x 36 Kronecker-product matmul takes 36. In-process
    A/B on the AVX-512 Xeon against that matmul on 36 gathered pixel slices: full-width
    regression step 0.958x, diffusion 0.932x, 32-channel split regression 0.984x, diffusion
    0.996x, with 17 k fewer HLO instructions; the two separable transforms on the 36 gathered
    slices were as fast at full width (0.960x) and 1.005x at 32 channels. A and A^T the same
    way (output gradient, output) took 1.00x-1.01x."""
    b, h, w, c = x.shape
    th, tw = h // _TILE, w // _TILE
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Entry (i, j) of tile (t, s) is padded pixel (4t + i, 4s + j).
    rows = [jax.lax.slice_in_dim(padded, i, i + _TILE * (th - 1) + 1, _TILE, axis=1) for i in range(_TILE + 2)]
    rows = jnp.einsum("ai,ibtxc->abtxc", _B_T32, jnp.stack(rows))
    tiles = [jax.lax.slice_in_dim(rows, j, j + _TILE * (tw - 1) + 1, _TILE, axis=3) for j in range(_TILE + 2)]
    tiles = jnp.stack(tiles, axis=1).reshape(_TILE + 2, _TILE + 2, b * th * tw, c)
    # Batched over the tile rows a, so that the matmul needs no transpose of its operand.
    return jnp.einsum("abj,ajnc->abnc", _B_T_PER_ROW, tiles).reshape((_TILE + 2) ** 2, b * th * tw, c)


def _output_gradient_tiles(cotangent: jax.Array) -> jax.Array:
    """A dY A^T for every 4 x 4 output tile dY: (36, tiles, C)."""
    b, h, w, c = cotangent.shape
    pixels = cotangent.reshape(b, h // _TILE, _TILE, w // _TILE, _TILE, c).transpose(2, 4, 0, 1, 3, 5)
    return jnp.einsum("pq,qnc->pnc", _OUTPUT_GRADIENT_TRANSFORM, pixels.reshape(_TILE**2, -1, c))


def _winograd_correlation(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``direct_conv3x3(x, kernel)`` as  Y = A^T [(G g G^T) . (B^T d B)] A  per 4 x 4 output tile."""
    b, h, w, _ = x.shape
    c_in, c_out = kernel.shape[2:]
    transformed_kernel = jnp.einsum("pk,kio->pio", _KERNEL_TRANSFORM, kernel.reshape(9, c_in, c_out))
    products = jnp.einsum("pnc,pco->pno", _input_tiles(x), transformed_kernel)
    tiles = jnp.einsum("qp,pno->qno", _OUTPUT_TRANSFORM, products)
    tiles = tiles.reshape(_TILE, _TILE, b, h // _TILE, w // _TILE, c_out)
    return tiles.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, c_out)


def _after(x: jax.Array, later: jax.Array) -> jax.Array:
    """``x`` (its values unchanged for a finite ``later``), computed only once ``later`` is.

    The input tiles need nothing but the forward pass's ``x``, so XLA:CPU's scheduler builds
    them, 2.25 times the size of ``x``, in the forward pass and keeps every layer's until its
    backward step (with F(2x2, 3x3)'s tiles, 4x: 81.3 against 56.8 GB of temporaries planned
    for the 448 x 448 diffusion step). An ``optimization_barrier`` orders nothing here
    (XLA:CPU drops it before scheduling); a data dependency does, and XLA does not fold 0 * y
    for floats. It is per image, so a batch split over devices needs no communication. A
    non-finite ``later`` makes the image's kernel gradient non-finite, as it would be anyway."""
    return x + 0 * later[:, :1, :1, :1]


def _kernel_after(kernel: jax.Array, cotangent: jax.Array) -> jax.Array:
    """``kernel`` (unchanged for a finite cotangent), computed only once ``cotangent`` is.

    The turned kernel of the input gradient (and its Winograd transform) needs only the
    parameters, so XLA's scheduler turned every layer's kernel at the start of the training
    step and kept it to the layer's backward step: 0.48 GB more temporaries planned for the
    full-width regression step. The dependency is on the whole batch's cotangent: on a batch
    split over devices it costs one scalar all-reduce per layer (unmeasurable at 32 channels
    on 2 devices). A non-finite cotangent anywhere makes every input gradient of the layer
    non-finite, where it made its image's; the kernel gradients, summed over the batch, were
    non-finite anyway."""
    return kernel + 0 * cotangent[:, :1, :1, :1].sum()


def _winograd_applies(height: int, width: int) -> bool:
    """Whether an image of this size has whole 4 x 4 output tiles and enough of them."""
    return height % _TILE == 0 and width % _TILE == 0 and height * width >= MIN_WINOGRAD_PIXELS


@jax.custom_vjp
def conv3x3_cpu_gradients(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``direct_conv3x3``, whose gradients run through Winograd's F(4x4, 3x3) where it applies
    (``_winograd_applies``; the input gradient from ``MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS``
    channels in and out) and through XLA's convolutions otherwise, the turned kernel built in
    the layer's backward step in either case (``_kernel_after``)."""
    return direct_conv3x3(x, kernel)


def _forward(x, kernel):
    return direct_conv3x3(x, kernel), (x, kernel)


def _backward(residuals, cotangent):
    x, kernel = residuals
    _, h, w, _ = x.shape
    winograd = _winograd_applies(h, w)
    # The input gradient of a zero-padded 3 x 3 correlation is the same correlation of the
    # output gradient with the kernel turned by 180 degrees and its channels swapped.
    turned = jnp.flip(_kernel_after(kernel, cotangent), (0, 1)).swapaxes(2, 3)
    wide = winograd and min(kernel.shape[2:]) >= MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS
    input_gradient = (_winograd_correlation if wide else direct_conv3x3)(cotangent, turned)
    # The kernel gradient, and so the parameter's update, after the input gradient: then
    # every read of the kernel precedes the update, and XLA updates the donated parameter in
    # place instead of copying it at the start of the step to read the copy (0.26 GB of
    # copies per full-width step, 24 MB less planned at its peak).
    x = _after(x, input_gradient)
    if not winograd:
        return input_gradient, jax.vjp(lambda k: direct_conv3x3(x, k), kernel)[1](cotangent)[0]
    # Kernel gradient in the transformed domain: dU = V^T (A dY A^T) per tile position, summed
    # over tiles, then dg = G^T dU G.
    tiles = _input_tiles(x)
    tiles_gradient = jnp.einsum("pnc,pno->pco", tiles, _output_gradient_tiles(cotangent))
    kernel_gradient = jnp.einsum("kp,pio->kio", _KERNEL_GRADIENT_TRANSFORM, tiles_gradient)
    return input_gradient, kernel_gradient.reshape(kernel.shape).astype(kernel.dtype)


conv3x3_cpu_gradients.defvjp(_forward, _backward)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3 x 3 convolution with zero padding 1: ``conv3x3_cpu_gradients`` for float32 on a CPU,
    XLA's convolution and its gradients elsewhere."""
    cpu = target_platform() == "cpu" and x.dtype == kernel.dtype == jnp.float32
    return (conv3x3_cpu_gradients if cpu else direct_conv3x3)(x, kernel)
