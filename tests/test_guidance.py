"""Diffusion posterior guidance (diffusion/guidance.py): operators, the wrapper, tiny priors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.data.regrid import block_average, degrade
from jax_corrdiff.diffusion.guidance import (
    GuidanceSchedule,
    Observation,
    area_weighted_operator,
    block_average_operator,
    cell_count_weights,
    cos_lat_weights,
    guided_denoiser,
    unified_operator,
)
from jax_corrdiff.diffusion.samplers import EDMSampler, sample_ensemble
from jax_corrdiff.models import build_model, init_variables

H, W = 33, 49  # the ERA5 UK grid: factor 8 leaves one-cell partial blocks at both edges
SAMPLER = EDMSampler(num_steps=12, sigma_max=80.0, solver="heun")


def test_operators_equal_the_data_layer_coarsening():
    field = np.random.default_rng(0).normal(size=(2, H, W, 3))
    for factor in (3, 8):
        block = block_average_operator(factor, (H, W))
        np.testing.assert_allclose(block(field), block_average(field, factor), atol=1e-5)
        np.testing.assert_allclose(unified_operator(factor, (H, W))(field), degrade(field, factor), atol=1e-5)


def test_area_weighted_operator_on_an_unaligned_grid():
    lat = np.linspace(50.0, 58.0, H)[:, None] * np.ones((1, W))
    lon = np.linspace(-8.0, 4.0, W)[None, :] * np.ones((H, 1))
    # A 1.5 deg grid in 0..360 longitudes, offset from ours; cells half outside are dropped.
    op, (lat_idx, lon_idx) = area_weighted_operator(lat, lon, np.arange(47.3, 62.0, 1.5), np.arange(350.2, 367.0, 1.5))
    assert op.shape == (len(lat_idx), len(lon_idx)) and 0 < op.shape[0] < 10
    np.testing.assert_allclose(op(np.full((H, W, 1), 7.0)), 7.0, rtol=1e-6)  # averages keep constants
    # Along latitude a cell's weight is its area: more weight toward the equator within a cell.
    row = op.rows[len(lat_idx) // 2]
    inside = np.flatnonzero(row > 0)
    assert row[inside[1]] > row[inside[-2]]
    lon_field = np.broadcast_to(lon[..., None], (H, W, 1))
    centres = np.mod(np.arange(350.2, 367.0, 1.5)[lon_idx] + 180.0, 360.0) - 180.0
    # Fully covered cells average to their centre; the last, 78 % inside, to its covered part's.
    np.testing.assert_allclose(np.asarray(op(lon_field))[0, :-1, 0], centres[:-1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(op(lon_field))[0, -1, 0], 0.5 * (2.95 + 4.125), atol=0.01)
    with pytest.raises(ValueError, match="no cell"):
        area_weighted_operator(lat, lon, np.array([0.0, 10.0]), np.array([100.0, 110.0]))


def _gaussian_prior(x, sigma):
    """The exact denoiser of an i.i.d. N(0, 1) prior: E[x0 | x0 + sigma n = x] = x / (1 + sigma^2)."""
    return x / (1.0 + sigma**2)


def _ensemble(denoise, key=1, members=4, sampler=SAMPLER, shape=(H, W, 1)):
    fn = jax.jit(lambda k: sample_ensemble(sampler, denoise, shape, k, jnp.arange(members)))
    return fn(jax.random.key(key))


def _coarse_error(samples, op, y):
    return float(jnp.sqrt(jnp.mean(jnp.square(op(samples) - y))))


# Chung's normalised DPS step has a fixed length, so it ends oscillating about the observation:
# a looser bound than for the likelihood-weighted (sda) step, which shrinks with the residual.
@pytest.mark.parametrize("kind,scale,ratio", [("dps", 1.0, 0.6), ("sda", 1.0, 0.15)])
def test_guided_samples_match_the_observation_at_the_coarse_scale(kind, scale, ratio):
    truth = np.random.default_rng(1).normal(size=(H, W, 1)).astype(np.float32)
    schedule = GuidanceSchedule(kind, scale, sigma_y=0.05, gamma=1.0)
    for factor in (4, 16):
        op = block_average_operator(factor, (H, W))
        y = op(truth)
        obs = Observation(op, y, cell_count_weights(op), (H, W))
        unguided = _coarse_error(_ensemble(_gaussian_prior), op, y)
        guided = _coarse_error(_ensemble(guided_denoiser(_gaussian_prior, obs, schedule)), op, y)
        assert guided < ratio * unguided, (factor, guided, unguided)


def test_vanilla_dps_loses_its_guidance_as_the_factor_grows():
    """Without the lambda_max normalisation the block-average gradient shrinks as 1 / K^2: the
    step is exactly lambda_max times the normalised one, and at K = 16 it barely steers."""
    truth = np.random.default_rng(1).normal(size=(H, W, 1)).astype(np.float32)
    op = block_average_operator(16, (H, W))
    obs = Observation(op, op(truth), cell_count_weights(op), (H, W))
    assert obs.norm == pytest.approx(1 / 16**2, rel=0.05)
    normalized, vanilla = (GuidanceSchedule("sda", 1.0, sigma_y=0.05, normalized=n) for n in (True, False))
    x, sigma = jnp.asarray(np.random.default_rng(5).normal(size=(H, W, 1)) * 3.0, jnp.float32), jnp.float32(3.0)
    guided = [guided_denoiser(_gaussian_prior, obs, s) for s in (normalized, vanilla)]
    steps = [g(x, sigma) - _gaussian_prior(x, sigma) for g in guided]
    np.testing.assert_allclose(steps[1], obs.norm * steps[0], atol=1e-3 * float(jnp.max(jnp.abs(steps[1]))))
    unguided = _coarse_error(_ensemble(_gaussian_prior), op, obs.values)
    errors = [_coarse_error(_ensemble(g), op, obs.values) for g in guided]
    assert errors[0] < 0.15 * unguided and errors[1] > 0.8 * unguided, (errors, unguided)  # 0.035, 0.601 of 0.608


def test_unified_coordinate_guidance_matches_in_unified_space():
    truth = np.random.default_rng(2).normal(size=(H, W, 1)).astype(np.float32)
    lat = np.linspace(50.0, 58.0, H)[:, None] * np.ones((1, W))
    for factor in (8, 16):
        op = unified_operator(factor, (H, W))
        y = op(degrade(truth, factor))  # the interpolated observation, seen in unified coordinates
        obs = Observation(op, y, cos_lat_weights(lat), (H, W))
        schedule = GuidanceSchedule("sda", 1.0, sigma_y=0.05, gamma=1.0)
        unguided = _coarse_error(_ensemble(_gaussian_prior), op, y)
        guided = _coarse_error(_ensemble(guided_denoiser(_gaussian_prior, obs, schedule)), op, y)
        assert guided < 0.5 * unguided, (factor, guided, unguided)


def _tiny_prior(h, w):
    config = dict(
        kind="diffusion",
        img_resolution=[h, w],
        out_channels=1,
        cond_channels=2,
        unet=dict(model_channels=4, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0),
    )
    model, variables = build_model(config), init_variables(config, jax.random.key(0))
    cond = jnp.asarray(np.random.default_rng(3).normal(size=(1, h, w, 2)), jnp.float32)
    return lambda x, sigma: model.apply(variables, x[None], cond, sigma[None])[0]


def test_zero_weight_leaves_the_sampler_output_unchanged_and_guidance_steers_a_network():
    h, w = 16, 24
    denoise, sampler = _tiny_prior(h, w), EDMSampler(num_steps=4, sigma_max=80.0, solver="euler")
    op = block_average_operator(8, (h, w))
    y = op(jnp.asarray(np.random.default_rng(4).normal(size=(h, w, 1)), jnp.float32))
    obs = Observation(op, y, cell_count_weights(op), (h, w))

    def three(key):  # one compilation for the three ensembles
        run = lambda d: sample_ensemble(sampler, d, (h, w, 1), key, jnp.arange(2))  # noqa: E731
        schedule = lambda scale: GuidanceSchedule("sda", scale, sigma_y=0.05)  # noqa: E731
        return tuple(run(d) for d in (denoise, *(guided_denoiser(denoise, obs, schedule(s)) for s in (0.0, 1.0))))

    plain, zero, guided = jax.jit(three)(jax.random.key(1))
    np.testing.assert_allclose(zero, plain, atol=1e-6)
    assert _coarse_error(guided, op, y) < 0.5 * _coarse_error(plain, op, y)


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="guidance schedule"):
        GuidanceSchedule("ddim")
    with pytest.raises(ValueError, match="sigma_y > 0 or gamma > 0"):
        GuidanceSchedule("sda", 1.0, sigma_y=0.0, gamma=0.0)
