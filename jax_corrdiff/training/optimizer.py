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


# Gradient leaves smaller than this are reduced together, as one concatenated vector: every
# reduction is a kernel of its own, and XLA:CPU spends compile, cache-load and launch time per
# kernel, so the Taiwan UNet's 447 bias, GroupNorm and embedding leaves (118,404 of its 80 M
# parameters) cost more in kernels than in arithmetic (README, *Speed and memory*).
SMALL_LEAF_SIZE = 4096


def _finite_square_sum_and_nonfinite_count(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum(g^2 over finite g), count(non-finite g): one two-operand reduction, one read of g."""
    finite = jnp.isfinite(values)
    return jax.lax.reduce(
        (jnp.where(finite, jnp.square(values), 0.0), (~finite).astype(jnp.int32)),
        (jnp.zeros((), values.dtype), jnp.zeros((), jnp.int32)),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        tuple(range(values.ndim)),
    )


def gradient_statistics(grads: Any) -> tuple[jax.Array, jax.Array]:
    """(global L2 norm of the finite gradient entries, number of non-finite entries).

    The norm is the one of the gradients ``zero_nonfinite`` passes on to Adam."""
    leaves = jax.tree_util.tree_leaves(grads)
    small = [g.ravel() for g in leaves if g.size < SMALL_LEAF_SIZE]
    groups = [g for g in leaves if g.size >= SMALL_LEAF_SIZE] + ([jnp.concatenate(small)] if small else [])
    sums, counts = zip(*(_finite_square_sum_and_nonfinite_count(g) for g in groups))
    return jnp.sqrt(sum(sums)), sum(counts)


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
