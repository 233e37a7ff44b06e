"""SongUNet, regression UNet and EDM denoiser: shapes, parameter counts, options."""

import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import redraw_params

from jax_corrdiff import compiler_options
from jax_corrdiff.models import build_model, count_params, example_inputs, init_variables
from jax_corrdiff.models.layers import (
    EmbeddingAffine,
    PointwiseConv,
    UpsampleConv,
    scaled_xavier_uniform,
    upsample2x,
)
from jax_corrdiff.models.normalization import GroupNorm, silu_keeping_input

TAIWAN_UNET = dict(
    model_channels=128,
    channel_mult=[1, 2, 2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[28],
    dropout=0.13,
    position_grid="sinusoidal",
    num_grid_channels=4,
)
TINY_UNET = dict(model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def tiny(kind, hw=(32, 32), **over):
    cfg = dict(kind=kind, img_resolution=list(hw), out_channels=2, cond_channels=3, unet=dict(TINY_UNET))
    unet = over.pop("unet", {})
    cfg["unet"].update(unet)
    cfg.update(over)
    return cfg


def test_taiwan_parameter_counts_match_physicsnemo():
    reg = dict(
        kind="regression",
        img_resolution=[448, 448],
        out_channels=4,
        cond_channels=12,
        unet=dict(TAIWAN_UNET, embedding_type="zero"),
    )
    diff = dict(
        kind="diffusion",
        img_resolution=[448, 448],
        out_channels=4,
        cond_channels=16,
        unet=dict(TAIWAN_UNET, embedding_type="positional"),
    )
    assert count_params(reg) == 79_673_988
    assert count_params(diff) == 80_007_300
    assert count_params(dict(diff, cond_channels=12)) == 80_002_692
    # Patched diffusion: hr mean (4) + input (12) + input resized as global context (12),
    # learnable 100-channel grid at 448 x 448.
    patched = dict(diff, cond_channels=28, unet=dict(diff["unet"], position_grid="learnable", num_grid_channels=100))
    assert count_params(patched) == 100_202_116


@pytest.mark.parametrize("hw", [(33, 49), (32, 32), (17, 40)])
def test_arbitrary_grid_is_padded_and_cropped(hw):
    cfg = tiny("diffusion", hw, unet=dict(position_grid="sinusoidal"))
    variables = init_variables(cfg, jax.random.key(0))
    (x, img_lr, sigma), kw = example_inputs(cfg, batch=2)
    x = jax.random.normal(jax.random.key(1), x.shape)
    out = build_model(cfg).apply(variables, x, img_lr, sigma * 3.0, **kw)
    assert out.shape == (2, *hw, 2)
    assert np.isfinite(np.asarray(out)).all()


def test_grid_must_match_img_resolution():
    cfg = tiny("regression", (32, 32), unet=dict(position_grid="sinusoidal", embedding_type="zero"))
    variables = init_variables(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="differs from img_resolution"):
        build_model(cfg).apply(variables, jnp.zeros((1, 32, 40, 3)))


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown model.unet key"):
        build_model(tiny("regression", unet=dict(model_chanels=8)))
    with pytest.raises(ValueError, match="embedding_type"):
        init_variables(tiny("regression", unet=dict(embedding_type="sinusoid")), jax.random.key(0))


def _zero_output_conv(variables):
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    out_conv = params["unet"]["out_conv"]
    params["unet"]["out_conv"] = jax.tree_util.tree_map(jnp.zeros_like, out_conv)
    return {**variables, "params": params}


def test_global_residual_adds_interpolated_input_to_paired_channels():
    cfg = tiny("regression", global_residual=[[0, 2], [1, 0]], unet=dict(embedding_type="zero"))
    variables = _zero_output_conv(init_variables(cfg, jax.random.key(0)))
    img_lr = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    out = build_model(cfg).apply(variables, img_lr)
    np.testing.assert_allclose(out[..., 0], img_lr[..., 2], atol=1e-6)
    np.testing.assert_allclose(out[..., 1], img_lr[..., 0], atol=1e-6)


def test_edm_preconditioning_with_zero_network_is_c_skip():
    cfg = tiny("diffusion")
    variables = _zero_output_conv(init_variables(cfg, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 2))
    img_lr = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    sigma = jnp.array([0.1, 10.0])
    out = build_model(cfg).apply(variables, x, img_lr, sigma)
    c_skip = 0.25 / (sigma**2 + 0.25)
    np.testing.assert_allclose(out, c_skip[:, None, None, None] * x, rtol=1e-6)


def test_legacy_conditioning_scaling_changes_output_only_through_conditioning():
    cfg = tiny("diffusion")
    variables = redraw_params(init_variables(cfg, jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(3), (1, 32, 32, 2))
    img_lr = jax.random.normal(jax.random.key(4), (1, 32, 32, 3))
    new = build_model(cfg).apply(variables, x, img_lr, jnp.array([2.0]))
    legacy_model = build_model(dict(cfg, legacy_scale_conditioning=True))
    legacy = legacy_model.apply(variables, x, img_lr, jnp.array([2.0]))
    c_in = 1 / np.sqrt(4.0 + 0.25)
    same = legacy_model.apply(variables, x, img_lr / c_in, jnp.array([2.0]))
    assert not np.allclose(new, legacy, atol=1e-4)
    np.testing.assert_allclose(same, new, rtol=2e-4, atol=1e-5)


def test_groupnorm_variance_switch():
    x = jax.random.normal(jax.random.key(5), (2, 3, 3, 8)) * 2 + 1
    gn = GroupNorm(eps=0.0)
    biased = gn.apply(gn.init(jax.random.key(0), x), x)
    gnu = GroupNorm(eps=0.0, unbiased_variance=True)
    unbiased = gnu.apply(gnu.init(jax.random.key(0), x), x)
    g = np.asarray(x).reshape(2, 3, 3, 2, 4)
    ref = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / g.std(axis=(1, 2, 4), ddof=1, keepdims=True)
    np.testing.assert_allclose(unbiased, ref.reshape(x.shape), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(biased, unbiased * np.sqrt(36 / 35), rtol=1e-4, atol=1e-5)


def test_groupnorm_backward_keeps_one_full_size_activation_per_norm():
    """The gradient of a chain of silu_keeping_input(GroupNorm(h)) plans two activations per
    layer: the centred input and the layer's output, the next layer's input. With XLA's
    gradient of silu (its sigmoid kept) it planned three; normalising as (x - mu) * r then
    scaling kept the normalised activation too."""
    x = jnp.ones((2, 32, 32, 64))
    gn = GroupNorm()

    def planned_bytes(layers):
        def loss(params):
            h = x
            for p in params:
                h = silu_keeping_input(gn.apply(p, h))
            return jnp.sum(h)

        params = [gn.init(jax.random.key(0), x)] * layers
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    per_layer = (planned_bytes(12) - planned_bytes(6)) / 6
    assert per_layer <= 2.01 * x.size * 4


def test_groupnorm_silu_and_its_gradient_reduce_full_size_arrays_four_times():
    """On a CPU: two reductions for the statistics (mean, then the centred squares) and two in
    the closed-form backward pass (dy and dy times the centred input, over the pixels); the bias
    gradient sums the per-image sums, where XLA merged it into a third full-size reduction of dy."""
    x = jnp.ones((2, 32, 32, 64))
    norm = GroupNorm(silu=True)
    params = norm.init(jax.random.key(0), x)
    loss = lambda p, x: jnp.sum(jnp.sin(norm.apply(p, x)))  # noqa: E731
    gradient = jax.jit(jax.grad(loss, (0, 1)), compiler_options=compiler_options.training_step_options(1))
    text = gradient.lower(params, x).compile().as_text()
    shapes = dict(re.findall(r"%(\S+) = (f32\[[\d,]*\])", text))
    operands = re.findall(r" reduce\(%([^,]+),", text)
    assert sum(shapes.get(name) == "f32[2,32,32,64]" for name in operands) == 4


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 4e-3)])
def test_silu_keeping_input_equals_silu_with_its_gradient(dtype, tolerance):
    """Forward bit for bit ``jax.nn.silu``; the gradient within ``tolerance`` of its largest
    value of float32's (bfloat16: taken in float32, so no further off than XLA's own)."""
    k = jax.random.split(jax.random.key(4), 2)
    y = (jax.random.normal(k[0], (2, 8, 8, 16)) * 4).astype(dtype)
    cotangent = jax.random.normal(k[1], y.shape).astype(dtype)
    out, vjp = jax.vjp(silu_keeping_input, y)
    want, want_vjp = jax.vjp(jax.nn.silu, y)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    (grad,), (xla_grad,) = vjp(cotangent), want_vjp(cotangent)
    assert grad.dtype == xla_grad.dtype == dtype
    (exact,) = jax.vjp(jax.nn.silu, y.astype(jnp.float32))[1](cotangent.astype(jnp.float32))
    error = np.abs(np.asarray(grad, np.float32) - exact).max()
    assert error <= tolerance * np.abs(exact).max()
    if dtype == jnp.bfloat16:
        assert error <= np.abs(np.asarray(xla_grad, np.float32) - exact).max()


def test_groupnorm_silu_keeps_only_its_input():
    """GroupNorm(silu=True) recomputes its activations from its input in the backward pass: one
    activation per layer planned where XLA's gradient of silu(GroupNorm(h)) plans three."""
    x = jnp.ones((2, 32, 32, 64))
    gn = GroupNorm(silu=True)

    def planned_bytes(layers):
        def loss(params):
            h = x
            for p in params:
                h = gn.apply(p, h)
            return jnp.sum(h)

        params = [gn.init(jax.random.key(0), x)] * layers
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    assert (planned_bytes(12) - planned_bytes(6)) / 6 <= 1.01 * x.size * 4


def textbook_group_norm(params, x, unbiased: bool, eps: float = 1e-6):
    """GroupNorm as written down (statistics over each group's (y, x, channel) view, in
    float32), differentiated by JAX: the reference for GroupNorm's backward passes."""
    b, h, w, c = x.shape
    groups = min(32, c // 4)
    g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    if unbiased:
        n = h * w * c // groups
        var = var * n / (n - 1)
    normalised = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return (normalised * params["params"]["scale"] + params["params"]["bias"]).astype(x.dtype)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize(
    "shape, unbiased, dtype, tolerance",
    [
        ((2, 8, 8, 64), False, jnp.float32, 1e-6),
        ((3, 4, 6, 32), True, jnp.float32, 1e-6),
        ((1, 4, 4, 12), False, jnp.float32, 1e-6),  # 3 groups of 4 channels
        ((2, 8, 8, 64), False, jnp.bfloat16, 2e-2),  # silu taken in float32 before rounding
    ],
)
def test_groupnorm_and_its_silu_equal_the_textbook_forms_with_their_gradients(silu, shape, unbiased, dtype, tolerance):
    """GroupNorm and its closed-form SiLU (``silu_of_normalised``) against JAX's gradient of the
    textbook forms: outputs, and gradients of the input, scale and bias."""
    k = jax.random.split(jax.random.key(3), 4)
    x = (jax.random.normal(k[0], shape) * 2 + 0.5).astype(dtype)
    cotangent = jax.random.normal(k[1], shape).astype(dtype)
    params = {
        "params": {"scale": 1 + 0.3 * jax.random.normal(k[2], shape[-1:]), "bias": jax.random.normal(k[3], shape[-1:])}
    }
    norm = GroupNorm(unbiased_variance=unbiased, silu=silu, dtype=dtype)
    activation = jax.nn.silu if silu else lambda y: y
    out, vjp = jax.vjp(norm.apply, params, x)
    want, want_vjp = jax.vjp(lambda p, x: activation(textbook_group_norm(p, x, unbiased)), params, x)
    assert out.dtype == want.dtype == dtype
    for actual, desired in zip(
        jax.tree_util.tree_leaves((out, vjp(cotangent))), jax.tree_util.tree_leaves((want, want_vjp(cotangent)))
    ):
        assert actual.dtype == desired.dtype
        actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
        assert np.abs(actual - desired).max() <= tolerance * np.abs(desired).max()


@pytest.mark.parametrize("offset", [0.5, 1e3])
@pytest.mark.parametrize("silu", [False, True])
def test_groupnorm_for_a_gpu_takes_one_pass_as_accurate_as_two(offset, silu):
    """Traced for a GPU, GroupNorm takes its statistics from shifted sums in one pass over the
    input; run here, it and its gradients are as close to float64's as the CPU's two passes,
    even for inputs whose mean is 1000 standard deviations from zero (unshifted, one pass
    loses the variance there)."""
    k = jax.random.split(jax.random.key(6), 4)
    x = jax.random.normal(k[0], (2, 8, 8, 64)) * 2 + offset
    cotangent = jax.random.normal(k[1], x.shape)
    params = {"params": {"scale": 1 + 0.3 * jax.random.normal(k[2], (64,)), "bias": jax.random.normal(k[3], (64,))}}
    gn = GroupNorm(silu=silu)

    def exact_norm(p, x):  # 16 groups of 4 channels, in float64
        g = x.reshape(2, 8, 8, 16, 4)
        g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + gn.eps)
        y = g.reshape(x.shape) * p["params"]["scale"] + p["params"]["bias"]
        return jax.nn.silu(y) if silu else y

    def norm_and_gradients(norm, params, x):
        out, vjp = jax.vjp(norm, params, x)
        return [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves((out, vjp(cotangent.astype(x.dtype))))]

    with jax.enable_x64():
        as64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        want = norm_and_gradients(exact_norm, *as64)
    cpu = norm_and_gradients(gn.apply, params, x)
    with compiler_options.compiling_for("gpu"):
        gpu_jaxpr = jax.make_jaxpr(gn.apply)(params, x)
        gpu = norm_and_gradients(gn.apply, params, x)
    assert len(gpu_jaxpr.eqns) != len(jax.make_jaxpr(gn.apply)(params, x).eqns)
    for on_gpu, on_cpu, exact in zip(gpu, cpu, want):
        scale = np.abs(exact).max()
        assert np.abs(on_gpu - exact).max() <= max(1.5 * np.abs(on_cpu - exact).max(), 1e-6 * scale)


@pytest.mark.parametrize(
    "unet",
    [
        dict(embedding_type="fourier"),
        dict(position_grid="learnable", num_grid_channels=6),
        dict(position_grid="sinusoidal", num_grid_channels=8, lead_time_steps=3, lead_time_channels=2),
    ],
)
def test_options_initialise_and_run(unet):
    cfg = tiny("diffusion", unet=unet)
    variables = init_variables(cfg, jax.random.key(0))
    args, kw = example_inputs(cfg, batch=2)
    if "lead_time_label" in kw:
        kw["lead_time_label"] = jnp.array([0, 2])
    out = build_model(cfg).apply(variables, *args, **kw)
    assert out.shape == (2, 32, 32, 2) and np.isfinite(np.asarray(out)).all()
    if unet.get("embedding_type") == "fourier":
        assert "constants" in variables and "map_noise" not in variables["params"]["unet"]


def test_lead_time_label_selects_embedding():
    cfg = tiny("regression", unet=dict(embedding_type="zero", lead_time_steps=3, lead_time_channels=2))
    variables = redraw_params(init_variables(cfg, jax.random.key(0)), jax.random.key(1))
    model = build_model(cfg)
    img_lr = jnp.ones((2, 32, 32, 3))
    a = model.apply(variables, img_lr, lead_time_label=jnp.array([0, 1]))
    b = model.apply(variables, img_lr, lead_time_label=jnp.array([0, 2]))
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert not np.allclose(a[1], b[1], atol=1e-4)
    with pytest.raises(ValueError, match="lead_time_label"):
        model.apply(variables, img_lr)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    cfg = tiny("diffusion")
    variables = init_variables(cfg, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    variables = redraw_params(variables, jax.random.key(9))
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 2))
    img_lr = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    sigma = jnp.array([0.5, 5.0])
    f32 = build_model(cfg).apply(variables, x, img_lr, sigma)
    bf16 = build_model(dict(cfg, compute_dtype="bfloat16")).apply(variables, x, img_lr, sigma)
    assert bf16.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits: about 1% mean deviation after a dozen layers.
    rel = float(jnp.mean(jnp.abs(bf16 - f32)) / jnp.std(f32))
    assert 1e-4 < rel < 0.03, rel


def test_dropout_is_active_only_in_training():
    cfg = tiny("regression", unet=dict(embedding_type="zero", dropout=0.5))
    variables = redraw_params(init_variables(cfg, jax.random.key(0)), jax.random.key(1))
    model = build_model(cfg)
    img_lr = jax.random.normal(jax.random.key(4), (1, 32, 32, 3))
    e1, e2 = model.apply(variables, img_lr), model.apply(variables, img_lr)
    np.testing.assert_array_equal(e1, e2)
    t1 = model.apply(variables, img_lr, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = model.apply(variables, img_lr, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.mean(jnp.abs(t1 - t2))) > 0.01 * float(jnp.std(e1))


@pytest.mark.parametrize("remat", ["full"])  # "dots" takes the same nn.remat path with a policy
def test_rematerialised_blocks_give_the_same_gradients(remat):
    """Remat trades memory for recomputation: gradients (dropout included) must not change,
    and the parameter tree must keep its names so checkpoints and imports still fit."""
    cfg = tiny("diffusion", unet=dict(dropout=0.3))
    variables = redraw_params(init_variables(cfg, jax.random.key(0)), jax.random.key(9))
    remat_variables = init_variables(dict(cfg, unet=dict(cfg["unet"], remat=remat)), jax.random.key(0))
    assert jax.tree_util.tree_structure(remat_variables) == jax.tree_util.tree_structure(variables)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 2))
    img_lr = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    sigma = jnp.array([0.5, 5.0])

    def grads(config):
        model = build_model(config)

        def loss(v):
            out = model.apply(v, x, img_lr, sigma, train=True, rngs={"dropout": jax.random.key(1)})
            return jnp.mean(out**2)

        return jax.grad(loss)(variables)

    plain = grads(cfg)
    remat_grads = grads(dict(cfg, unet=dict(cfg["unet"], remat=remat)))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(plain)) > 0


def initialised_like(module, reference, inputs, reference_inputs=None):
    """``module``'s variables for ``inputs``, checked to have the tree and initial kernel of the
    Flax layer ``reference`` (initialised on ``reference_inputs``, default ``inputs``, with the
    same key), then redrawn so that the bias is non-zero too."""
    params = module.init(jax.random.key(1), inputs)
    expected = reference.init(jax.random.key(1), inputs if reference_inputs is None else reference_inputs)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, expected)
    np.testing.assert_array_equal(params["params"]["kernel"], expected["params"]["kernel"])
    return redraw_params(params, jax.random.key(2))


def test_pointwise_conv_is_a_1x1_conv_with_the_same_parameters():
    """The matmul form of a 1x1 conv has nn.Conv's tree and initialisation, and its output and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 12))
    init = scaled_xavier_uniform(0.7)
    pointwise, reference = PointwiseConv(20, kernel_init=init), nn.Conv(20, (1, 1), kernel_init=init)
    params = initialised_like(pointwise, reference, x)
    np.testing.assert_allclose(pointwise.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    loss = lambda p, x, m: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    grads = [jax.grad(loss, (0, 1))(params, x, m) for m in (pointwise, reference)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)


def test_pointwise_kernel_gradient_reads_the_output_gradient_as_stored():
    """XLA:CPU compiles the kernel gradient as one matmul of the input and the output gradient as
    they lie, without a channel-major copy of the output gradient (the copy JAX's own transpose
    of the einsum led to)."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 24))
    pointwise = PointwiseConv(40, kernel_init=scaled_xavier_uniform())
    params = pointwise.init(jax.random.key(1), x)
    loss = lambda p, x: jnp.sum(jnp.tanh(pointwise.apply(p, x)))  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    kernel_gradients = [line for line in text.split("\n") if re.search(r"= f32\[24,40\]\{1,0\} dot\(", line)]
    assert len(kernel_gradients) == 1
    assert "lhs_contracting_dims={0}, rhs_contracting_dims={0}" in kernel_gradients[0]
    assert not re.search(r"= f32\[40,512\]", text), "the output gradient was copied channel-major"


def test_embedding_affine_is_a_dense_layer_and_its_bias_alone_on_a_zero_embedding():
    """A block's Linear(emb) has nn.Dense's tree, initialisation and output; on the regression
    network's zero embedding it returns the bias without the product, with the same output and
    gradients as the product taken (the weights' exactly zero), and its step has no matmul."""
    emb = jax.random.normal(jax.random.key(0), (3, 16))
    affine, reference = EmbeddingAffine(24), nn.Dense(24, kernel_init=scaled_xavier_uniform(1.0))
    params = initialised_like(affine, reference, emb)
    np.testing.assert_allclose(affine.apply(params, emb), reference.apply(params, emb), rtol=1e-6, atol=1e-6)

    zeros = jnp.zeros_like(emb)
    bias_alone = EmbeddingAffine(24, zero_embedding=True)
    loss = lambda p, m: jnp.sum(jnp.sin(m.apply(p, zeros) * jnp.arange(1, 25)))  # noqa: E731
    np.testing.assert_array_equal(bias_alone.apply(params, zeros), affine.apply(params, zeros))
    grads = [jax.grad(loss)(params, m) for m in (bias_alone, affine)]
    jax.tree.map(np.testing.assert_array_equal, *grads)
    assert not jnp.any(grads[0]["params"]["kernel"]) and jnp.all(grads[0]["params"]["bias"] != 0)
    text = jax.jit(jax.grad(loss), static_argnums=1).lower(params, bias_alone).compile().as_text()
    assert " dot(" not in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upsample_conv_is_a_3x3_conv_of_the_upsampled_input_with_the_same_parameters(dtype):
    """The sub-pixel form has nn.Conv's tree and initialisation, and conv3x3(upsample2x(x))'s output
    and gradients, borders included (an odd, non-square grid)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 12))
    init = scaled_xavier_uniform(0.7)
    upsample_conv = UpsampleConv(20, kernel_init=init, dtype=dtype)
    reference = nn.Conv(20, (3, 3), padding=1, kernel_init=init, dtype=dtype)
    params = initialised_like(upsample_conv, reference, x, upsample2x(x))
    out, want = upsample_conv.apply(params, x), reference.apply(params, upsample2x(x))
    assert out.dtype == want.dtype == dtype
    # Errors relative to the largest value: in bf16 the phase kernels sum up to four taps before
    # rounding, the reference rounds each tap (bf16 keeps 8 significant bits, 4e-3).
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2

    def assert_close(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tolerance * np.abs(b).max()

    assert_close(out, want)

    def loss(module, inputs):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, inputs(x)).astype(jnp.float32)))

    grads = jax.grad(loss(upsample_conv, lambda x: x), argnums=(0, 1))(params, x)
    want = jax.grad(loss(reference, upsample2x), argnums=(0, 1))(params, x)
    jax.tree.map(assert_close, grads, want)


def test_a_huge_bottleneck_attention_is_warned_about(caplog):
    unet = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    config = dict(kind="unet", img_resolution=[256, 256], out_channels=1, cond_channels=1, unet=unet)
    model, (args, _) = build_model(config), example_inputs(config)
    with caplog.at_level(logging.WARNING, logger="jax_corrdiff"):
        jax.eval_shape(model.init, jax.random.key(0), *args)
    assert "attends over 16384 tokens" in caplog.text and "1.00 GiB" in caplog.text
    caplog.clear()
    deeper = dict(config, unet=dict(unet, channel_mult=[1, 2, 2, 2]))  # 32 x 32 tokens
    with caplog.at_level(logging.WARNING, logger="jax_corrdiff"):
        jax.eval_shape(build_model(deeper).init, jax.random.key(0), *example_inputs(deeper)[0])
    assert "tokens" not in caplog.text
