"""The precipitation configs describe valid data (no training: that is the smoke runs' job)."""

import os
import sys

import pytest

from jax_corrdiff.data.data_config import data_config_dict
from jax_corrdiff.models.factory import build_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import rain_hrrr  # noqa: E402
import rain_mrms  # noqa: E402


@pytest.mark.parametrize(
    "module,variant",
    [(rain_mrms, ""), (rain_mrms, "corrdiff_smoke"), (rain_mrms, "greatlakes_corrdiff"), (rain_hrrr, "smoke")],
)
def test_configs_are_valid(module, variant):
    config = module.get_config(variant)
    cfg = data_config_dict(config.data)
    assert cfg["transforms"][cfg["target_variables"][0]]["kind"] == "log1p"
    assert config.diffusion.parameterization == ("edm" if "corrdiff" in variant else "ddpm")
    if module is rain_mrms:
        window = "greatlakes" if "greatlakes" in variant else "southeast"
        assert all(window in path for path in (*cfg["target_paths"], cfg["static_path"]))


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="words: smoke, corrdiff, greatlakes"):
        rain_mrms.get_config("tiny")


def test_ddpm_model_kind_builds():
    model = build_model(
        dict(
            kind="ddpm",
            img_resolution=[16, 16],
            out_channels=1,
            cond_channels=2,
            schedule="linear",
            num_timesteps=10,
            unet=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]),
        )
    )
    assert (model.schedule, model.num_timesteps) == ("linear", 10)
