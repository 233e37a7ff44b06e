"""3 x 3 convolutions whose gradients run through Winograd's F(2x2, 3x3) on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import redraw_params

from jax_corrdiff.models.conv3x3 import (
    MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS,
    MIN_WINOGRAD_PIXELS,
    conv3x3_winograd_gradients,
    direct_conv3x3,
)
from jax_corrdiff.models.layers import Conv3x3, scaled_xavier_uniform


def assert_close(actual, desired, tolerance):
    """Largest error relative to the largest value (a convolution's errors scale with its sums)."""
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    assert np.abs(actual - desired).max() <= tolerance * np.abs(desired).max()


@pytest.mark.parametrize(
    "shape, out_channels",
    [
        ((2, 6, 10, 5), 7),
        ((1, 2, 2, 3), 7),
        ((2, 6, 10, MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS), MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS),
        ((1, 2, 2, MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS), MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS),
    ],
)
def test_winograd_gradients_equal_the_direct_convolution_s_borders_included(shape, out_channels):
    """Kernel gradients through Winograd, and from MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS on the
    input gradients too."""
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], out_channels))
    cotangent = jax.random.normal(jax.random.key(2), (*shape[:3], out_channels))
    out, vjp = jax.vjp(conv3x3_winograd_gradients, x, kernel)
    want, want_vjp = jax.vjp(direct_conv3x3, x, kernel)
    np.testing.assert_array_equal(out, want)
    for actual, desired in zip(vjp(cotangent), want_vjp(cotangent)):
        assert_close(actual, desired, 5e-6)


def _planned_backward_bytes(convolution, layers):
    """XLA's planned temporaries for the gradient of a chain of convolutions (32 x 32, 32 channels)."""
    x = jnp.ones((2, 32, 32, 32))

    def loss(kernels):
        h = x
        for kernel in kernels:
            h = jnp.tanh(convolution(h, kernel))
        return jnp.sum(h)

    kernels = [jnp.full((3, 3, 32, 32), 0.01)] * layers
    return jax.jit(jax.grad(loss)).lower(kernels).compile().memory_analysis().temp_size_in_bytes


def test_winograd_tiles_do_not_outlive_their_layer_s_backward_step():
    """Each layer's transformed input tiles (4x its input) are built in its backward step, not in
    the forward pass: six more layers cost no more memory than with the direct convolution."""

    def growth(convolution):
        return _planned_backward_bytes(convolution, 12) - _planned_backward_bytes(convolution, 6)

    assert growth(conv3x3_winograd_gradients) <= growth(direct_conv3x3)


def _uses_winograd_gradients(module, params, x):
    # Under differentiation the custom rule is inlined; the primal program still names it.
    return "custom_vjp_call" in str(jax.make_jaxpr(module.apply)(params, x))


@pytest.mark.parametrize(
    "hw, channels, dtype, winograd",
    [
        ((32, 32), (128, 128), jnp.float32, True),
        ((16, 64), (128, 256), jnp.float32, True),
        ((16, 16), (128, 128), jnp.float32, False),  # below MIN_WINOGRAD_PIXELS
        ((32, 34), (12, 4), jnp.float32, True),
        ((32, 33), (128, 128), jnp.float32, False),  # odd width: no whole 2 x 2 tiles
        ((32, 32), (128, 128), jnp.bfloat16, False),
    ],
)
def test_conv3x3_module_is_nn_conv_with_winograd_gradients_where_they_apply(hw, channels, dtype, winograd):
    """Same tree, initialisation and forward values as nn.Conv((3, 3), padding=1); the gradients
    through Winograd's form for float32 images of even size, at least MIN_WINOGRAD_PIXELS pixels
    (the input gradient from MIN_WINOGRAD_INPUT_GRADIENT_CHANNELS channels)."""
    assert (hw[0] * hw[1] >= MIN_WINOGRAD_PIXELS and hw[0] % 2 == hw[1] % 2 == 0 and dtype == jnp.float32) == winograd
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
    assert _uses_winograd_gradients(module, params, x) == winograd

    def loss(m):
        return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))

    grads = jax.grad(loss(module), argnums=(0, 1))(params, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5 if dtype == jnp.float32 else 0.0), grads, want)
