"""Building blocks of the DDPM++ SongUNet (Song et al. 2021, as used by CorrDiff).

All arrays are NHWC. Parameters are float32; ``dtype`` is the computation dtype, so
``dtype=jnp.bfloat16`` gives bf16 convolutions and matmuls with float32 master weights.
Normalisation statistics are always taken in float32.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.models.conv3x3 import conv3x3
from jax_corrdiff.models.normalization import Dtype, GroupNorm, silu_keeping_input, zero_after

# The DDPM++ residual and attention branches are merged as (a + b) / sqrt(2) so the
# activation variance stays constant through the network.
SKIP_SCALE = math.sqrt(0.5)


def scaled_xavier_uniform(scale: float = 1.0) -> nn.initializers.Initializer:
    """Xavier-uniform times ``scale``: U(-a, a), a = scale * sqrt(6 / (fan_in + fan_out)).

    DDPM++ initialises the last conv of every residual branch (and the output conv) with
    scale 1e-5 so each block starts close to the identity, and the attention qkv with
    sqrt(0.2).
    """
    return nn.initializers.variance_scaling(scale**2, "fan_avg", "uniform")


def conv(features: int, kernel: int, *, init_scale: float = 1.0, dtype: Dtype, name: str) -> nn.Module:
    """Square 1 x 1 or 3 x 3 convolution with zero padding kernel // 2 (the reference's padding).

    A 1x1 convolution is a matmul over channels and runs as one (``PointwiseConv``): XLA:CPU
    runs a 1x1 convolution's forward 1.3-4.7x and its kernel gradient 1.3-2.8x slower than
    the equivalent matmul (benchmarks/results/conv_kernels_cpu.json). A 3x3 one is ``Conv3x3``.
    """
    init = scaled_xavier_uniform(init_scale)
    if kernel == 1:
        return PointwiseConv(features, kernel_init=init, dtype=dtype, name=name)
    if kernel == 3:
        return Conv3x3(features, kernel_init=init, dtype=dtype, name=name)
    raise ValueError(f"SongUNet convolutions are 1 x 1 or 3 x 3, not {kernel} x {kernel}")


class Conv3x3(nn.Module):
    """3 x 3 convolution, zero padding 1, with ``nn.Conv(features, (3, 3))``'s parameters and
    output; on CPU its gradients run through Winograd's F(4x4, 3x3) (``conv3x3.conv3x3``).
    Called with an ``activation``, it convolves ``activation(*x)`` and keeps ``x`` for the
    backward pass instead (``conv3x3_recomputing_input``)."""

    features: int
    kernel_init: nn.initializers.Initializer
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, activation: Callable[..., jax.Array] | None = None) -> jax.Array:
        in_channels = (x if activation is None else jax.eval_shape(activation, *x)).shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, in_channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if activation is not None:
            kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
            return conv3x3_recomputing_input(activation, tuple(x), kernel) + bias
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv3x3(x, kernel) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv3x3_recomputing_input(activation: Callable[..., jax.Array], operands: tuple, kernel: jax.Array) -> jax.Array:
    """``conv3x3(activation(*operands), kernel)``, whose backward pass keeps ``operands``, not
    the convolution's input, and recomputes the input from them once the output's cotangent
    exists: with x = activation(u), the kernel gradient needs x and the input gradient dx
    gives du through activation's own backward pass.

    The residual block's convolutions take the SiLU of a GroupNorm (conv1 after dropout):
    element-wise functions of what the norm's backward pass keeps anyway (its centred input,
    or its input and statistics, and its parameters). Differentiated by XLA, each convolution
    kept its input as well: a block kept five activations for its backward pass, two with
    this (``test_unet_block_keeps_two_activations_for_its_backward_pass``). The 64 x 64
    regression step plans 372 instead of 576 MB of temporaries at full width and 92 instead of
    150 MB at 32 channels, and takes 0.993x and 1.012x its time (``ab_revisions.py``), for
    14% more HLO instructions: the recomputation, the dropout's hash among it, is fused into
    the kernel gradient's kernels."""
    return _recomputing_forward(activation, operands, kernel)[0]


def _recomputing_forward(activation, operands, kernel):
    return conv3x3(activation(*operands).astype(kernel.dtype), kernel), (operands, kernel)


def _recomputing_backward(activation, residuals, cotangent):
    (first, *rest), kernel = residuals
    # Ordered after the cotangent (the operands' first is the full-size activation).
    later = first + zero_after(cotangent).astype(first.dtype)
    x, activation_backward = jax.vjp(lambda *u: activation(*u).astype(kernel.dtype), later, *rest)
    input_gradient, kernel_gradient = jax.vjp(conv3x3, x, kernel)[1](cotangent)
    return activation_backward(input_gradient), kernel_gradient


conv3x3_recomputing_input.defvjp(_recomputing_forward, _recomputing_backward)


@jax.custom_vjp
def channel_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis, its kernel gradient a matmul of the arrays as stored.

    The kernel gradient is  dW = X^T dY  over all pixels. JAX's own transpose of the einsum
    reached XLA:CPU as a matmul reading dY transposed, so every layer first copied its output
    gradient into channel-major order; as (dY^T X)^T over pixels flattened to rows, XLA folds
    the transpose into one matmul of both arrays as they lie (both contracted over their rows).
    In-process A/B on the AVX-512 Xeon: full-width regression step 0.966x its time, diffusion
    0.983x, 32-channel split regression 0.978x."""
    return jnp.einsum("...i,io->...o", x, kernel)


def _channel_matmul_forward(x, kernel):
    return channel_matmul(x, kernel), (x, kernel)


def _channel_matmul_backward(residuals, cotangent):
    x, kernel = residuals
    rows = cotangent.reshape(-1, cotangent.shape[-1]), x.reshape(-1, x.shape[-1])
    return jnp.einsum("...o,io->...i", cotangent, kernel), jnp.einsum("no,ni->oi", *rows).T


channel_matmul.defvjp(_channel_matmul_forward, _channel_matmul_backward)


class PointwiseConv(nn.Module):
    """1x1 convolution as a channel matmul, with ``nn.Conv(features, (1, 1))``'s parameters.

    The kernel keeps the (1, 1, C_in, C_out) shape so checkpoints, initialisation (fan-in
    and fan-out) and PhysicsNeMo import/export see the same tree as for any other conv.
    """

    features: int
    kernel_init: nn.initializers.Initializer
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return channel_matmul(x, kernel[0, 0]) + bias


# Odd constants of the keyed hash below: lowbias32's two multipliers (C. Wellons, "Hash function
# prospector", 2018) and 2^32 / golden ratio, which spreads the sample index over the key.
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_GOLDEN_32 = 0x9E3779B9


def _mix32(h: jax.Array) -> jax.Array:
    """lowbias32: xor-shift, multiply, xor-shift, multiply, xor-shift on uint32 words. A
    bijection of 32-bit words whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MIX_MULTIPLIERS[0])
    h = h ^ (h >> 15)
    h = h * jnp.uint32(_MIX_MULTIPLIERS[1])
    return h ^ (h >> 16)


def layer_dropout_seed(seed: jax.Array, layer: str) -> jax.Array:
    """Two uint32 key words for one layer's mask, from the step's two words and the layer's name."""
    salt = jnp.uint32(zlib.crc32(layer.encode()))
    first = _mix32(seed[0] ^ salt)
    return jnp.stack([first, _mix32(seed[1] ^ first)])


def dropout(x: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: x / (1 - rate) where the element is kept, 0 where it is dropped.

    Element (b, i) of sample b at row-major index i within the sample is dropped when
    H = mix(mix(i ^ k0) ^ (k1 + b * 2^32/phi)) < rate * 2^32, with (k0, k1) = ``seed`` (the
    layer's, from ``layer_dropout_seed``) and mix lowbias32: a counter-based generator, as
    Philox is (Salmon et al. 2011). Because the mask is a function of each element's index it
    is recomputed wherever it is needed, so XLA fuses its ~30 integer operations into the
    dropout's consumers in the forward and the backward pass and no mask is written to memory;
    it is also the same however the batch is sharded. Flax's ``nn.Dropout`` draws a 32-bit
    threefry word per element, which XLA:CPU runs as a loop writing the whole mask, after a key
    derivation loop per layer: about 290 HLO instructions per layer. In-process A/Bs against
    it on the AVX-512 Xeon (each step compiled both ways and timed in turn, median of 18-24
    steps): training steps 0.939x (regression) and 0.956x (diffusion) their time at full width,
    0.936x and 0.953x at 32 channels split over two devices; 15-17 k fewer HLO lines.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    per_sample = math.prod(x.shape[1:])
    if per_sample >= 2**32:
        raise ValueError(f"dropout counts elements per sample in 32 bits; {x.shape} has {per_sample}")
    strides = [math.prod(x.shape[d + 1 :]) for d in range(1, x.ndim)]
    index = sum(jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(s) for d, s in enumerate(strides, 1))
    sample = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0)
    bits = _mix32(_mix32(index ^ seed[0]) ^ (seed[1] + sample * jnp.uint32(_GOLDEN_32)))
    keep = bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), jnp.zeros_like(x))


# Row 2i + p (p in {0, 1}) of a nearest-neighbour 2x upsampled image copies source row i, so a
# 3-tap column at output row 2i + p reads source rows i - 1, i, i (p = 0) or i, i, i + 1
# (p = 1): two source offsets, (-1, 0) or (0, +1). _PHASE_TAPS[p, a, r] = 1 where tap r of the
# 3-tap kernel lands on offset a of phase p; the same holds for columns.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
# Row (a, e, p, q) holds the weights of the 9 kernel taps in the phase kernel of source offset
# (a, e) and phase (p, q): phase kernels are one matmul of the kernel's taps. As the three-operand
# einsum "par,qes,rsio->aeipqo", XLA:CPU ran two contractions over 3 taps, each a library matmul
# of inner dimension 3 (0.44 ms per 64-channel kernel); in-process A/B on the AVX-512 Xeon: the
# 32-channel split diffusion step (which also runs the frozen regression UNet) 0.973x its time,
# the full-width regression step 0.987x.
_PHASE_KERNEL_TAPS = np.einsum("par,qes->aepqrs", _PHASE_TAPS, _PHASE_TAPS).reshape(16, 9)


class UpsampleConv(nn.Module):
    """3 x 3 convolution (zero padding 1) of the nearest-neighbour 2x upsampled input, computed on
    the input's own grid, with ``nn.Conv(features, (3, 3))``'s parameters.

    Output pixel (2i + p, 2j + q) sees only the 2 x 2 source window at offsets given by its phase
    (p, q), with the 3 x 3 taps that land on the same source pixel summed (``_PHASE_TAPS``). One
    2 x 2 convolution of the source, zero-padded by one, with 4 * C_out output channels (one set
    per phase) gives every phase: 16 multiply-adds per source pixel and channel pair instead of
    the 36 of convolving the upsampled image, in the forward pass and in both gradients. The
    sum is the same up to float rounding. On a 2-core EPYC the full-width UNet's largest up
    convolution (32 x 32 x 256 -> 64 x 64 x 256, batch 2), forward and both gradients, took
    65 ms this way against 160 ms (XLA:CPU Eigen kernels), and the training steps of the
    Taiwan UNet 0.97x (regression) and 0.95x (diffusion) their time at 64 x 64.
    """

    features: int
    kernel_init: nn.initializers.Initializer
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        # (row offset a, column offset e, C_in, row phase p, column phase q, C_out)
        phases = jnp.einsum("fk,kio->fio", _PHASE_KERNEL_TAPS, kernel.reshape(9, c, self.features))
        phases = phases.reshape(2, 2, 2, 2, c, self.features).transpose(0, 1, 4, 2, 3, 5)
        x, phases, bias = nn.dtypes.promote_dtype(x, phases.reshape(2, 2, c, 4 * self.features), bias, dtype=self.dtype)
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = jax.lax.conv_general_dilated(padded, phases, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # y[:, i + p, j + q, p, q] is output pixel (2i + p, 2j + q): phase p starts p rows down
        y = y.reshape(b, h + 1, w + 1, 2, 2, self.features)
        rows = [jnp.stack([y[:, p : p + h, q : q + w, p, q] for q in (0, 1)], axis=3) for p in (0, 1)]
        return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, self.features) + bias


def dense(features: int, *, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=scaled_xavier_uniform(1.0),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        name=name,
    )


class EmbeddingAffine(nn.Module):
    """A residual block's Linear(emb): ``nn.Dense(features)``'s parameters, initialisation and
    output. With ``zero_embedding`` (CorrDiff's regression network embeds no noise level: its
    embedding is zero), Linear(0) is the bias alone, which is what this returns, leaving out
    the product with the weights: a matmul and its weight gradient per block, exactly zero
    either way (so the weights, as in the reference, never move)."""

    features: int
    zero_embedding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        kernel = self.param("kernel", scaled_xavier_uniform(1.0), (emb.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        emb, kernel, bias = nn.dtypes.promote_dtype(emb, kernel, bias, dtype=self.dtype)
        if self.zero_embedding:
            return jnp.broadcast_to(bias, (emb.shape[0], self.features))
        return emb @ kernel + bias


def downsample2x(x: jax.Array) -> jax.Array:
    """2x2 box average with stride 2: the reference's depthwise [1,1] x [1,1] / 4 filter."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2: the reference's transposed depthwise conv with 4 x [1,1]/4 filter."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def _silu_after(activation: Callable[..., jax.Array], *operands: jax.Array, down: bool) -> jax.Array:
    h = silu_keeping_input(activation(*operands))
    return downsample2x(h) if down else h


def _dropout_after(activation: Callable[..., jax.Array], *operands: jax.Array, rate: float) -> jax.Array:
    """``dropout(activation(*inputs), seed, rate)`` of ``operands`` = (*inputs, seed)."""
    *inputs, seed = operands
    return dropout(activation(*inputs), seed, rate)


class UNetBlock(nn.Module):
    """DDPM++ residual block with optional 2x resampling and self-attention.

    h = conv0(resample(silu(GN0(x))));  h = silu(GN1(h + Linear(emb)));
    x' = (conv1(dropout(h)) + skip(x)) / sqrt(2),   skip = resample + 1x1 conv when the
    channel count changes or the block resamples, identity otherwise;
    with attention:  x'' = (proj(attn(GN2(x'))) + x') / sqrt(2).
    """

    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int = 1
    # jax.nn.dot_product_attention implementation: None lets XLA choose; "cudnn" asks for
    # cuDNN's fused attention on NVIDIA GPUs (bf16/fp16 compute only); "xla" forces XLA's.
    attention_impl: str | None = None
    dropout: float = 0.0
    unbiased_groupnorm: bool = False
    # The network's embedding is zero (the regression network's ``embedding_type="zero"``).
    zero_embedding: bool = False
    dtype: Dtype = jnp.float32

    def _norm(self, name: str, silu: bool = False) -> GroupNorm:
        return GroupNorm(unbiased_variance=self.unbiased_groupnorm, silu=silu, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, dropout_seed: jax.Array | None) -> jax.Array:
        """``dropout_seed``: the training step's two uint32 dropout words, or None (no dropout)."""
        in_channels = x.shape[-1]
        out = self.out_channels
        # Both convolutions recompute their inputs in the backward pass from what the norms
        # before them keep anyway (``conv3x3_recomputing_input``). norm1 differentiates itself in
        # closed form and keeps only its input (``silu_of_normalised``: 142 MB less planned at
        # the peak of the full-width regression step, as fast). norm0 keeps XLA's gradient, and
        # with it the centred input: its input is the residual stream, whose gradient joins the
        # skip connections', and XLA fused a recomputed normalisation into each of their
        # consumers (31 k more HLO instructions, 2.3% slower at full width).
        activation, operands = self._norm("norm0").recomputable(x)
        activation = functools.partial(_silu_after, activation, down=self.down)
        if self.up:
            up_conv = UpsampleConv(out, kernel_init=scaled_xavier_uniform(1.0), dtype=self.dtype, name="conv0")
            h = up_conv(activation(*operands))
        else:
            h = conv(out, 3, dtype=self.dtype, name="conv0")(operands, activation=activation)
        # Added in float32, as norm1 takes its input: added in bf16 (a GPU's computation dtype),
        # the embedding's broadcast went to conv0's cuDNN call as its side input, written out at
        # full size and read back (51 MB a block at 448 x 448; the sample's kernels moved 7%
        # more bytes, ``benchmarks/gpu_aot_compile.py``). In float32 the add is fused into norm1;
        # a training step's kernels move 1.5% more (XLA fuses its backward pass differently).
        embedding = EmbeddingAffine(out, self.zero_embedding, dtype=self.dtype, name="affine")(emb)[:, None, None, :]
        h = h.astype(jnp.float32) + embedding.astype(jnp.float32)
        activation, operands = self._norm("norm1", silu=True).recomputable(h)
        if dropout_seed is not None:
            operands += (layer_dropout_seed(dropout_seed, "/".join(self.path)),)
            activation = functools.partial(_dropout_after, activation, rate=self.dropout)
        h = conv(out, 3, init_scale=1e-5, dtype=self.dtype, name="conv1")(operands, activation=activation)
        skip = x
        if out != in_channels or self.up or self.down:
            skip_conv = conv(out, 1, dtype=self.dtype, name="skip")
            # A 1x1 convolution commutes with either resampling: it runs on the coarser grid.
            skip = upsample2x(skip_conv(x)) if self.up else skip_conv(downsample2x(x) if self.down else x)
        x = (h + skip.astype(h.dtype)) * SKIP_SCALE
        if self.attention:
            x = (self._self_attention(x) + x) * SKIP_SCALE
        return x

    def _self_attention(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        heads = self.num_heads
        qkv = conv(3 * c, 1, init_scale=math.sqrt(0.2), dtype=self.dtype, name="qkv")(self._norm("norm2")(x))
        # The qkv channels are laid out (head, channel-in-head, {q,k,v}) as in the
        # reference, so imported 1x1 conv weights need no permutation.
        qkv = qkv.reshape(b, height * width, heads, c // heads, 3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
        # softmax(q k^T / sqrt(C / heads)) v over all positions, per head.
        a = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl).reshape(b, height, width, c)
        return conv(c, 1, init_scale=1e-5, dtype=self.dtype, name="proj")(a)
