"""Preparation: interrupted builds, edited input files, and data configs checked before any work
(coarsening that leaves too little, dates that do not parse, periods that overlap)."""

import os

import ml_collections
import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.data import DataError, demo_data_path, ensure_prepared, prepare_dataset
from jax_corrdiff.data import prepare as prepare_module
from jax_corrdiff.data.data_config import data_config_dict

ERA5 = demo_data_path("era5_t2m_uk_0p25deg.nc")


def small_config(target: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        format="variables",
        target_paths=[target],
        target_variables=["t2m"],
        input_paths=[],
        input_variables=["t2m"],
        coarsen_factor=8,
        static_path="",
        static_variables=[],
        train_period=["2019-03-01T00", "2019-03-01T05"],
        valid_period=["2019-03-01T06", "2019-03-01T07"],
        nan_policy="error",
        nan_fill_value=0.0,
    )
    return ml_collections.ConfigDict({**cfg, **overrides})


@pytest.fixture
def era5_copy(tmp_path) -> str:
    """The first 8 hours of the demo ERA5 file, a file the test may edit."""
    path = str(tmp_path / "era5.nc")
    with xr.open_dataset(ERA5) as ds:
        ds.isel(time=slice(0, 8)).load().to_netcdf(path)
    return path


def test_a_store_killed_early_is_rebuilt(tmp_path, era5_copy):
    # What a SIGKILL in the first moments of preparation used to leave: an empty data.zarr.
    cache = str(tmp_path / "prepared")
    os.makedirs(os.path.join(cache, "data.zarr"))
    store, normalizer = ensure_prepared(small_config(era5_copy), cache)
    assert len(xr.open_zarr(store).time) == 8 and normalizer.target_mean.shape == (1,)


def test_an_interrupted_build_leaves_no_store(tmp_path, era5_copy, monkeypatch):
    cache = str(tmp_path / "prepared")
    write = prepare_module._write_variables

    def write_then_die(cfg, store):
        write(cfg, store)
        raise KeyboardInterrupt  # killed after writing the data, before the store was finished

    monkeypatch.setattr(prepare_module, "_write_variables", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(small_config(era5_copy), cache)
    assert not os.path.exists(os.path.join(cache, "data.zarr"))
    monkeypatch.setattr(prepare_module, "_write_variables", write)
    store, _ = ensure_prepared(small_config(era5_copy), cache)
    assert sorted(os.listdir(cache)) == ["data.zarr", "stats.json"]
    assert xr.open_zarr(store).attrs["complete"]


def test_editing_a_data_file_prepares_again(tmp_path, era5_copy):
    cache = str(tmp_path / "prepared")
    store, before = ensure_prepared(small_config(era5_copy), cache)
    assert ensure_prepared(small_config(era5_copy), cache)[0] == store  # unchanged files: reused
    with xr.open_dataset(era5_copy) as ds:
        edited = ds.load()
    edited["t2m"] = edited["t2m"] + 1.0
    edited.to_netcdf(era5_copy)
    store, after = ensure_prepared(small_config(era5_copy), cache)
    np.testing.assert_allclose(after.target_mean, before.target_mean + 1.0, rtol=1e-6)
    with xr.open_dataset(era5_copy) as ds:
        np.testing.assert_allclose(xr.open_zarr(store)["target"][0, ..., 0], ds["t2m"][0])


def test_coarsen_factor_leaving_one_coarse_cell_is_refused(tmp_path, era5_copy):
    with pytest.raises(DataError, match=r"data\.coarsen_factor=33 leaves 1 x 2 coarse cells on the 33 x 49 grid"):
        prepare_dataset(small_config(era5_copy, coarsen_factor=33), str(tmp_path / "prepared"))


@pytest.mark.parametrize("bad", ["2019-13-01", "yesterday", ""])
def test_unparseable_dates_name_the_key(era5_copy, bad):
    with pytest.raises(ValueError, match=rf"data\.valid_period: '{bad}' is not a date"):
        data_config_dict(small_config(era5_copy, valid_period=["2019-03-01T06", bad]))


def test_overlapping_periods_warn(tmp_path, era5_copy):
    cfg = small_config(era5_copy, valid_period=["2019-03-01T04", "2019-03-01T07"])
    shared = r"2 time step\(s\) \(2019-03-01T04:00:00 \.\. 2019-03-01T05:00:00\) are in both data\.train_period"
    with pytest.warns(UserWarning, match=shared):
        prepare_dataset(cfg, str(tmp_path / "prepared"))


def test_a_fully_unset_period_is_accepted(era5_copy):
    """Models read from Earth2Studio packages carry no data periods: ["", ""] means unset."""
    cfg = data_config_dict(small_config(era5_copy, valid_period=["", ""]))
    assert cfg["valid_period"] == ["", ""]
