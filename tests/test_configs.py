"""Each shipped config trains on its data: HRRR (real, multi-variable) and Taiwan (CWB schema)."""

import os
import sys

import numpy as np
import pandas as pd

from jax_corrdiff.config import shrink_to_smoke
from jax_corrdiff.data import write_cwb_zarr
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.training.loop import train_and_evaluate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import hrrr_idaho  # noqa: E402
import taiwan  # noqa: E402


def _shrink(config, steps=2):
    shrink_to_smoke(config, steps, eval_batches=1)
    config.stage = "regression"
    return config


def test_hrrr_idaho_trains_three_variables_with_static_fields(tmp_path):
    config = _shrink(hrrr_idaho.get_config("smoke"))
    config.regression.model.global_residual = True
    model_dir = train_and_evaluate(config, str(tmp_path))["regression"]
    saved = load_model(model_dir)
    model, layout = saved.config, saved.conditioning
    assert model["img_resolution"] == [78, 41]
    assert model["global_residual"] == [[0, 0], [1, 1], [2, 2]]
    assert layout.target_channels == ("t2m", "u10", "v10")
    assert layout.img_lr_channels == ("t2m", "u10", "v10", "orog", "lsm")


def test_taiwan_config_reads_the_cwb_zarr_schema(tmp_path):
    store = write_cwb_zarr(
        str(tmp_path / "cwb.zarr"), times=pd.date_range("2020-12-31T18", periods=12, freq="h"), height=32, width=32
    )
    config = _shrink(taiwan.get_config())
    config.data.target_paths = [store]
    config.data.train_period = ["2020-12-31T18", "2020-12-31T23"]
    model_dir = train_and_evaluate(config, str(tmp_path / "run"))["regression"]
    saved = load_model(model_dir)
    model, variables = saved.config, saved.variables
    assert model["out_channels"] == 4 and model["cond_channels"] == 12
    assert model["unet"]["channel_mult"] == [1, 2, 2, 2, 2] and model["unet"]["dropout"] == 0.13
    assert model["compute_dtype"] == "bfloat16"  # the GPU configs' default, saved with the model
    assert np.all(np.isfinite(variables["params"]["unet"]["out_conv"]["kernel"]))
