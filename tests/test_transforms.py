"""Per-channel transforms: round trip, bounds, and their place in the Normalizer."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.transforms import ChannelTransform, apply_per_channel, parse_transforms

RAIN = np.array([0.0, 0.05, 0.1, 1.0, 7.3, 152.8])


@pytest.mark.parametrize("kind", ["none", "log1p", "asinh"])
def test_round_trip(kind):
    t = ChannelTransform(kind, scale=0.1, min=0.0)
    np.testing.assert_allclose(t.inverse(t.forward(RAIN)), RAIN, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(t.inverse(t.forward(jnp.asarray(RAIN, jnp.float32)))), RAIN, rtol=1e-5)


def test_values():
    np.testing.assert_allclose(ChannelTransform("log1p", scale=0.1, min=0.0).forward(RAIN[3]), np.log(11.0))
    np.testing.assert_allclose(ChannelTransform("asinh", scale=2.0).forward(4.0), np.arcsinh(2.0))


def test_inverse_is_never_below_the_bound():
    t = ChannelTransform("log1p", scale=0.1, min=0.0, max=300.0)
    y = np.linspace(-20.0, 20.0, 101)  # anything a network can output, far outside the data
    x = t.inverse(y)
    assert x.min() == 0.0 and 300.0 - 1e-9 < x.max() <= 300.0 and np.all(np.diff(x) >= 0)
    assert float(ChannelTransform("asinh", scale=1.0, min=0.0).inverse(jnp.asarray(-3.0))) == 0.0
    assert t.forward(-5.0) == 0.0  # clamped before the transform too
    with np.errstate(over="raise"):
        assert 299.99 < t.inverse(np.float32(1e4)) <= 300.0  # no overflow on the way


def test_bad_specs_are_named():
    with pytest.raises(ValueError, match="kind"):
        parse_transforms({"p": {"kind": "log"}})
    with pytest.raises(ValueError, match="unknown key"):
        parse_transforms({"p": {"kind": "asinh", "eps": 1}})
    with pytest.raises(ValueError, match="min > -scale"):
        parse_transforms({"p": {"kind": "log1p", "scale": 0.1}})


def test_normalizer_transforms_targets_and_inputs_and_survives_json():
    transforms = parse_transforms({"rain": {"kind": "log1p", "scale": 0.1, "min": 0.0}})
    norm = Normalizer(
        ("rain", "t"), [1.0, 280.0], [2.0, 5.0], ("t", "rain"), [280.0, 0.5], [5.0, 1.5], (), [], [], transforms
    )
    x = np.array([[3.0, 290.0]])
    np.testing.assert_allclose(norm.normalize_target(x), [[(np.log(31.0) - 1.0) / 2.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(norm.normalize_inputs(x[:, ::-1]), [[2.0, (np.log(31.0) - 0.5) / 1.5]], rtol=1e-6)
    again = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_allclose(again.denormalize_target(norm.normalize_target(x)), x, rtol=1e-6)
    assert again.transforms == transforms
    out = np.asarray(again.denormalize_target(jnp.full((4, 2), -50.0)))
    assert np.all(out[:, 0] == 0.0) and np.all(out[:, 1] == 30.0)  # rain clamped at 0, t untouched
    plain = np.arange(6.0).reshape(3, 2)
    assert apply_per_channel(plain, ("a", "b"), transforms) is plain
