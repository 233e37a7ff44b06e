"""Group normalisation as the DDPM++ SongUNet uses it (32 groups of NHWC channels, statistics
in float32), and the SiLU after it, with backward passes that keep as few activations as the
gradient allows: ``silu_of_normalised`` keeps its input and the group statistics,
``silu_keeping_input`` its input, and ``GroupNorm.recomputable`` hands a norm's output to a
convolution as a function of what its backward pass keeps (``layers.Conv3x3``'s ``activation``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_corrdiff.compiler_options import target_platform

Dtype = Any


def num_groups(channels: int) -> int:
    """CorrDiff's group count: min(32, ceil(C / 4)), which must divide C.

    This is PhysicsNeMo's rule; it equals min(32, C // 4) (reference.md) whenever C is a
    multiple of 4, which every SongUNet width is.
    """
    groups = min(32, -(-channels // 4))
    if channels % groups:
        raise ValueError(f"GroupNorm: {groups} groups do not divide {channels} channels")
    return groups


def _groups_and_count(shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of groups, values per (image, group)) of an NHWC activation's shape."""
    _, height, width, channels = shape
    groups = num_groups(channels)
    return groups, height * width * (channels // groups)


def _group_moments(x32: jax.Array, unbiased_variance: bool):
    """(x - mean, mean, variance) of NHWC float32 ``x32``, the moments per (image, group)
    broadcast to the group's channels as (B, 1, 1, C)."""
    # Summed per channel over the pixels first and then over the channels of a group: the
    # same statistics as reducing a (B, H, W, G, C/G) view, but contiguous reductions, which
    # XLA:CPU runs 3-5x faster forward and backward.
    groups, n = _groups_and_count(x32.shape)

    def group_mean(values):  # (B, H, W, C) -> (B, 1, 1, C): its group's mean for every channel
        return _group_sum(values.sum(axis=(1, 2)), groups)[:, None, None, :] / n

    if target_platform() == "cpu":
        # Two passes: without multi-output fusion, XLA:CPU reads the input once per reduction
        # however they are written.
        mean = group_mean(x32)
        centered = x32 - mean
        var = group_mean(jnp.square(centered))
    else:
        # One pass, shifted (Chan, Golub & LeVeque 1983): with d = x - s for s one of the
        # group's values (its first channel at the first pixel), mean = s + E[d] and
        # var = E[d^2] - E[d]^2. The two sums are sibling reductions of one input, which
        # XLA:GPU fuses into one kernel: the input is read once where two passes read it
        # twice. Compiled for an H100, the 448 x 448 sample's kernels move 10% fewer bytes
        # (``benchmarks/gpu_aot_compile.py``), for 29% more HLO instructions (the statistics
        # recomputed in their consumers). The shift keeps the subtraction from cancelling:
        # E[d]^2 is of the order of the variance however far the mean is from zero. A value
        # of the input, not a mean: a slice, one small kernel, where a mean took a reduction
        # and a broadcast. Its gradient is zero (var and the centred input do not depend on
        # it), so it carries none.
        channels_per_group = x32.shape[-1] // groups
        first_value = jnp.repeat(x32[:, 0, 0, ::channels_per_group], channels_per_group, axis=-1)
        shift = jax.lax.stop_gradient(first_value)[:, None, None, :]
        shifted = x32 - shift
        shifted_mean = group_mean(shifted)
        mean = shift + shifted_mean
        centered = x32 - mean
        var = jnp.maximum(group_mean(jnp.square(shifted)) - jnp.square(shifted_mean), 0.0)
    if unbiased_variance:
        var = var * _bessel_correction(n)
    return centered, mean, var


def _bessel_correction(n: int) -> float:
    """n / (n - 1): the biased variance of n values to the unbiased one (1 for a single value)."""
    return n / max(n - 1, 1)


def _group_sum(per_channel: jax.Array, groups: int) -> jax.Array:
    """(B, C) -> (B, C): the sum over each channel's group, for every channel."""
    batch, channels = per_channel.shape
    sums = per_channel.reshape(batch, groups, channels // groups).sum(axis=-1)
    return jnp.repeat(sums, channels // groups, axis=-1)


def zero_after(cotangent: jax.Array) -> jax.Array:
    """Zeros, (B, 1, 1, 1) float32, computed from an NHWC ``cotangent``: added to what a backward
    pass recomputes from the forward pass's values, they order the recomputation after the
    cotangent, so XLA can neither merge it with the forward pass's own (and keep that alive
    until the backward pass) nor schedule it early. XLA does not fold 0 * y for floats. Summed
    over the first pixel's channels, the dependency is a small reduction of its own; a bare
    slice of the cotangent had XLA recompute the cotangent's producers (dropout's mask) for
    every element."""
    return 0 * cotangent[:, :1, :1, :].astype(jnp.float32).sum(axis=-1, keepdims=True)


def group_statistics(x: jax.Array, eps: float, unbiased_variance: bool) -> tuple[jax.Array, jax.Array]:
    """(mean, 1 / std) of NHWC ``x`` per (image, group) in float32, as (B, 1, 1, C), without
    a gradient: ``silu_of_normalised`` differentiates through them itself."""
    _, mean, var = _group_moments(jax.lax.stop_gradient(x).astype(jnp.float32), unbiased_variance)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def silu_of_normalised(
    x: jax.Array, mean: jax.Array, rstd: jax.Array, scale: jax.Array, bias: jax.Array, unbiased_variance: bool
):
    """silu((x - mean) rstd scale + bias) in ``x``'s dtype, with (mean, rstd) =
    ``group_statistics(x)``: silu(GroupNorm(x)), whose gradient is that of the whole
    composition (through the statistics too) and whose backward pass keeps only ``x`` and the
    statistics, recomputing the normalised activation from them.

    Differentiated by XLA, the pair kept the centred input, the sigmoid and the output of the
    SiLU for the backward pass, three activations where this keeps one (the next layer keeps
    its own input, the output, either way). The statistics come in as operands so that a
    convolution recomputing this as its input (``conv3x3_recomputing_input``) does not
    recompute them: two reductions per layer, which took the 32-channel regression step to
    1.033x its time against 1.010x (``ab_revisions.py``)."""
    return _silu_of_normalised_forward(x, mean, rstd, scale, bias, unbiased_variance)[0]


def _silu_of_normalised_forward(x, mean, rstd, scale, bias, unbiased_variance):
    centered = x.astype(jnp.float32) - mean
    out = jax.nn.silu(centered * (rstd * scale) + bias).astype(x.dtype)
    return out, (x, mean, rstd, scale, bias)


def _silu_of_normalised_backward(unbiased_variance, residuals, cotangent):
    """With c = x - mean, a = rstd * scale, y = c a + bias, s = sigmoid(y) and g the cotangent:

        dy = g s (1 + y (1 - s))                     (silu'(y) = s + y s (1 - s))
        d bias = sum_{b,h,w} dy,  d a = sum_{h,w} dy c,  d scale = sum_b d a * rstd
        d var = -rstd^3 / 2 * sum_group(d a * scale)  (times n / (n - 1) when unbiased)
        d mean = -sum_group(sum_{h,w} dy) * a         (var's own mean term vanishes: sum c = 0)
        dx = dy a + d mean / n + 2 c d var / n

    with sum_group summing over the channels of a group, per image. The statistics' own
    cotangents are zero: their gradient is in dx.
    """
    x, mean, rstd, scale, bias = residuals
    groups, n = _groups_and_count(x.shape)
    centered = x.astype(jnp.float32) - (mean + zero_after(cotangent))
    a = rstd * scale
    y = centered * a + bias
    s = jax.nn.sigmoid(y)
    dy = cotangent.astype(jnp.float32) * s * (1 + y * (1 - s))
    dy_sum = dy.sum(axis=(1, 2))  # (B, C)
    d_a = (dy * centered).sum(axis=(1, 2))
    rstd_c = rstd[:, 0, 0, :]
    d_var = -0.5 * rstd_c**3 * _group_sum(d_a * scale, groups)
    if unbiased_variance:
        d_var = d_var * _bessel_correction(n)
    d_mean = -_group_sum(dy_sum * a[:, 0, 0, :], groups)
    dx = dy * a + (d_mean / n)[:, None, None, :] + centered * (2 / n * d_var)[:, None, None, :]
    d_scale = (d_a * rstd_c).sum(axis=0)
    # d bias summed over the batch from the per-image sums: XLA merges a sum of a sum into one
    # reduction, which read dy whole a second time.
    d_bias = jax.lax.optimization_barrier(dy_sum).sum(axis=0)
    zeros = jnp.zeros_like(mean), jnp.zeros_like(rstd)
    return dx.astype(x.dtype), *zeros, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


silu_of_normalised.defvjp(_silu_of_normalised_forward, _silu_of_normalised_backward)


@jax.custom_vjp
def silu_keeping_input(y: jax.Array) -> jax.Array:
    """y sigmoid(y) of NHWC ``y``, as ``jax.nn.silu``, whose backward pass keeps ``y`` and
    recomputes the sigmoid: silu'(y) = s (1 + y (1 - s)), s = sigmoid(y).

    Differentiated by XLA, it kept the sigmoid for the backward pass: an exponential and a
    division, which XLA does not recompute. After a GroupNorm, ``y`` is an affine function of
    the centred input that the norm's backward pass keeps anyway, so XLA recomputes ``y`` in
    the backward pass's fusion and keeps nothing more: one activation less per layer (101 MB
    less planned for the full-width regression step, 26 MB at 32 channels), as fast."""
    return jax.nn.silu(y)


def _silu_forward(y):
    return jax.nn.silu(y), y


def _silu_backward(y, cotangent):
    y32 = y.astype(jnp.float32) + zero_after(cotangent)
    s = jax.nn.sigmoid(y32)
    return ((cotangent.astype(jnp.float32) * s * (1 + y32 * (1 - s))).astype(y.dtype),)


silu_keeping_input.defvjp(_silu_forward, _silu_backward)


class GroupNorm(nn.Module):
    """Group normalisation over (y, x, channels-in-group) with a per-channel affine.

    ``unbiased_variance`` reproduces PhysicsNeMo's evaluation-mode GroupNorm, which divides
    the sum of squares by N - 1 instead of N (reference.md section 2). It is a compatibility
    switch for imported checkpoints; models trained here normalise with the biased variance
    in training and evaluation alike. ``silu`` applies SiLU to the result, through
    ``silu_of_normalised``.
    """

    eps: float = 1e-6
    unbiased_variance: bool = False
    silu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def affine(self, channels: int) -> tuple[jax.Array, jax.Array]:
        """The per-channel (scale, bias)."""
        scale = self.param("scale", nn.initializers.ones, (channels,))
        return scale, self.param("bias", nn.initializers.zeros, (channels,))

    def recomputable(self, x: jax.Array) -> tuple[Callable[..., jax.Array], tuple]:
        """(f, operands) with f(*operands) this norm of ``x`` and operands what its backward
        pass keeps anyway, so that a convolution of the output can recompute it instead of
        keeping it (``Conv3x3``'s ``activation``). With ``silu``: ``silu_of_normalised`` of x, its
        statistics, scale and bias. Without: centred * factor + bias, factor = rstd * scale,
        whose gradient (XLA's) keeps the centred input."""
        scale, bias = self.affine(x.shape[-1])
        if self.silu:
            x = x.astype(self.dtype)
            statistics = group_statistics(x, self.eps, self.unbiased_variance)
            return functools.partial(silu_of_normalised, unbiased_variance=self.unbiased_variance), (
                x,
                *statistics,
                scale,
                bias,
            )
        # centered * (rstd * scale): the backward pass then keeps only the centred activation
        # (d factor = sum dy centered gives both d scale and d rstd in one reduction), where
        # (centered * rstd) * scale kept the normalised one as well: 0.18 GB less at the peak
        # of the full-width regression step, as fast.
        centered, _, var = _group_moments(x.astype(jnp.float32), self.unbiased_variance)
        factor = jax.lax.rsqrt(var + self.eps) * scale
        return functools.partial(_affine_in, dtype=self.dtype), (centered, factor, bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        normalise, operands = self.recomputable(x)
        return normalise(*operands)


def _affine_in(centered, factor, bias, *, dtype: Dtype) -> jax.Array:
    return (centered * factor + bias).astype(dtype)
