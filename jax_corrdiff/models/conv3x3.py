"""3 x 3 convolutions whose kernel gradient runs through Winograd's F(2x2, 3x3) on CPU.

Lavin & Gray (2016, "Fast algorithms for convolutional neural networks", section 4): a 2 x 2
output tile of a 3 x 3 correlation (stride 1) is  Y = A^T [(G g G^T) . (B^T d B)] A  for the
4 x 4 input tile d that covers it, with

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].

Differentiating it, the kernel gradient is  dg = G^T dU G  with, per position p of the 4 x 4
transformed tile,  dU_p = sum over tiles of V_p^T (A dY A^T)_p,  V = B^T d B: 16 matmuls of
(C_in, tiles) by (tiles, C_out), 16 multiply-adds per 2 x 2 output tile and channel pair
instead of the 36 of the direct kernel gradient. The transforms are additions, which XLA fuses
into memory-bound loops.

XLA:CPU computes a kernel gradient as a convolution of the input with the output gradient, its
slowest convolution. Measured on a 2-core EPYC (Eigen kernels, float32, batch 2, one process,
timed in turn): 64 x 64, 128 -> 128: 20.4 against 32.8 ms; 32 x 32, 256 -> 256: 16.0 against
25.5 ms. The input gradient gains nothing from the same transform (14.5 against 16.0 ms and
17.2 against 17.3 ms) and the forward little, so both stay XLA's direct convolution, and the
forward output is the reference's to the bit. Below 32 x 32 pixels the transforms cost more
than the matmuls save. GPUs keep their libraries' convolutions (cuDNN chooses its own
algorithms, Winograd among them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
# Smaller images and narrower convolutions keep XLA's kernel gradient. Below 32 x 32 pixels the
# transforms cost more than the matmuls save (8 x 8, 256 channels: 8.0 against 4.6 ms). Below
# 128 channels the training step lost: 32-channel UNet split over two devices, regression and
# diffusion steps 1.04x, though its single convolutions' kernel gradients gained (64 x 64,
# 32 -> 32: 1.80 against 2.15 ms).
MIN_WINOGRAD_PIXELS = 32 * 32
MIN_WINOGRAD_CHANNELS = 128


def direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's 3 x 3 convolution with zero padding 1 (NHWC x HWIO), as ``nn.Conv`` computes it."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS)


def _transform_input(r0, r1, r2, r3):
    """B^T d along one axis of a 4 x 4 input tile, given its four rows (or columns)."""
    return r0 - r2, r1 + r2, r2 - r1, r1 - r3


def _transform_output_gradient(g0, g1):
    """A g along one axis of a 2 x 2 output-gradient tile, given its two rows (or columns)."""
    return g0, g0 + g1, g0 - g1, -g1


def _input_tiles(x: jax.Array) -> jax.Array:
    """B^T d B for every 4 x 4 tile d of the zero-padded image, tiles at stride 2: (16, tiles, C)."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    # Tile (t, s) covers padded rows 2t .. 2t + 3: pixel pairs t and t + 1 of the padded image.
    pairs = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, th + 1, 2, tw + 1, 2, c)
    rows = _transform_input(pairs[:, :-1, 0], pairs[:, :-1, 1], pairs[:, 1:, 0], pairs[:, 1:, 1])
    tiles = [
        column
        for row in rows
        for column in _transform_input(row[:, :, :-1, 0], row[:, :, :-1, 1], row[:, :, 1:, 0], row[:, :, 1:, 1])
    ]
    return jnp.stack(tiles).reshape(16, b * th * tw, c)


@jax.custom_vjp
def conv3x3_winograd_gradients(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``direct_conv3x3``, whose kernel gradient is computed through Winograd's F(2x2, 3x3)."""
    return direct_conv3x3(x, kernel)


def _forward(x, kernel):
    return direct_conv3x3(x, kernel), (x, kernel)


def _backward(residuals, cotangent):
    x, kernel = residuals
    b, h, w, features = cotangent.shape
    # The input gradient of a zero-padded 3 x 3 correlation is the same correlation of the
    # output gradient with the kernel turned by 180 degrees and its channels swapped.
    input_gradient = direct_conv3x3(cotangent, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    # Kernel gradient in the transformed domain: dU = V^T (A dY A^T) per tile position, summed
    # over tiles, then dg = G^T dU G.
    pairs = cotangent.reshape(b, h // 2, 2, w // 2, 2, features)
    rows = _transform_output_gradient(pairs[:, :, 0], pairs[:, :, 1])
    tiles = [column for row in rows for column in _transform_output_gradient(row[:, :, :, 0], row[:, :, :, 1])]
    output_gradient_tiles = jnp.stack(tiles).reshape(16, b * (h // 2) * (w // 2), features)
    tiles_gradient = jnp.einsum("pnc,pno->pco", _input_tiles(x), output_gradient_tiles)
    kernel_gradient = jnp.einsum("ar,bs,abio->rsio", _G, _G, tiles_gradient.reshape(4, 4, *kernel.shape[2:]))
    return input_gradient, kernel_gradient.astype(kernel.dtype)


conv3x3_winograd_gradients.defvjp(_forward, _backward)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3 x 3 convolution with zero padding 1. Its kernel gradient runs through Winograd's
    F(2x2, 3x3) on a CPU for float32 images of even height and width with at least
    ``MIN_WINOGRAD_PIXELS`` pixels and ``MIN_WINOGRAD_CHANNELS`` input and output channels,
    through XLA's convolution otherwise."""
    _, h, w, _ = x.shape
    winograd = (
        jax.default_backend() == "cpu"
        and x.dtype == kernel.dtype == jnp.float32
        and h % 2 == 0
        and w % 2 == 0
        and h * w >= MIN_WINOGRAD_PIXELS
        and min(kernel.shape[2:]) >= MIN_WINOGRAD_CHANNELS
    )
    return (conv3x3_winograd_gradients if winograd else direct_conv3x3)(x, kernel)
