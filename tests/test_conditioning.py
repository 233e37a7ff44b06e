"""The conditioning layout: channel order, counts, residual pairs, JSON round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.data.calendar import cyclic_time_features
from jax_corrdiff.diffusion.conditioning import ConditioningLayout, PatchSettings

PATCH = PatchSettings(height=8, width=8, num_patches=2, overlap=2, boundary=1)


def _parts(batch=2, size=8):
    k = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(k[0], (batch, size, size, 2)),  # regression mean
        jax.random.normal(k[1], (batch, size, size, 3)),  # img_lr = [coarse input (2) | static (1)]
        jax.random.normal(k[2], (batch, size, size, 3)),  # global context
    )


def test_parts_come_in_one_order():
    mean, img_lr, context = _parts()
    layout = ConditioningLayout(("t2m", "u10"), ("t2m", "u10"), ("orog",), regression_mean=True, patch=PATCH)
    cond = layout.assemble(img_lr, mean, context)
    assert cond.shape[-1] == layout.cond_channels == 2 + 3 + 3
    np.testing.assert_array_equal(cond, jnp.concatenate([mean, img_lr, context], axis=-1))
    assert layout.channels[:3] == ("regression_mean:t2m", "regression_mean:u10", "t2m")
    assert layout.channels[-1] == "global_context:orog"


def test_only_the_parts_a_layout_uses():
    mean, img_lr, context = _parts()
    plain = ConditioningLayout(("t2m",), ("t2m", "u10"), ("orog",))
    np.testing.assert_array_equal(plain.assemble(img_lr, mean, context), img_lr)
    with pytest.raises(ValueError, match="regression mean"):
        ConditioningLayout(("t2m",), ("t2m", "u10"), ("orog",), regression_mean=True).assemble(img_lr)
    with pytest.raises(ValueError, match="global context"):
        ConditioningLayout(("t2m",), ("t2m", "u10"), ("orog",), patch=PATCH).assemble(img_lr, mean)


def test_a_layout_without_coarse_input():
    static_only = ConditioningLayout(("t2m",), (), ("orog", "lsm"))
    assert static_only.img_lr_channels == ("orog", "lsm") and static_only.cond_channels == 2
    assert static_only.residual_pairs() == []


def test_residual_pairs_match_targets_to_inputs_by_name():
    layout = ConditioningLayout(("t2m", "tp", "u10"), ("u10", "t2m"), ("orog",))
    assert layout.residual_pairs() == [[0, 1], [2, 0]]


def test_json_round_trip():
    layout = ConditioningLayout(("t",), ("t", "q"), ("orog",), regression_mean=True, lead_time_steps=3, patch=PATCH)
    d = layout.to_dict()
    assert d["channels"] == list(layout.channels)
    assert ConditioningLayout.from_dict(d) == layout
    assert ConditioningLayout.from_dict(ConditioningLayout(("t",), ("t",)).to_dict()).patch is None


def test_cyclic_time_follows_the_static_fields():
    layout = ConditioningLayout(("t2m",), (), ("orog",), cyclic_time=True)
    assert layout.channels[1:3] == ("time:hour_sin", "time:hour_cos") and layout.cond_channels == 5
    features = cyclic_time_features(np.array(["2019-03-22T06", "2019-01-01T00"], "datetime64[ns]"))
    np.testing.assert_allclose(features[0, :2], [1.0, 0.0], atol=1e-6)  # 06:00: a quarter of the day
    np.testing.assert_allclose(features[1], [0.0, 1.0, 0.0, 1.0], atol=1e-6)  # midnight, 1 January
    cond = layout.assemble(jnp.ones((2, 3, 4, 1)), time_features=jnp.asarray(features))
    np.testing.assert_allclose(cond[1, 2, 3], [1.0, 0.0, 1.0, 0.0, 1.0], atol=1e-6)
    assert ConditioningLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="cyclic time"):
        layout.assemble(jnp.ones((2, 3, 4, 1)))
