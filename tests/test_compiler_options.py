"""Compiler options per program (``jax_corrdiff.compiler_options``): on XLA:CPU, programs
without weight gradients, and training steps on one device of an x86 CPU, compile
their convolutions outside YNNPACK and compute the same values; compiled for a GPU from a CPU
host, programs take the GPU's code paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_corrdiff import compiler_options
from jax_corrdiff.compiler_options import network_evaluation_options
from jax_corrdiff.config import base_config
from jax_corrdiff.mesh import make_mesh
from jax_corrdiff.models.conv3x3 import conv3x3
from jax_corrdiff.training.steps import TrainState, make_eval_step, make_train_step

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


def test_named_defaults_compile_as_xla_defaults():
    """``YNNPACK_CONVOLUTIONS`` names XLA's default YNNPACK fusion types, and the evaluation
    options are they less convolutions: named, the program compiles exactly as with XLA's
    defaults (a new default type would show here, and need adding)."""
    x, kernel = _inputs()
    matrix = x.reshape(-1, SHAPE[-1])

    def program(x, kernel, matrix):
        y = _two_layers(x, kernel)
        return y, jnp.sum(y, axis=(1, 2)), jnp.tanh(matrix @ matrix.T) * 2.0

    lowered = jax.jit(program).lower(x, kernel, matrix)
    default = lowered.compile().as_text()
    named = lowered.compile(compiler_options=compiler_options.YNNPACK_CONVOLUTIONS).as_text()
    without = lowered.compile(compiler_options=compiler_options.EIGEN_CONVOLUTIONS).as_text()
    assert default.count('"__ynn_fusion"') >= 3
    assert named.count('"__ynn_fusion"') == default.count('"__ynn_fusion"')
    assert without.count('"__ynn_fusion"') == default.count('"__ynn_fusion"') - 2


@pytest.mark.parametrize(
    "flags, devices, eigen",
    [
        ({"avx2"}, 1, True),  # AVX2 (Zen 3), the step has the cores to itself
        ({"avx2", "avx512f"}, 1, True),  # AVX-512 (Emerald Rapids) too
        ({"avx2"}, 2, False),  # split over devices: one Eigen pool shared by both
        (set(), 1, False),  # not x86 (or no /proc/cpuinfo): XLA's defaults
    ],
)
def test_training_step_convolution_library_follows_the_cpu(monkeypatch, flags, devices, eigen):
    monkeypatch.setattr(compiler_options, "cpu_flags", lambda: frozenset(flags))
    x, kernel = _inputs()
    optimizer = optax.sgd(1e-3)
    params = {"kernel": kernel}
    state = TrainState(jnp.zeros((), jnp.int32), params, params, optimizer.init(params), {})

    def per_sample_loss(params, constants, batch, rng, frozen, train):
        return jnp.mean(jnp.square(_two_layers(batch["img_lr"], params["kernel"])), axis=(1, 2, 3))

    training = base_config()["regression"].training
    step = make_train_step(per_sample_loss, optimizer, training, SHAPE[0], 0, make_mesh(devices))
    compiled = step.lower(state, {"img_lr": x}, {}).compile()
    # Forward, input-gradient and kernel-gradient convolutions: at least 4 outside YNNPACK.
    assert (_entry_convolutions(compiled) >= 4) == eigen
    assert (_entry_convolutions(compiled) == 0) == (not eigen)


def test_compiling_for_a_gpu_takes_its_code_paths_on_a_cpu_host():
    """Ahead-of-time compilation for a GPU on a CPU machine (``benchmarks/gpu_aot_compile.py``)
    traces the GPU's programs: XLA's convolution and its gradients (no CPU Winograd custom
    gradient), cuBLAS matmuls in training steps, XLA's defaults for network evaluations."""
    x, kernel = _inputs()

    def winograd_gradients() -> bool:
        # A new function each time: a function already traced would be taken from JAX's cache.
        return "conv3x3_cpu_gradients" in str(jax.make_jaxpr(lambda x, k: conv3x3(x, k))(x, kernel))

    assert compiler_options.target_platform() == "cpu"
    assert winograd_gradients()
    with compiler_options.compiling_for("gpu"):
        assert compiler_options.target_platform() == "gpu"
        assert not winograd_gradients()
        assert compiler_options.training_step_options(1) == {"xla_gpu_enable_triton_gemm": False}
        assert network_evaluation_options() is None
    assert compiler_options.target_platform() == "cpu"
    assert compiler_options.training_step_options(2) is None  # a split CPU step keeps XLA's defaults
