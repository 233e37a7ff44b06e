"""Forecast (init time, lead time) inputs, the synthetic China 3 km dataset and configs/china3km.py."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from jax_corrdiff.data import DownscalingSource, ensure_prepared, make_eval_iterator, prepare_dataset
from jax_corrdiff.data.data_config import config_hash, data_config_dict
from jax_corrdiff.data.errors import (
    EmptyTimeRangeError,
    ForecastLayoutError,
    MissingLeadTimeError,
    NoForecastSamplesError,
)
from jax_corrdiff.data.store import PreparedStore
from jax_corrdiff.data.synthetic import CHINA3KM_LEVELS, CHINA3KM_VARIABLES, write_china3km_dataset

FINE_LAT = 30.0 + 0.03 * np.arange(12)
FINE_LON = 110.0 + 0.03 * np.arange(16)
TARGET_TIMES = pd.date_range("2024-01-01T00", "2024-01-02T12", freq="3h")  # 13 valid times
INITS = pd.date_range("2024-01-01T00", periods=4, freq="12h")  # the last (01-02T12) has only lead 0 in range
LEADS = [0, 6, 12]


def _linear(lat, lon, offset):
    return 2.0 * lat[:, None] - 0.5 * lon[None, :] + offset


def write_target(path, times=TARGET_TIMES):
    hours = (times - times[0]) / pd.Timedelta("1h")
    t2m = np.stack([_linear(FINE_LAT, FINE_LON, 1000.0 + h) for h in hours]).astype(np.float32)
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), t2m)}, coords={"time": times, "lat": FINE_LAT, "lon": FINE_LON})
    ds.to_netcdf(path)
    return str(path)


def write_forecast(path, *, init_dim="init_time", lead_dim="lead_time", numeric_leads=False, leads=LEADS):
    """t2m = linear in (lat, lon) + 100 * init index + lead hours, on a 0.25 deg grid (north to south)."""
    lat = np.arange(31.5, 29.49, -0.25)
    lon = np.arange(109.5, 111.01, 0.25)
    values = np.stack([np.stack([_linear(lat, lon, 100.0 * i + h) for h in leads]) for i in range(len(INITS))])
    lead_coord = np.asarray(leads, float) if numeric_leads else pd.to_timedelta(leads, unit="h")
    level = np.array([850.0, 500.0])
    t = np.stack([values, values + 1.0], axis=2)  # (init, lead, level, lat, lon)
    ds = xr.Dataset(
        {
            "t2m": ((init_dim, lead_dim, "lat", "lon"), values.astype(np.float32)),
            "t": ((init_dim, lead_dim, "level", "lat", "lon"), t.astype(np.float32)),
        },
        coords={init_dim: INITS, lead_dim: lead_coord, "lat": lat, "lon": lon, "level": level},
    )
    if numeric_leads:
        ds[lead_dim].attrs["units"] = "hours"
    ds.to_netcdf(path)
    return str(path)


def forecast_config(target, forecast, **overrides):
    cfg = dict(
        format="variables",
        target_paths=[target],
        target_variables=["t2m"],
        input_paths=[forecast],
        input_variables=["t2m", "t@500"],
        coarsen_factor=8,
        static_path="",
        static_variables=[],
        train_period=["2024-01-01T00", "2024-01-01T23"],
        valid_period=["2024-01-02T00", "2024-01-02T23"],
        nan_policy="error",
        nan_fill_value=0.0,
        lead_times=list(LEADS),
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize(
    "layout",
    [
        ("init_time", "lead_time", False),
        ("time", "step", True),
        ("forecast_reference_time", "prediction_timedelta", False),
    ],
)
def test_forecast_samples_labels_valid_times_and_exact_linear_inputs(tmp_path, layout):
    init_dim, lead_dim, numeric = layout
    target = write_target(tmp_path / "target.nc")
    forecast = write_forecast(tmp_path / "fc.nc", init_dim=init_dim, lead_dim=lead_dim, numeric_leads=numeric)
    store_path = prepare_dataset(forecast_config(target, forecast, lead_times=[12, 0]), str(tmp_path / "prep"))
    store = PreparedStore(store_path)
    ds = xr.open_zarr(store_path)
    # Every (init, lead) with init + lead a target time: 4 inits x 2 leads, minus 01-02T12 + 12 h.
    assert len(store.times) == 7
    init = ds["init_time"].values
    lead_h = ds["lead_time"].values
    np.testing.assert_array_equal(ds["valid_time"].values, ds["time"].values)
    np.testing.assert_array_equal(init + (lead_h * 3600e9).astype("timedelta64[ns]"), ds["time"].values)
    assert np.all(np.diff(ds["time"].values) >= np.timedelta64(0))  # sorted by valid time
    # Labels index data.lead_times = [12, 0] (config order, not sorted).
    np.testing.assert_array_equal(store.lead_time_labels, np.where(lead_h == 12, 0, 1))
    assert store.lead_times == (12.0, 0.0)
    target_vals, inputs = store.read(np.arange(len(store.times)))
    for k in range(len(store.times)):
        i = int(np.nonzero(INITS.values == init[k])[0][0])
        expected = _linear(FINE_LAT, FINE_LON, 100.0 * i + lead_h[k])
        np.testing.assert_allclose(inputs[k, ..., 0], expected, atol=2e-3)  # bilinear reproduces linear
        np.testing.assert_allclose(inputs[k, ..., 1], expected + 1.0, atol=2e-3)  # t@500
        hours = (store.times[k] - TARGET_TIMES.values[0]) / np.timedelta64(1, "h")
        np.testing.assert_allclose(target_vals[k, ..., 0], _linear(FINE_LAT, FINE_LON, 1000.0 + hours), atol=2e-3)


def test_forecast_pipeline_yields_lead_time_labels(tmp_path):
    target = write_target(tmp_path / "target.nc")
    forecast = write_forecast(tmp_path / "fc.nc")
    store, normalizer = ensure_prepared(forecast_config(target, forecast), str(tmp_path / "prep"))
    train = DownscalingSource(store, "train", normalizer)
    valid = DownscalingSource(store, "valid", normalizer)
    # Valid time on day 1: inits 00 (leads 0, 6, 12), 12 (lead 0, 6) -> 5 of 10 samples.
    assert len(train) == 5 and len(valid) == 5
    for source in (train, valid):
        for i in range(len(source)):
            sample = source[i]
            assert sample["lead_time_label"].dtype == np.int32
            assert sample["lead_time_label"] == source.lead_time_labels[i]
    assert sorted(int(train[i]["lead_time_label"]) for i in range(5)) == [0, 0, 1, 1, 2]
    batches = list(make_eval_iterator(valid, batch_size=4))
    assert [b["lead_time_label"].dtype for b in batches] == [np.int32, np.int32]
    assert batches[1]["mask"].tolist() == [True, False, False, False]


def test_forecast_errors_are_named(tmp_path):
    target = write_target(tmp_path / "target.nc")
    forecast = write_forecast(tmp_path / "fc.nc")
    with pytest.raises(MissingLeadTimeError, match="18 h"):
        prepare_dataset(forecast_config(target, forecast, lead_times=[0, 18]), str(tmp_path / "a"))
    late = write_target(tmp_path / "late.nc", times=pd.date_range("2025-01-01", periods=4, freq="3h"))
    with pytest.raises(NoForecastSamplesError, match="fc.nc"):
        prepare_dataset(forecast_config(late, forecast), str(tmp_path / "b"))
    with pytest.raises(ForecastLayoutError, match="lead-time dimension"):  # an analysis file as forecast
        prepare_dataset(forecast_config(target, target, input_variables=["t2m"]), str(tmp_path / "c"))
    with pytest.raises(EmptyTimeRangeError):
        prepare_dataset(
            forecast_config(target, forecast, valid_period=["2024-03-01", "2024-03-02"]), str(tmp_path / "d")
        )
    with pytest.raises(ValueError, match="lead_times"):
        data_config_dict(forecast_config(target, forecast, input_paths=[]))
    with pytest.raises(ValueError, match="distinct"):
        data_config_dict(forecast_config(target, forecast, lead_times=[0, 0]))


def test_lead_times_hashed_only_when_set(tmp_path):
    cfg = forecast_config("t.nc", "f.nc")
    no_key = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "lead_times"})
    empty = forecast_config("t.nc", "f.nc", lead_times=[])
    assert config_hash(data_config_dict(no_key)) == config_hash(data_config_dict(empty))
    assert "lead_times" not in data_config_dict(empty)
    assert config_hash(data_config_dict(cfg)) != config_hash(data_config_dict(empty))


def test_china3km_writer_schema(tmp_path):
    paths = write_china3km_dataset(
        str(tmp_path),
        height=10,
        width=14,
        lead_times=[0, 6],
        init_times=pd.date_range("2024-07-01", periods=2, freq="6h"),
    )
    with (
        xr.open_dataset(paths["target"]) as t,
        xr.open_dataset(paths["forecast"]) as f,
        xr.open_dataset(paths["static"]) as s,
    ):
        assert dict(t.sizes) == {"time": 13, "level": 6, "lat": 10, "lon": 14}
        assert t["t"].dims == ("time", "level", "lat", "lon") and t["t2m"].dims == ("time", "lat", "lon")
        assert t["level"].values.tolist() == list(CHINA3KM_LEVELS) and t["level"].attrs["units"] == "hPa"
        np.testing.assert_allclose(np.diff(t["lat"].values), 0.03, atol=1e-6)
        units = {v: t[v].attrs["units"] for v in t.data_vars}
        assert units == {
            "t2m": "K",
            "u10": "m s-1",
            "v10": "m s-1",
            "tp": "mm h-1",
            "t": "K",
            "u": "m s-1",
            "v": "m s-1",
            "q": "kg kg-1",
            "z": "m2 s-2",
        }
        assert float(t["tp"].min()) >= 0 and float(t["q"].min()) >= 0
        assert 250 < float(t["t2m"].mean()) < 320 and 50_000 < float(t["z"].sel(level=500).mean()) < 60_000
        assert f["t"].dims == ("init_time", "lead_time", "level", "lat", "lon")
        assert (f["lead_time"].values / np.timedelta64(1, "h")).tolist() == [0.0, 6.0]
        np.testing.assert_allclose(np.abs(np.diff(f["lat"].values)), 0.25)
        assert f["lat"].min() < t["lat"].min() and f["lat"].max() > t["lat"].max()
        assert f["lon"].min() < t["lon"].min() and f["lon"].max() > t["lon"].max()
        assert set(f.data_vars) == set(t.data_vars)
        assert set(s.data_vars) == {"orog", "lsm"} and s["orog"].shape == (10, 14)
        assert float(s["lsm"].min()) >= 0 and float(s["lsm"].max()) <= 1
    assert len(CHINA3KM_VARIABLES) == 34


def test_make_synthetic_command(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_corrdiff.make_synthetic",
            "--schema=china3km",
            f"--output={tmp_path / 'c'}",
            "--height=8",
            "--width=8",
            "--lead_times=0,12",
            "--init_times=2024-01-01T00,2024-01-01T12",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "forecast:" in run.stdout and "lead_time: 0 h .. 12 h (2)" in run.stdout
    assert sorted(os.listdir(tmp_path / "c")) == ["forecast.nc", "static.nc", "target.nc"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_corrdiff.make_synthetic",
            "--schema=cwb",
            f"--output={tmp_path / 'w'}",
            "--times=2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cwb.zarr" in run.stdout and os.path.isdir(tmp_path / "w" / "cwb.zarr")


def test_china3km_smoke_regression_trains(tmp_path):
    import china3km

    from jax_corrdiff.model_dir import load_model
    from jax_corrdiff.training.loop import train_and_evaluate

    config = china3km.get_config("smoke")
    full = china3km.get_config()
    # Loading the config writes no data: the synthetic dataset is only named, its paths come at preparation.
    assert config.data.synthetic_dataset == "china3km_smoke" and config.data.target_paths == full.data.target_paths
    assert full.data.lead_times == china3km.LEAD_TIMES and full.diffusion.patch.height == 448
    assert full.diffusion.model.unet.num_grid_channels == 100 and full.regression.model.global_residual
    config.stage = "regression"
    config.diffusion.patch.height = config.diffusion.patch.width = 0
    config.regression.training.total_samples = 4 * 2
    model_dir = train_and_evaluate(config, str(tmp_path / "run"))["regression"]
    saved = load_model(model_dir)
    model, variables = saved.config, saved.variables
    n = len(CHINA3KM_VARIABLES)
    assert model["global_residual"] == [[i, i] for i in range(n)]
    assert model["unet"]["lead_time_steps"] == 3 and model["unet"]["lead_time_channels"] == 4
    assert model["cond_channels"] == n + 2 and model["img_resolution"] == [64, 96]
    assert saved.conditioning.target_channels == CHINA3KM_VARIABLES
    assert saved.source["data"]["input_paths"][0].startswith(str(tmp_path / "run" / "prepared"))
    assert np.all(np.isfinite(variables["params"]["unet"]["out_conv"]["kernel"]))


def test_inference_inputs_read_forecasts_by_valid_time(tmp_path):
    from jax_corrdiff.data.inference_inputs import InferenceInputs

    forecast = write_forecast(tmp_path / "fc.nc")
    cfg = forecast_config("unused.nc", forecast)
    lat, lon = np.meshgrid(FINE_LAT, FINE_LON, indexing="ij")
    inputs = InferenceInputs.open(cfg, forecast, coarsen=False, lat=lat, lon=lon, times=["2024-01-01T12"])
    assert len(inputs) == 2 and not inputs.has_truth  # init 00 + 12 h, init 12 + 0 h
    assert inputs.lead_time_labels.tolist() == [0, 2] and inputs.lead_time_labels.dtype == np.int32
    np.testing.assert_array_equal(inputs.init_times, INITS.values[[1, 0]])
    values, truth = inputs.read(0, 2)
    assert truth is None and values.shape == (2, 12, 16, 2)
    np.testing.assert_allclose(values[0, ..., 0], _linear(FINE_LAT, FINE_LON, 100.0), atol=2e-3)
    np.testing.assert_allclose(values[1, ..., 0], _linear(FINE_LAT, FINE_LON, 12.0), atol=2e-3)
    assert len(InferenceInputs.open(cfg, forecast, coarsen=False, lat=lat, lon=lon)) == 12
    with pytest.raises(ValueError, match="forecast"):
        InferenceInputs.open(cfg, forecast, coarsen=True, lat=lat, lon=lon)
