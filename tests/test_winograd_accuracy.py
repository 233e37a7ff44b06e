"""benchmarks/winograd_accuracy.py: the Cook-Toom construction and the float64 reference gradients."""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import winograd_accuracy  # noqa: E402

from jax_corrdiff.models import conv3x3  # noqa: E402


def test_cook_toom_gives_the_module_s_matrices_and_an_exact_correlation():
    winograd_accuracy.check_module_matrices()
    b_t, g, a_t = winograd_accuracy.cook_toom(winograd_accuracy.MODULE_POINTS)
    rng = np.random.default_rng(0)
    d, kernel = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    windows = np.lib.stride_tricks.sliding_window_view(d, (3, 3))
    np.testing.assert_allclose(
        a_t @ ((g @ kernel @ g.T) * (b_t @ d @ b_t.T)) @ a_t.T, np.einsum("ijkl,kl->ij", windows, kernel), atol=1e-12
    )
    lavin = winograd_accuracy.tile_errors((0, 1, -1, 2, -2), channels=32, trials=20)
    barabasz = winograd_accuracy.tile_errors(winograd_accuracy.MODULE_POINTS, channels=32, trials=20)
    assert 0 < barabasz["median"] < lavin["median"] < 1e-4


def test_float64_gradients_match_xla_s_float32_ones():
    keys = jax.random.split(jax.random.key(0), 3)
    x, kernel = jax.random.normal(keys[0], (2, 8, 12, 5)), jax.random.normal(keys[1], (3, 3, 5, 7))
    cotangent = jax.random.normal(keys[2], (2, 8, 12, 7))
    exact = winograd_accuracy.exact_gradients(x, kernel, cotangent)
    xla = jax.vjp(conv3x3.direct_conv3x3, x, kernel)[1](cotangent)
    for actual, expected in zip(xla, exact, strict=True):
        assert winograd_accuracy.relative_error(actual, expected) < 1e-6
