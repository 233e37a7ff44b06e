"""3 x 3 convolutions whose gradients run through Winograd's F(4x4, 3x3) on CPU, their turned
kernels built late."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import redraw_params

from jax_corrdiff.models.conv3x3 import (
    MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS,
    conv3x3_cpu_gradients,
    direct_conv3x3,
)
from jax_corrdiff.models.layers import Conv3x3, UNetBlock, dropout, scaled_xavier_uniform
from jax_corrdiff.models.normalization import GroupNorm


def assert_close(actual, desired, tolerance):
    """Largest error relative to the largest value (a convolution's errors scale with its sums)."""
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    assert np.abs(actual - desired).max() <= tolerance * np.abs(desired).max()


@pytest.mark.parametrize(
    "shape, out_channels",
    [
        ((2, 32, 36, 5), 7),
        ((1, 32, 32, MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS), MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS),
        ((2, 8, 12, 5), 7),  # below MIN_WINOGRAD_PIXELS: XLA's gradients
        ((1, 34, 32, 3), 4),  # height not a multiple of 4: no whole 4 x 4 tiles
    ],
)
def test_cpu_gradients_equal_the_direct_convolution_s_borders_included(shape, out_channels):
    """Kernel gradients through Winograd from MIN_WINOGRAD_PIXELS pixels, input gradients too from
    MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS channels; XLA's convolutions for the others."""
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], out_channels))
    cotangent = jax.random.normal(jax.random.key(2), (*shape[:3], out_channels))
    out, vjp = jax.vjp(conv3x3_cpu_gradients, x, kernel)
    want, want_vjp = jax.vjp(direct_conv3x3, x, kernel)
    np.testing.assert_array_equal(out, want)
    # Winograd's transforms round more than the direct sums: within 5.5e-6 of XLA's float32
    # gradients at 128-256 channels (module docstring).
    for actual, desired in zip(vjp(cotangent), want_vjp(cotangent)):
        assert_close(actual, desired, 1e-5)


def _planned_step_bytes(convolution, layers, size=32, channels=32):
    """XLA's planned temporaries for ``_compiled_step``."""
    return _compiled_step(convolution, layers, size, channels).memory_analysis().temp_size_in_bytes


def _compiled_step(convolution, layers, size, channels):
    """A training step (gradient, then SGD on the donated kernels, as training updates its
    parameters in place) of a chain of convolutions, compiled."""
    x = jnp.ones((2, size, size, channels))

    def loss(kernels):
        h = x
        for kernel in kernels:
            h = jnp.tanh(convolution(h, kernel))
        return jnp.sum(h)

    def step(kernels):
        return [kernel - 0.1 * gradient for kernel, gradient in zip(kernels, jax.grad(loss)(kernels))]

    kernels = [jnp.full((3, 3, channels, channels), 0.01)] * layers
    return jax.jit(step, donate_argnums=0).lower(kernels).compile()


def test_winograd_tiles_do_not_outlive_their_layer_s_backward_step():
    """Each layer's transformed input tiles (4x its input) are built in its backward step, not in
    the forward pass: six more layers cost no more memory than with the direct convolution."""

    def growth(convolution):
        return _planned_step_bytes(convolution, 12) - _planned_step_bytes(convolution, 6)

    assert growth(conv3x3_cpu_gradients) <= growth(direct_conv3x3)


@pytest.mark.parametrize("size", [8, 32])
def test_turned_kernels_are_built_in_their_layer_s_backward_step(size):
    """At 8 x 8 (XLA's input gradient) and 32 x 32 (Winograd's), 128 channels, a layer's kernel
    (590 kB) outweighs its activations (66 kB at 8 x 8); turned at the start of the step, every
    layer's turned kernel lived through the forward pass. Planned growth for six more layers,
    XLA's gradient / ours / ours with the kernel turned early: 4.3 / 0.4 / 3.9 MB at 8 x 8 and
    16.1 / 6.3 / 20.4 MB at 32 x 32."""

    def growth(convolution):
        return _planned_step_bytes(convolution, 12, size, 128) - _planned_step_bytes(convolution, 6, size, 128)

    assert growth(conv3x3_cpu_gradients) < growth(direct_conv3x3) / 2


def test_donated_kernels_are_updated_in_place():
    """Each kernel's gradient, and so its update, follows its input gradient, the last read of
    the kernel: XLA then writes the update into the donated kernel instead of copying every
    kernel at the start of the step (0.26 GB of copies per full-width Taiwan training step)."""
    text = _compiled_step(conv3x3_cpu_gradients, 3, 32, 16).as_text()
    entry = text[text.index("ENTRY") :]
    arguments = set(re.findall(r"%(\S+) = \S+ parameter\(", entry))
    copied = [name for name in re.findall(r" copy\(%(\S+?)\)", entry) if name in arguments]
    assert len(arguments) == 3 and not copied


def _uses_cpu_gradients(module, params, x):
    # Under differentiation the custom rule is inlined; the primal program still names it.
    return "custom_vjp_call" in str(jax.make_jaxpr(module.apply)(params, x))


@pytest.mark.parametrize(
    "hw, channels, dtype",
    [
        ((32, 32), (128, 128), jnp.float32),  # Winograd's kernel and input gradients
        ((16, 64), (128, 256), jnp.float32),
        ((32, 36), (12, 4), jnp.float32),  # Winograd's kernel gradient, XLA's input gradient
        ((16, 16), (128, 128), jnp.float32),  # below MIN_WINOGRAD_PIXELS: XLA's gradients
        ((32, 34), (128, 128), jnp.float32),  # width not a multiple of 4: XLA's gradients
        ((32, 32), (128, 128), jnp.bfloat16),  # XLA's convolution and autodiff
    ],
)
def test_conv3x3_module_is_nn_conv_with_cpu_gradients_in_float32(hw, channels, dtype):
    """Same tree, initialisation and forward values as nn.Conv((3, 3), padding=1); in float32 its
    gradients come from ``conv3x3_cpu_gradients`` and equal nn.Conv's."""
    x = jax.random.normal(jax.random.key(0), (1, *hw, channels[0]))
    init = scaled_xavier_uniform(0.7)
    module = Conv3x3(channels[1], kernel_init=init, dtype=dtype)
    reference = nn.Conv(channels[1], (3, 3), padding=1, kernel_init=init, dtype=dtype)
    params = module.init(jax.random.key(1), x)
    expected = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, expected)
    np.testing.assert_array_equal(params["params"]["kernel"], expected["params"]["kernel"])
    params = redraw_params(params, jax.random.key(2))  # a non-zero bias too
    out = module.apply(params, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, reference.apply(params, x))
    assert _uses_cpu_gradients(module, params, x) == (dtype == jnp.float32)

    def loss(m):
        return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))

    grads = jax.grad(loss(module), argnums=(0, 1))(params, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5 if dtype == jnp.float32 else 0.0), grads, want)


def _normalised_silu_dropped(x, scale, bias, seed):
    """An activation as UNetBlock's conv1 takes it: SiLU of a GroupNorm of x, then dropout."""
    gn = GroupNorm(silu=True)
    return dropout(gn.apply({"params": {"scale": scale, "bias": bias}}, x), seed, 0.25)


@pytest.mark.parametrize(
    "hw, channels, dtype",
    [
        ((32, 32), (16, 8), jnp.float32),  # Winograd's kernel gradient
        ((8, 12), (16, 8), jnp.float32),  # XLA's gradients
        ((32, 32), (16, 8), jnp.bfloat16),  # XLA's convolution and autodiff
    ],
)
def test_recomputing_input_keeps_the_composition_s_values_and_gradients(hw, channels, dtype):
    """Conv3x3 of ``activation(*operands)``: the forward is that of convolving the activation's
    output bit for bit, and the gradients of every operand (an integer seed among them) and of
    the kernel are the composition's, differentiated by XLA."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, *hw, channels[0])) * 2 + 0.3
    scale = 1 + 0.2 * jax.random.normal(keys[1], (channels[0],))
    bias = 0.1 * jax.random.normal(keys[2], (channels[0],))
    seed = jnp.array([7, 11], jnp.uint32)
    module = Conv3x3(channels[1], kernel_init=scaled_xavier_uniform(0.7), dtype=dtype)
    params = redraw_params(module.init(keys[3], _normalised_silu_dropped(x, scale, bias, seed)), keys[3])

    def loss(recompute):
        def of(p, x, scale, bias):
            operands = (x, scale, bias, seed)
            if recompute:
                out = module.apply(p, operands, activation=_normalised_silu_dropped)
            else:
                out = module.apply(p, _normalised_silu_dropped(*operands))
            return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

        return of

    (_, out), grads = jax.value_and_grad(loss(True), argnums=(0, 1, 2, 3), has_aux=True)(params, x, scale, bias)
    (_, want), want_grads = jax.value_and_grad(loss(False), argnums=(0, 1, 2, 3), has_aux=True)(params, x, scale, bias)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5 if dtype == jnp.float32 else 1e-2), grads, want_grads)


def test_unet_block_keeps_two_activations_for_its_backward_pass():
    """A residual block with dropout keeps norm0's centred input and norm1's input for its
    backward pass, each convolution recomputing its input from them (``Conv3x3``'s
    ``activation``): two activations where keeping the convolutions' inputs and the SiLU's
    sigmoid took five."""
    x, emb, seed = jnp.ones((2, 32, 32, 64)), jnp.ones((2, 64)), jnp.array([1, 2], jnp.uint32)
    block = UNetBlock(64, dropout=0.1)

    def planned_bytes(blocks):
        def loss(params):
            h = x
            for p in params:
                h = block.apply(p, h, emb, seed)
            return jnp.sum(h)

        params = [block.init(jax.random.key(0), x, emb, seed)] * blocks
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    assert (planned_bytes(8) - planned_bytes(4)) / 4 <= 2.01 * x.size * 4
