"""EDM samplers: schedule, accuracy on an analytic denoiser, churn, ensembles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.diffusion import EDMSampler, edm_sigma_steps, sample_ensemble, sample_member

SIGMA_DATA = 0.5

# reference.md section 4: the 18-step schedule PhysicsNeMo uses (4 significant digits).
REFERENCE_18 = [
    800,
    560.7,
    385.6,
    259.6,
    170.7,
    109.3,
    67.86,
    40.70,
    23.45,
    12.88,
    6.694,
    3.251,
    1.453,
    0.5844,
    0.2052,
    0.0599,
    0.0134,
    0.002,
]


def gaussian_denoiser(x, sigma):
    """Exact D(x; sigma) for data ~ N(0, SIGMA_DATA^2): the posterior mean."""
    return x * SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)


def test_schedule_matches_reference():
    steps = edm_sigma_steps(18, 0.002, 800.0, 7.0)
    assert steps.shape == (19,) and steps[-1] == 0.0
    np.testing.assert_allclose(steps[:-1], REFERENCE_18, rtol=2e-3)
    assert steps[0] == pytest.approx(800.0, rel=1e-12) and steps[17] == pytest.approx(0.002, rel=1e-12)


def test_solvers_converge_to_the_probability_flow_ode_at_their_order():
    """For Gaussian data x(sigma) = x(sigma_max) sqrt(sigma^2 + sd^2) / sqrt(sigma_max^2 + sd^2).

    Quadrupling the steps must cut Heun's error about 16x (2nd order) and Euler's about 4x.
    """
    latents = jnp.ones((1, 1, 1, 1))
    exact = 800.0 * SIGMA_DATA / np.sqrt(800.0**2 + SIGMA_DATA**2)

    def error(solver, steps):
        out = EDMSampler(num_steps=steps, solver=solver)(gaussian_denoiser, latents, jax.random.key(0))
        return abs(float(out.ravel()[0]) - exact)

    heun_ratio = error("heun", 50) / error("heun", 200)
    euler_ratio = error("euler", 50) / error("euler", 200)
    dpm_ratio = error("dpmpp_2m", 50) / error("dpmpp_2m", 200)
    assert 10 < heun_ratio < 25, heun_ratio
    assert 3 < euler_ratio < 6, euler_ratio
    assert 10 < dpm_ratio < 25, dpm_ratio  # second order at one evaluation per step
    assert error("heun", 200) < 2e-3
    # Per network evaluation DPM-Solver++(2M) beats Heun: 35 evaluations each.
    assert error("dpmpp_2m", 35) < error("heun", 18)


def test_multistep_solver_refuses_churn():
    with pytest.raises(ValueError, match="churn"):
        EDMSampler(solver="dpmpp_2m", s_churn=1.0)


@pytest.mark.parametrize("solver,steps,evaluations", [("heun", 18, 35), ("euler", 8, 8), ("dpmpp_2m", 12, 12)])
def test_network_evaluation_count(solver, steps, evaluations):
    calls = []

    def counting_denoiser(x, sigma):
        jax.debug.callback(lambda s: calls.append(float(s)), sigma)
        return gaussian_denoiser(x, sigma)

    sampler = EDMSampler(num_steps=steps, solver=solver, sigma_max=80.0)
    jax.block_until_ready(jax.jit(lambda z: sampler(counting_denoiser, z, jax.random.key(0)))(jnp.ones((1, 4, 4, 1))))
    assert len(calls) == evaluations == sampler.network_evaluations
    assert max(calls) == pytest.approx(80.0) and min(calls) == pytest.approx(0.002)


def test_churn_is_stochastic_and_keeps_the_data_distribution():
    latents = jax.random.normal(jax.random.key(0), (1, 128, 128, 1))
    deterministic = EDMSampler(num_steps=64, sigma_max=80.0, s_churn=0.0)
    # gamma = 12.8 / 64 = 0.2 for sigma in [0.05, 50]
    churned = EDMSampler(num_steps=64, sigma_max=80.0, s_churn=12.8, s_min=0.05, s_max=50.0, s_noise=1.0)
    run = lambda s, k: jax.jit(lambda z: s(gaussian_denoiser, z, k))(latents)  # noqa: E731
    np.testing.assert_array_equal(run(deterministic, jax.random.key(1)), run(deterministic, jax.random.key(2)))
    a, b = run(churned, jax.random.key(1)), run(churned, jax.random.key(2))
    assert float(jnp.mean(jnp.abs(a - b))) > 0.1
    assert float(jnp.std(a)) == pytest.approx(SIGMA_DATA, rel=0.04)
    # Churn injects fresh noise, so the output decorrelates from the initial latents.
    ode = run(deterministic, jax.random.key(1))
    corr_ode = np.corrcoef(np.ravel(ode), np.ravel(latents))[0, 1]
    corr_churn = np.corrcoef(np.ravel(a), np.ravel(latents))[0, 1]
    assert corr_ode > 0.999 and corr_churn < 0.9


def test_ensemble_members_are_independent_of_batching():
    sampler = EDMSampler(num_steps=6, s_churn=10.0)
    key = jax.random.key(7)
    shape = (1, 8, 8, 2)
    run = jax.jit(lambda ids, bs: sample_ensemble(sampler, gaussian_denoiser, shape, key, ids, bs), static_argnums=1)
    all_at_once = run(jnp.arange(4), None)
    two_by_two = run(jnp.arange(4), 2)
    np.testing.assert_allclose(all_at_once, two_by_two, rtol=1e-5, atol=2e-5)
    member3 = sample_member(sampler, gaussian_denoiser, shape, jax.random.fold_in(key, 3))
    np.testing.assert_allclose(all_at_once[3], member3, rtol=1e-5, atol=2e-5)
    assert not np.allclose(all_at_once[0], all_at_once[1])


def test_bad_sampler_settings_are_rejected():
    with pytest.raises(ValueError, match="solver"):
        EDMSampler(solver="rk4")
    with pytest.raises(ValueError, match="sigma_min"):
        EDMSampler(sigma_min=1.0, sigma_max=0.5)


def _converted_closed_values(jaxpr, constvars) -> int:
    """Converts, in ``jaxpr``'s own equations, of any of ``constvars`` to bfloat16."""
    constvars = set(constvars)
    return sum(
        eqn.primitive.name == "convert_element_type"
        and eqn.params["new_dtype"] == jnp.bfloat16
        and any(v in constvars for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
        for eqn in jaxpr.eqns
    )


def test_a_bf16_network_in_the_sampling_loop_takes_its_weights_converted_once():
    """The EDM loop's network converts none of its float32 weights to bf16 inside the loop
    (they are converted once, before it) and computes what it computed without the hoisting,
    bit for bit; GroupNorm's parameters, which it uses in float32, stay float32."""
    from jax_corrdiff.diffusion.loop_invariants import with_casts_hoisted
    from jax_corrdiff.models import build_model, init_variables

    cfg = dict(
        kind="diffusion",
        img_resolution=[16, 16],
        out_channels=2,
        cond_channels=3,
        compute_dtype="bfloat16",
        unet=dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
    )
    model = build_model(cfg)
    variables = init_variables(cfg, jax.random.key(0))
    img_lr = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
    x = jax.random.normal(jax.random.key(2), (16, 16, 2))

    def sample(variables, latents):
        def denoise(x, sigma):
            return model.apply(variables, x[None], img_lr, sigma[None])[0]

        plain = denoise(latents, jnp.float32(2.0))
        hoisted = with_casts_hoisted(denoise, latents, jnp.float32(2.0))
        return plain, hoisted(latents, jnp.float32(2.0)), EDMSampler(num_steps=3)(denoise, latents, jax.random.key(3))

    plain, hoisted, _ = jax.jit(sample)(variables, x)
    np.testing.assert_array_equal(np.asarray(hoisted), np.asarray(plain))

    network = jax.make_jaxpr(lambda v: model.apply(v, x[None], img_lr, jnp.ones(1)))(variables).jaxpr
    assert _converted_closed_values(network, network.invars) > 20  # the premise: it converts its weights
    (scan,) = [e for e in jax.make_jaxpr(sample)(variables, x).jaxpr.eqns if e.primitive.name == "scan"]
    body = scan.params["jaxpr"].jaxpr
    loop_constants = body.invars[: scan.params["num_consts"]]
    assert {v.aval.dtype for v in loop_constants} >= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert _converted_closed_values(body, loop_constants) == 0
