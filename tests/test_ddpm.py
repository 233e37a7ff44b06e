"""DDPM: schedules, forward-process statistics, the simple loss, DDIM vs ancestral sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.diffusion.ddpm import (
    DDIMSampler,
    alpha_bar,
    ancestral_sample,
    beta_schedule,
    ddim_timesteps,
    ddpm_residual_loss,
    q_sample,
)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_decay_to_noise(kind):
    ab = alpha_bar(kind, 1000)
    assert np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1.0
    assert ab[-1] < 1e-4
    assert np.all((beta_schedule(kind, 1000) > 0) & (beta_schedule(kind, 1000) <= 0.999))


def test_cosine_alpha_bar_is_squared_cosine():
    # Nichol & Dhariwal eq. 17 at t/T = 0.5 (index 499 is the end of step 500).
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(alpha_bar("cosine", 1000)[499], f(0.5) / f(0.0), rtol=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_forward_process_statistics(kind):
    ab = jnp.asarray(alpha_bar(kind, 100), jnp.float32)
    x0 = jnp.full((20000, 1), 1.7)
    for t in (0, 30, 99):
        noise = jax.random.normal(jax.random.key(t), x0.shape)
        xt = np.asarray(q_sample(x0, jnp.full((20000,), t), noise, ab))
        np.testing.assert_allclose(xt.mean(), np.sqrt(ab[t]) * 1.7, atol=0.03)
        np.testing.assert_allclose(xt.var(), 1 - ab[t], rtol=0.05, atol=1e-6)


def test_simple_loss_is_zero_for_the_true_noise():
    ab = jnp.asarray(alpha_bar("cosine", 50), jnp.float32)
    target, mean = jnp.full((4, 3, 3, 1), 2.0), jnp.full((4, 3, 3, 1), 0.5)

    def oracle(x, t):  # data is a point mass at r = 1.5: eps = (x_t - sqrt(ab) r) / sqrt(1 - ab)
        a = ab[t.astype(jnp.int32)][:, None, None, None]
        return (x - jnp.sqrt(a) * 1.5) / jnp.sqrt(1 - a)

    loss = ddpm_residual_loss(oracle, jax.random.key(0), target, mean, ab)
    assert loss.shape == target.shape and float(loss.max()) < 1e-6
    wrong = ddpm_residual_loss(lambda x, t: jnp.zeros_like(x), jax.random.key(0), target, mean, ab)
    assert float(wrong.mean()) > 0.5


def test_timesteps():
    np.testing.assert_array_equal(ddim_timesteps(5, 5), [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(ddim_timesteps(3, 101), [67, 33, 0])
    np.testing.assert_array_equal(ddim_timesteps(10, 1000), np.arange(900, -1, -100))
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(num_steps=11, num_timesteps=10)


def _eps_fn(x, t):
    """A nonlinear stand-in network that depends on x and t."""
    return 0.5 * jnp.tanh(x) + 0.01 * t - 0.2


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddim_eta1_full_steps_equals_ancestral(kind):
    latents = jax.random.normal(jax.random.key(1), (8, 8, 2))
    key = jax.random.key(2)
    ddim = DDIMSampler(num_steps=40, eta=1.0, schedule=kind, num_timesteps=40)(_eps_fn, latents, key)
    ancestral = ancestral_sample(_eps_fn, latents, key, kind, 40)
    assert float(jnp.std(ancestral)) > 0.1
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ancestral), rtol=1e-4, atol=1e-4)
    deterministic = DDIMSampler(num_steps=40, eta=0.0, schedule=kind, num_timesteps=40)(_eps_fn, latents, key)
    assert float(jnp.max(jnp.abs(deterministic - ancestral))) > 0.1


def test_ddim_tolerates_a_small_network_error():
    # Data N(0, 0.6^2) per pixel, whose exact epsilon is linear in x_t, and a network off by
    # 0.1 sin(7 x): an error the size of the trained rain DDPM's (eps MSE ~0.012). Started at
    # t = T - 1, DDIM multiplied it by 1 / sqrt(alpha_bar) ~ 2e4 and returned samples of std ~130;
    # from the leading step t = 900 the samples keep about the data's spread.
    ab = jnp.asarray(alpha_bar("cosine", 1000), jnp.float32)

    def slightly_wrong(x, t):
        a = ab[t.astype(jnp.int32)]
        return jnp.sqrt(1 - a) * x / (a * 0.36 + 1 - a) + 0.1 * jnp.sin(7.0 * x)

    latents = jax.random.normal(jax.random.key(0), (64, 64, 1))
    out = DDIMSampler(num_steps=10)(slightly_wrong, latents, jax.random.key(0))
    assert 0.45 < float(jnp.std(out)) < 0.7


def test_ddim_deterministic_recovers_a_point_mass():
    ab = jnp.asarray(alpha_bar("cosine", 1000), jnp.float32)

    def oracle(x, t):
        a = ab[t.astype(jnp.int32)]
        return (x - jnp.sqrt(a) * 0.8) / jnp.sqrt(1 - a)

    latents = jax.random.normal(jax.random.key(0), (4, 4, 1))
    out = jax.jit(lambda z: DDIMSampler(num_steps=10)(oracle, z, jax.random.key(0)))(latents)
    np.testing.assert_allclose(np.asarray(out), 0.8, atol=1e-3)


def test_x0_clip_bounds_the_prediction():
    # A network wrong by 2 at every step: at the first step, t = 900 of the cosine schedule,
    # 1 / sqrt(alpha_bar) ~ 6.4 puts x0_hat ~ 13 away from the data.
    latents = jax.random.normal(jax.random.key(0), (4, 4, 1))
    wrong = lambda x, t: x + 2.0  # noqa: E731
    free = DDIMSampler(num_steps=10)(wrong, latents, jax.random.key(0))
    clipped = DDIMSampler(num_steps=10, x0_clip=3.0)(wrong, latents, jax.random.key(0))
    assert float(jnp.max(jnp.abs(free))) > 4
    assert float(jnp.max(jnp.abs(clipped))) <= 3.0 + 1e-4
    with pytest.raises(ValueError, match="x0_clip"):
        DDIMSampler(x0_clip=-1.0)
