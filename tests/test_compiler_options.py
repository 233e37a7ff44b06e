"""Programs without weight gradients compile their convolutions outside YNNPACK on CPU
(``jax_corrdiff.compiler_options``) and compute the same values."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.compiler_options import network_evaluation_options
from jax_corrdiff.mesh import make_mesh
from jax_corrdiff.training.steps import make_eval_step

# Large enough that XLA:CPU hands the convolution to YNNPACK by default (it keeps tiny ones).
SHAPE = (2, 32, 32, 32)


def _convolve(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _two_layers(x, kernel):
    return _convolve(jax.nn.silu(_convolve(x, kernel)), kernel)


def _entry_convolutions(compiled) -> int:
    """Convolutions XLA runs as its own instructions; inside a YNNPACK library fusion they
    appear only in the fused computation the entry calls."""
    entry = re.search(r"^ENTRY [^\n]*\{\n(.*?)\n\}", compiled.as_text(), re.S | re.M).group(1)
    return entry.count(" convolution(")


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, SHAPE[-1], SHAPE[-1])) / 17.0, jnp.float32)
    return x, kernel


def test_convolutions_leave_ynnpack_with_the_same_values():
    x, kernel = _inputs()
    default = jax.jit(_two_layers).lower(x, kernel).compile()
    evaluation = jax.jit(_two_layers, compiler_options=network_evaluation_options()).lower(x, kernel).compile()
    assert _entry_convolutions(default) == 0
    assert _entry_convolutions(evaluation) == 2
    np.testing.assert_allclose(evaluation(x, kernel), default(x, kernel), rtol=1e-5, atol=1e-5)


def test_validation_step_compiles_with_the_evaluation_options():
    x, kernel = _inputs()

    # One pixel per sample, not a mean: YNNPACK's reduction fusions take in the convolutions
    # feeding them whatever the options.
    def per_sample_loss(params, constants, batch, rng, frozen, train):
        return _two_layers(batch["img_lr"], params["kernel"])[:, 5, 7, 3]

    step = make_eval_step(per_sample_loss, 0, make_mesh(1))
    batch = {"img_lr": x, "mask": jnp.ones(SHAPE[0])}
    compiled = step.lower({"kernel": kernel}, {}, batch, {}).compile()
    assert _entry_convolutions(compiled) == 2
    total, count = compiled({"kernel": kernel}, {}, batch, {})
    expected = jnp.sum(jax.jit(_two_layers)(x, kernel)[:, 5, 7, 3])
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    assert count == SHAPE[0]


def test_options_keep_every_other_default_library_fusion():
    """The options name XLA's default YNNPACK fusion types less convolutions: with convolutions
    named back, the program compiles exactly as with XLA's defaults (a new default type would
    show here, and need adding)."""
    from jax_corrdiff import compiler_options

    x, kernel = _inputs()
    matrix = x.reshape(-1, SHAPE[-1])

    def program(x, kernel, matrix):
        y = _two_layers(x, kernel)
        return y, jnp.sum(y, axis=(1, 2)), jnp.tanh(matrix @ matrix.T) * 2.0

    with_convolutions = (
        compiler_options._YNN_FUSIONS_WITHOUT_CONVOLUTION + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    )
    options = {"xla_cpu_experimental_ynn_fusion_type": with_convolutions}
    default = jax.jit(program).lower(x, kernel, matrix).compile().as_text()
    named = jax.jit(program, compiler_options=options).lower(x, kernel, matrix).compile().as_text()
    assert default.count('"__ynn_fusion"') >= 3
    assert named.count('"__ynn_fusion"') == default.count('"__ynn_fusion"')
