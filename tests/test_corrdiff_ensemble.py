"""Regression mean + residual ensemble in one jitted call."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from utils import redraw_params

from jax_corrdiff.diffusion import EDMSampler
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.inference.sampling import conditioned_denoisers, corrdiff_ensemble
from jax_corrdiff.models import build_model, init_variables

UNET = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
REG = dict(
    kind="regression",
    img_resolution=[16, 16],
    out_channels=2,
    cond_channels=3,
    unet=dict(UNET, embedding_type="zero", position_grid="sinusoidal"),
)
DIFF = dict(
    kind="diffusion",
    img_resolution=[16, 16],
    out_channels=2,
    cond_channels=5,
    unet=dict(UNET, position_grid="sinusoidal"),
)

# Diffusion conditioning: regression mean (2) + img_lr (3) = DIFF's cond_channels.
LAYOUT = ConditioningLayout(("a", "b"), ("c", "d", "e"), regression_mean=True)


def _generate(img_lr, keys, members, member_batch_size=None):
    reg, diff = build_model(REG), build_model(DIFF)
    reg_vars = redraw_params(init_variables(REG, jax.random.key(0)), jax.random.key(1))
    diff_vars = redraw_params(init_variables(DIFF, jax.random.key(2)), jax.random.key(3))

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def run(img_lr, keys, members, member_batch_size):
        return corrdiff_ensemble(
            lambda x, lt: reg.apply(reg_vars, x),
            conditioned_denoisers(lambda x, cond, sigma, *_: diff.apply(diff_vars, x, cond, sigma), LAYOUT),
            EDMSampler(num_steps=4, sigma_max=80.0, s_churn=2.0),
            img_lr,
            keys,
            num_members=members,
            member_batch_size=member_batch_size,
        )

    return run(img_lr, keys, members, member_batch_size), reg.apply(reg_vars, img_lr)


def test_ensemble_is_mean_plus_residual_and_independent_of_batching():
    img_lr = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
    keys = jax.vmap(lambda t: jax.random.fold_in(jax.random.key(42), t))(jnp.arange(2))
    (mean, samples), direct_mean = _generate(img_lr, keys, 3)
    assert mean.shape == (2, 16, 16, 2) and samples.shape == (2, 3, 16, 16, 2)
    np.testing.assert_allclose(mean, direct_mean, rtol=1e-5, atol=1e-5)
    assert not np.allclose(samples[0, 0], samples[0, 1])
    # Input 1 alone, members one at a time: the same numbers.
    (_, alone), _ = _generate(img_lr[1:], keys[1:], 3, 1)
    np.testing.assert_allclose(alone[0], samples[1], rtol=1e-4, atol=1e-4)
