"""CorrDiff training losses, per pixel (B, H, W, C); the training step reduces them.

The reference sums per-pixel losses and divides by the per-GPU batch, so its loss scale
grows with the image size; reducing with a mean instead only rescales the gradient,
which Adam is invariant to up to its epsilon.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# denoise(x_noisy, sigma) -> x0_hat: the EDM-preconditioned network D with its conditioning
# (assembled as the stage's ConditioningLayout says) closed over, as the samplers take it.
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def regression_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Stage 1: squared error of the conditional-mean prediction."""
    return jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))


def edm_loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2: unit loss variance at every sigma (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def residual_loss(
    denoise: Denoiser,
    key: jax.Array,
    target: jax.Array,
    regression_mean: jax.Array,
    *,
    p_mean: float = 0.0,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
) -> jax.Array:
    """Stage 2: EDM denoising loss on the residual r = y - mu(img_lr) (CorrDiff eq. 5).

    ln sigma ~ N(p_mean, p_std^2) per sample (CorrDiff uses p_mean = 0, not EDM's -1.2, as
    residuals are small); x_noisy = r + sigma eps; loss = lambda(sigma) (D(x_noisy) - r)^2.
    The regression mean is frozen: no gradient flows into stage 1 through the residual (a
    ``denoise`` conditioned on the mean is given a stopped-gradient copy by its caller).
    """
    regression_mean = jax.lax.stop_gradient(regression_mean.astype(jnp.float32))
    residual = target.astype(jnp.float32) - regression_mean
    sigma_key, noise_key = jax.random.split(key)
    batch = residual.shape[0]
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(sigma_key, (batch,)))
    noise = jax.random.normal(noise_key, residual.shape) * sigma[:, None, None, None]
    denoised = denoise(residual + noise, sigma)
    weight = edm_loss_weight(sigma, sigma_data)[:, None, None, None]
    return weight * jnp.square(denoised - residual)
