"""Regression and residual EDM losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.diffusion import edm_loss_weight, regression_loss, residual_loss


def test_regression_loss_is_per_pixel_squared_error():
    pred = jnp.array([[[[1.0, 2.0]]]])
    target = jnp.array([[[[0.0, 4.0]]]])
    np.testing.assert_array_equal(regression_loss(pred, target), [[[[1.0, 4.0]]]])


def test_edm_weight_makes_the_trivial_denoiser_loss_unit():
    """D = c_skip x with F = 0 gives loss weight * c_out^2 * F_target^2; lambda = 1 / c_out^2."""
    sigma, sd = jnp.array([0.01, 0.5, 3.0, 80.0]), 0.5
    c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
    np.testing.assert_allclose(edm_loss_weight(sigma, sd) * c_out**2, 1.0, rtol=1e-6)


def _setup(batch=512):
    k1, k2 = jax.random.split(jax.random.key(0))
    target = jax.random.normal(k1, (batch, 4, 4, 2))
    mean = 0.3 * jax.random.normal(k2, (batch, 4, 4, 2))
    return target, mean


def test_residual_loss_targets_the_residual():
    target, mean = _setup(8)

    def oracle(x, sigma):
        return target - mean  # a denoiser that knows the residual exactly

    loss = residual_loss(oracle, jax.random.key(1), target, mean)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)


def test_noise_levels_are_log_normal_with_p_mean_p_std():
    target, mean = _setup(4096)
    seen = {}

    def identity(x, sigma):
        seen["sigma"] = sigma
        return x

    loss = residual_loss(identity, jax.random.key(2), target, mean, p_mean=-0.4, p_std=0.9)
    log_sigma = np.log(np.asarray(seen["sigma"]))
    assert log_sigma.mean() == pytest.approx(-0.4, abs=0.05)
    assert log_sigma.std() == pytest.approx(0.9, rel=0.05)
    # identity denoiser: error = sigma * eps, so loss / (weight sigma^2) ~ chi^2_1 with mean 1.
    scale = edm_loss_weight(seen["sigma"], 0.5) * seen["sigma"] ** 2
    assert float(jnp.mean(loss / scale[:, None, None, None])) == pytest.approx(1.0, rel=0.03)


def test_no_gradient_flows_into_the_regression_mean():
    target, mean = _setup(4)

    def denoiser(x, sigma):
        return 0.5 * x

    grad = jax.grad(lambda m: residual_loss(denoiser, jax.random.key(3), target, m).mean())(mean)
    np.testing.assert_array_equal(grad, 0.0)
