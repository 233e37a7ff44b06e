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


def adam(schedule: optax.Schedule, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015, Algorithm 1) with the learning rate ``schedule(step)``, in the
    paper's efficient form (end of its section 2):

        m <- m + (1 - b1) (g - m),    v <- v + (1 - b2) (g^2 - v)
        update = -lr_t sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t))

    which is ``optax.adam``'s -lr_t m_hat / (sqrt(v_hat) + eps) up to rounding, with its state
    (so checkpoints written with ``optax.adam`` resume). XLA:CPU has no horizontal fusion: each
    parameter leaf gets its own kernels for m, v and the update, and XLA copies cheap scalar
    arithmetic into every kernel that uses it. Written as optax writes it, the schedule and both
    bias corrections were recomputed in each of the Taiwan UNet's 660 update kernels. A scalar
    whose last operation is a division or a square root XLA computes once, so the corrections
    and the learning rate fold into two such scalars. Each HLO instruction costs the executable
    about 2.3 kB of heap and its load from the cache a scan per YNNPACK fusion
    (benchmarks/README.md, *A smaller optimizer*).
    """

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        step = jnp.zeros((), jnp.int32)
        return optax.ScaleByAdamState(count=step, mu=zeros, nu=zeros), optax.ScaleByScheduleState(count=step)

    def update(grads, state, params=None):
        del params
        moments, schedule_state = state
        count = moments.count + 1
        t = count.astype(jnp.float32)
        correction2 = 1.0 - b2**t
        neg_step_size = (-schedule(schedule_state.count) * jnp.sqrt(correction2)) / (1.0 - b1**t)
        eps_hat = jnp.sqrt(eps * eps * correction2)
        mu = jax.tree_util.tree_map(lambda m, g: m + (1.0 - b1) * (g - m), moments.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: v + (1.0 - b2) * (jnp.square(g) - v), moments.nu, grads)
        updates = jax.tree_util.tree_map(lambda m, v: neg_step_size * m / (jnp.sqrt(v) + eps_hat), mu, nu)
        next_state = optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
        return updates, (next_state, optax.ScaleByScheduleState(count=schedule_state.count + 1))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: Any, global_batch: int) -> optax.GradientTransformation:
    parts = [zero_nonfinite()]
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(adam(learning_rate(config, global_batch), config.adam_b1, config.adam_b2, config.adam_eps))
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


def ema_update(ema_params: Any, params: Any, beta: jax.Array) -> Any:
    """beta * ema + (1 - beta) * params, written as params + beta (ema - params) so that each
    leaf's kernel uses beta, computed once, rather than 1 - beta copied into it (see ``adam``)."""
    return jax.tree_util.tree_map(lambda e, p: p + beta * (e - p), ema_params, params)
