"""Adam with CorrDiff's learning-rate schedule, a non-finite-gradient guard and clipping; EMA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(config: Any, global_batch: int) -> optax.Schedule:
    """lr(step) with samples = step * global_batch:

        lr * min(samples / lr_rampup_samples, 1) * lr_decay ** floor(samples / lr_decay_samples)

    The reference multiplies the learning rate in place every step once warm-up is off
    (reference.md section 5), so with lr_rampup = 0 and lr_decay < 1 it collapses; the
    closed form here decays exactly once per lr_decay_samples.
    """

    def schedule(step):
        samples = jnp.asarray(step, jnp.float32) * global_batch
        warmup = jnp.minimum(samples / config.lr_rampup_samples, 1.0) if config.lr_rampup_samples > 0 else 1.0
        decays = jnp.floor(samples / config.lr_decay_samples) if config.lr_decay_samples > 0 else 0.0
        return config.lr * warmup * config.lr_decay**decays

    return schedule


def zero_nonfinite() -> optax.GradientTransformation:
    """Replace NaN/inf gradient entries by 0 before the update (as the reference does), so
    one bad batch cannot poison Adam's moments."""
    return optax.stateless(
        lambda updates, params=None: jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), updates)
    )


def make_optimizer(config: Any, global_batch: int) -> optax.GradientTransformation:
    parts = [zero_nonfinite()]
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adam(learning_rate(config, global_batch), config.adam_b1, config.adam_b2, config.adam_eps))
    return optax.chain(*parts)


def ema_decay(config: Any, step: jax.Array, global_batch: int) -> jax.Array:
    """Per-step EMA decay for a half-life measured in samples (Karras et al. 2022):
    beta = 0.5 ** (batch / half_life), the half-life ramped up as ratio * samples seen so
    early, poor weights are forgotten quickly."""
    samples = (jnp.asarray(step, jnp.float32) + 1.0) * global_batch
    half_life = jnp.asarray(config.ema_halflife_samples, jnp.float32)
    if config.ema_rampup_ratio > 0:
        half_life = jnp.minimum(half_life, samples * config.ema_rampup_ratio)
    return 0.5 ** (global_batch / jnp.maximum(half_life, 1e-8))
