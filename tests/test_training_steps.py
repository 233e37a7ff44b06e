"""Optimizer schedule, EMA, and the jitted train step (accumulation, sharding, NaN guard)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_corrdiff.config import base_config
from jax_corrdiff.mesh import make_mesh, to_global
from jax_corrdiff.models import build_model, example_inputs
from jax_corrdiff.training.optimizer import (
    SMALL_LEAF_SIZE,
    adam,
    ema_decay,
    ema_update,
    gradient_statistics,
    learning_rate,
    make_optimizer,
)
from jax_corrdiff.training.steps import init_train_state, make_train_step, regression_per_sample_loss

MODEL = dict(
    kind="regression",
    img_resolution=[16, 16],
    out_channels=2,
    cond_channels=3,
    unet=dict(
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        embedding_type="zero",
        position_grid="sinusoidal",
    ),
)


def training_config(**overrides):
    cfg = base_config().regression.training
    cfg.update(dict(lr=1e-3, lr_rampup_samples=64, lr_decay=0.5, lr_decay_samples=128, batch_size=8), **overrides)
    return cfg


def test_learning_rate_warms_up_then_decays_once_per_period():
    schedule = learning_rate(training_config(), global_batch=8)
    lr = np.array([float(schedule(s)) for s in range(40)])
    np.testing.assert_allclose(lr[:8], 1e-3 * np.arange(8) * 8 / 64, rtol=1e-6)
    np.testing.assert_allclose(lr[8:16], 1e-3, rtol=1e-6)  # samples 64..127
    np.testing.assert_allclose(lr[16:32], 5e-4, rtol=1e-6)  # one decay at 128
    np.testing.assert_allclose(lr[32:], 2.5e-4, rtol=1e-6)
    # The reference's bug: with no warm-up the lr was multiplied in place every step.
    no_warmup = learning_rate(training_config(lr_rampup_samples=0), global_batch=8)
    assert float(no_warmup(15)) == pytest.approx(1e-3) and float(no_warmup(16)) == pytest.approx(5e-4)


def test_ema_half_life_in_samples():
    cfg = training_config(ema_halflife_samples=800, ema_rampup_ratio=0.0)
    beta = float(ema_decay(cfg, jnp.asarray(1000), 8))
    assert beta ** (800 / 8) == pytest.approx(0.5, rel=1e-5)
    ramped = training_config(ema_halflife_samples=800, ema_rampup_ratio=0.5)
    assert float(ema_decay(ramped, jnp.asarray(0), 8)) == pytest.approx(0.5 ** (8 / 4), rel=1e-5)


def _adam_pair(cfg):
    """(ours, optax.adam) with the same schedule and constants."""
    constants = (learning_rate(cfg, 8), cfg.adam_b1, cfg.adam_b2, cfg.adam_eps)
    return adam(*constants), optax.adam(*constants)


def _leaves(rng, shapes, scale=1.0):
    return {f"w{i}": (scale * rng.normal(size=shape)).astype(np.float32) for i, shape in enumerate(shapes)}


def _close_to_leaf_scale(actual, expected, rel=1e-5):
    """Equal up to rounding: ``rel`` of the leaf's largest entry (m's entries that nearly cancel
    round differently in m + (1 - b1)(g - m) and b1 m + (1 - b1) g)."""
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * float(np.abs(expected).max()))


def test_adam_follows_optax_adam_and_keeps_its_state():
    ours, reference = _adam_pair(training_config())
    rng = np.random.default_rng(0)
    params = _leaves(rng, [(3, 3, 4, 5), (7,), (2, 6)])
    state, reference_state = ours.init(params), reference.init(params)
    # Same pytree, so checkpoints written with optax.adam restore into it.
    assert jax.tree.structure(state) == jax.tree.structure(reference_state)
    update, reference_update = jax.jit(ours.update), jax.jit(reference.update)
    for _ in range(12):
        # One leaf's gradients near Adam's eps, where the efficient form's eps_hat matters.
        grads = _leaves(rng, [(3, 3, 4, 5), (7,), (2, 6)])
        grads["w2"] *= 1e-8
        updates, state = update(grads, state)
        expected, reference_state = reference_update(grads, reference_state)
        jax.tree.map(_close_to_leaf_scale, updates, expected)
    jax.tree.map(_close_to_leaf_scale, state, reference_state)
    assert float(jnp.abs(updates["w0"]).max()) > 1e-5  # warmed up: a real step, not ~0


def _update_instructions(optimizer, params) -> int:
    """HLO instructions of one compiled optimizer and EMA update of ``params``."""

    def step(params, ema, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, ema_update(ema, params, ema_decay(training_config(), opt_state[0].count, 8)), opt_state

    text = jax.jit(step).lower(params, params, optimizer.init(params), params).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line and line.lstrip().startswith(("%", "ROOT %")))


def test_adam_compiles_to_fewer_instructions_per_leaf_than_optax():
    """XLA:CPU copies the schedule's and the bias corrections' scalar arithmetic into every
    leaf's update kernel; ours computes them once (``adam``'s docstring)."""
    ours, reference = _adam_pair(training_config())
    params = _leaves(np.random.default_rng(0), [(3, 3, 8, 8 + i) for i in range(24)])
    assert _update_instructions(ours, params) < 0.75 * _update_instructions(reference, params)


def _batch(n=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "img_lr": np.array(jax.random.normal(k1, (n, 16, 16, 3))),
        "target": np.array(jax.random.normal(k2, (n, 16, 16, 2))),
    }


def _run(num_devices, steps=3, model_config=MODEL, **overrides):
    cfg = training_config(**overrides)
    mesh = make_mesh(num_devices)
    model = build_model(model_config)
    optimizer = make_optimizer(cfg, 8)
    args, kwargs = example_inputs(model_config)
    state = init_train_state(model, args, kwargs, optimizer, jax.random.key(0), mesh)
    step = make_train_step(regression_per_sample_loss(model), optimizer, cfg, 8, 0, mesh)
    losses = []
    for i in range(steps):
        state, metrics = step(state, to_global(_batch(seed=i), mesh), {})
        losses.append(float(metrics["loss"]))
    return state, losses


def test_four_devices_match_one_device():
    one, losses_one = _run(1)
    four, losses_four = _run(4)
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.params, four.params)
    assert len(four.params["unet"]["enc_l0_conv"]["kernel"].sharding.device_set) == 4
    assert losses_one[-1] < losses_one[0]


def test_bfloat16_compute_trains_like_float32():
    """The GPU configs' bf16 compute keeps float32 parameters and optimizer state, and its
    losses follow the float32 run's step for step (bf16 has an 8-bit mantissa: ~0.4% per op)."""
    fp32_state, fp32 = _run(1, steps=12)
    bf16_state, bf16 = _run(1, steps=12, model_config=dict(MODEL, compute_dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves((bf16_state.params, bf16_state.opt_state))} <= {
        jnp.dtype("float32"),
        jnp.dtype("int32"),
    }
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)
    assert bf16[-1] < 0.95 * bf16[0] and fp32[-1] < 0.95 * fp32[0]  # both learn (random targets: slowly)
    assert not np.allclose(bf16, fp32, rtol=1e-6)  # bf16 really computed in bf16


def test_gradient_accumulation_matches_full_batch():
    full, _ = _run(2)
    accumulated, _ = _run(2, grad_accumulation=4)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), full.params, accumulated.params
    )


def test_nonfinite_gradients_are_zeroed_and_counted():
    cfg = training_config()
    mesh = make_mesh(1)
    model = build_model(MODEL)
    optimizer = make_optimizer(cfg, 8)
    args, kwargs = example_inputs(MODEL)
    state = init_train_state(model, args, kwargs, optimizer, jax.random.key(0), mesh)
    step = make_train_step(regression_per_sample_loss(model), optimizer, cfg, 8, 0, mesh)
    bad = _batch()
    bad["target"][0, 0, 0, 0] = np.nan
    before = jax.device_get(state.params)
    state, metrics = step(state, to_global(bad, mesh), {})
    assert int(metrics["nonfinite_grads"]) > 0
    assert int(state.step) == 1
    # One NaN pixel makes every gradient NaN; zeroed, they leave a fresh Adam's update at 0.
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(state.params))
    state, metrics = step(state, to_global(_batch(seed=1), mesh), {})
    assert int(metrics["nonfinite_grads"]) == 0 and np.isfinite(float(metrics["loss"]))


def test_gradient_statistics_count_and_norm_over_small_and_large_leaves():
    rng = np.random.default_rng(0)
    grads = {
        "bias": rng.normal(size=(7,)).astype(np.float32),
        "scale": rng.normal(size=(SMALL_LEAF_SIZE - 1,)).astype(np.float32),
        "kernel": rng.normal(size=(3, 3, 32, 64)).astype(np.float32),
        "dense": rng.normal(size=(SMALL_LEAF_SIZE,)).astype(np.float32),
    }
    grads["bias"][[1, 4]] = [np.nan, np.inf]
    grads["kernel"][0, 1, 2, :3] = [-np.inf, np.nan, np.nan]
    for tree in (grads, {"kernel": grads["kernel"]}, {"bias": grads["bias"]}):
        values = np.concatenate([g.ravel() for g in tree.values()])
        norm, count = jax.jit(gradient_statistics)(tree)
        assert int(count) == int((~np.isfinite(values)).sum())
        expected = np.sqrt(np.sum(values[np.isfinite(values)].astype(np.float64) ** 2))
        np.testing.assert_allclose(float(norm), expected, rtol=1e-5)
    assert int(jax.jit(gradient_statistics)(grads)[1]) == 5
