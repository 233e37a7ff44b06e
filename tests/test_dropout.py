"""The UNet's counter-based dropout (models/layers.py ``dropout``): the rate, the scaling, masks
independent along every axis and between layers and steps, gradients through the forward's
mask, the same mask however the batch is sharded, and a mask fused into its consumers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_corrdiff.models.layers import dropout, layer_dropout_seed

SHAPE = (2, 64, 64, 32)  # 262,144 elements
STEP_SEED = jnp.array([12345, 678], jnp.uint32)


def kept(rate, layer="enc_l0_block0", seed=STEP_SEED, shape=SHAPE):
    return np.asarray(dropout(jnp.ones(shape), layer_dropout_seed(seed, layer), rate)) != 0


@pytest.mark.parametrize("rate", [0.13, 0.5])
def test_dropout_drops_at_its_rate_and_scales_what_it_keeps(rate):
    y = np.asarray(dropout(jnp.ones(SHAPE), layer_dropout_seed(STEP_SEED, "a"), rate))
    dropped = np.mean(y == 0)
    # Five binomial standard deviations: about 3.3e-3 at 0.13 over 262,144 elements.
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / y.size), dropped
    np.testing.assert_array_equal(np.unique(y), [0.0, np.float32(1.0 / (1.0 - rate))])


def correlation(a, b):
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_dropout_masks_are_uncorrelated_along_every_axis_between_layers_and_steps():
    mask = kept(0.5)
    limit = 5 / np.sqrt(mask.size / 2)
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        assert abs(correlation(mask.take(range(n - 1), axis), mask.take(range(1, n), axis))) < limit, axis
    assert abs(correlation(mask, kept(0.5, layer="enc_l0_block1"))) < limit
    assert abs(correlation(mask, kept(0.5, seed=STEP_SEED + jnp.array([0, 1], jnp.uint32)))) < limit
    assert abs(correlation(mask, kept(0.5, seed=STEP_SEED + jnp.array([1, 0], jnp.uint32)))) < limit


def test_dropout_gradient_goes_through_the_forward_mask():
    x = jax.random.normal(jax.random.key(0), SHAPE)
    weights = jax.random.normal(jax.random.key(1), SHAPE)
    seed = layer_dropout_seed(STEP_SEED, "a")
    scaled_mask = dropout(jnp.ones(SHAPE), seed, 0.3)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(weights * dropout(v, seed, 0.3))))(x)
    np.testing.assert_allclose(grad, weights * scaled_mask, rtol=1e-6)
    np.testing.assert_allclose(dropout(x, seed, 0.3), x * scaled_mask, rtol=1e-6)


def test_dropout_mask_does_not_depend_on_how_the_batch_is_sharded():
    shape = (4, 16, 16, 8)
    x = jax.random.normal(jax.random.key(0), shape)
    seed = layer_dropout_seed(STEP_SEED, "a")
    whole = jax.jit(dropout, static_argnums=2)(x, seed, 0.2)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(dropout, static_argnums=2, out_shardings=batch)(jax.device_put(x, batch), seed, 0.2)
    assert len(sharded.sharding.device_set) == 4
    np.testing.assert_array_equal(sharded, whole)


def test_dropout_rate_zero_is_the_identity_and_rates_outside_0_1_are_refused():
    x = jnp.arange(8.0).reshape(1, 8)
    np.testing.assert_array_equal(dropout(x, STEP_SEED, 0.0), x)
    for rate in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout rate"):
            dropout(x, STEP_SEED, rate)


def test_dropout_mask_is_recomputed_where_it_is_used_not_stored():
    """The mask is a function of each element's index, so XLA fuses it into its consumers in the
    forward and the backward pass: no mask-sized uint32 or boolean array is ever materialised."""
    shape = (2, 32, 32, 16)
    weights = jnp.ones(shape)
    seed = layer_dropout_seed(STEP_SEED, "a")

    def loss(v):
        return jnp.sum(jnp.sin(dropout(jnp.cos(v), seed, 0.2)) * weights)

    hlo = jax.jit(jax.value_and_grad(loss)).lower(jnp.ones(shape)).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    mask_sized = [line for line in entry.splitlines() if re.search(r"= (u32|pred)\[2,32,32,16\]", line)]
    assert "f32[2,32,32,16]" in entry and not mask_sized, mask_sized


def test_dropout_keeps_bfloat16_and_drops_the_same_elements():
    """The GPU configs compute in bfloat16: the output stays bfloat16, with float32's mask."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
    seed = layer_dropout_seed(STEP_SEED, "a")
    low = dropout(x.astype(jnp.bfloat16), seed, 0.13)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low) == 0, np.asarray(dropout(x, seed, 0.13)) == 0)
