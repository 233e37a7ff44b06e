"""python -m jax_corrdiff.generate on the smoke demo: CF output, reproducibility, resume, errors."""

import os
import subprocess
import sys

import netCDF4
import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.data import GridMismatchError, MissingTimesError, MissingVariableError, demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler

ERA5 = demo_data_path("era5_t2m_uk_0p25deg.nc")
PERIOD = ["2019-03-22T00", "2019-03-22T03"]


def _run(workdir, output, *, batch_size=0, num_devices=0, members=3, period=PERIOD, path=ERA5, coarsen=True):
    model = CorrDiffModel.load(workdir)
    inputs = InferenceInputs.open(model.data_config, path, coarsen=coarsen, lat=model.lat, lon=model.lon, period=period)
    sampler = make_sampler("stochastic", steps=4, churn=2.0)
    return generate(
        model, inputs, str(output), sampler, members=members, seed=7, batch_size=batch_size, num_devices=num_devices
    )


def test_command_writes_cf_netcdf_in_physical_units(smoke_workdir, tmp_path):
    out = tmp_path / "out.nc"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_corrdiff.generate",
            f"--workdir={smoke_workdir}",
            f"--input={ERA5}",
            "--coarsen",
            f"--output={out}",
            "--members=2",
            "--times=2019-03-22T00,2019-03-22T01",
            "--sampler=deterministic",
            "--steps=3",
            "--solver=dpmpp_2m",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ds = xr.open_dataset(out)
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert dict(ds.t2m.sizes) == {"time": 2, "ensemble": 2, "y": 33, "x": 49}
    for name in ("t2m", "t2m_regression", "t2m_interpolated", "t2m_truth"):
        assert ds[name].attrs["units"] == "K"
        assert 250 < float(ds[name].mean()) < 300
    assert ds.lat.attrs["standard_name"] == "latitude" and ds.time.values[0] == np.datetime64("2019-03-22T00")
    assert ds.completed.values.tolist() == [1, 1]
    assert "dpmpp_2m" in ds.attrs["sampler"]  # --solver replaces the preset's Euler


def test_a_second_run_loads_its_program_without_tracing_and_writes_the_same(smoke_workdir, tmp_path):
    """The compiled sampling program is kept in the executable cache: a second process loads it."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a cache of its own
    command = [sys.executable, "-m", "jax_corrdiff.generate", f"--workdir={smoke_workdir}", f"--input={ERA5}"]
    command += ["--coarsen", "--members=2", "--times=2019-03-22T00,2019-03-22T01", "--steps=3"]
    command += [f"--compilation_cache={tmp_path / 'cache'}"]
    logs = []
    for name in ("first", "second"):
        result = subprocess.run(
            [*command, f"--output={tmp_path / name}.nc"], env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
    assert "generate compiled in" in logs[0] and "generate loaded from" not in logs[0]
    assert "generate loaded from" in logs[1] and "generate compiled in" not in logs[1]
    first, second = (xr.open_dataset(tmp_path / f"{name}.nc") for name in ("first", "second"))
    np.testing.assert_array_equal(first.t2m.values, second.t2m.values)


def test_same_seed_same_output_whatever_the_batching(smoke_workdir, tmp_path):
    a = xr.open_dataset(_run(smoke_workdir, tmp_path / "a.nc", batch_size=1, num_devices=1))
    b = xr.open_dataset(_run(smoke_workdir, tmp_path / "b.nc", batch_size=4, num_devices=4))
    np.testing.assert_allclose(a.t2m.values, b.t2m.values, atol=1e-3)
    np.testing.assert_allclose(a.t2m_regression.values, b.t2m_regression.values, atol=1e-4)
    members = a.t2m.values
    assert np.abs(members[:, 0] - members[:, 1]).mean() > 1e-3


def test_rerun_skips_finished_times(smoke_workdir, tmp_path):
    out = tmp_path / "resume.nc"
    _run(smoke_workdir, out, batch_size=1, num_devices=1)
    with xr.open_dataset(out) as ds:
        first = ds.load()
    with netCDF4.Dataset(out, "a") as nc:  # as if the run had died before the last time
        nc["completed"][3] = 0
        nc["t2m"][3] = np.float32(np.nan)
        nc["t2m"][0] = np.float32(-1.0)  # a finished time: must not be recomputed
    _run(smoke_workdir, out, batch_size=1, num_devices=1)
    with xr.open_dataset(out) as ds:
        again = ds.load()
    assert again.completed.values.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(again.t2m.values[3], first.t2m.values[3], atol=1e-5)
    assert (again.t2m.values[0] == -1.0).all()


def test_coarse_file_on_its_own_grid_is_interpolated(smoke_workdir, tmp_path):
    lat, lon = np.arange(61.0, 46.9, -1.0), np.arange(-12.0, 4.1, 1.0)
    times = np.array(["2019-03-22T00", "2019-03-22T01"], dtype="datetime64[ns]")
    field = 280 + 0.5 * lat[None, :, None] + 0.1 * lon[None, None, :] + np.zeros((2, 1, 1))
    coarse = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), field.astype(np.float32), {"units": "K"})},
        coords={"time": times, "latitude": lat, "longitude": lon},
    )
    path = str(tmp_path / "coarse.nc")
    coarse.to_netcdf(path)
    ds = xr.open_dataset(_run(smoke_workdir, tmp_path / "a.nc", coarsen=False, path=path, period=None))
    expected = 280 + 0.5 * ds.lat.values + 0.1 * ds.lon.values
    np.testing.assert_allclose(ds.t2m_interpolated.values[0], expected, atol=1e-3)
    assert "t2m_truth" not in ds


def test_bad_inputs_name_the_problem(smoke_workdir, tmp_path):
    model = CorrDiffModel.load(smoke_workdir)
    open_ = lambda path, **kw: InferenceInputs.open(model.data_config, path, lat=model.lat, lon=model.lon, **kw)  # noqa: E731
    renamed = str(tmp_path / "renamed.nc")
    xr.open_dataset(ERA5).rename({"t2m": "tas"}).to_netcdf(renamed)
    with pytest.raises(MissingVariableError, match="t2m"):
        open_(renamed, coarsen=True)
    with pytest.raises(MissingTimesError, match="2030-01-01"):
        open_(ERA5, coarsen=True, times=["2030-01-01T00"])
    small = str(tmp_path / "small.nc")
    xr.open_dataset(ERA5).isel(lat=slice(5, 20), lon=slice(5, 30)).to_netcdf(small)
    with pytest.raises(GridMismatchError, match="small.nc"):
        open_(small, coarsen=False)
    with pytest.raises(GridMismatchError, match="small.nc"):
        open_(small, coarsen=True)


def test_generated_file_scores_against_both_baselines(smoke_workdir, tmp_path):
    from jax_corrdiff.evaluation import score_dataset

    with xr.open_dataset(_run(smoke_workdir, tmp_path / "s.nc", members=2)) as ds:
        scores = score_dataset(ds.load())
    assert scores["ensemble_size"] == 2 and len(scores["times"]) == 4
    models = scores["fields"]["t2m"]["models"]
    assert set(models) == {"corrdiff", "regression", "bilinear"}
    for model in models.values():
        assert 0 < model["aggregate"]["mae"] <= model["aggregate"]["rmse"] < 20


def test_zarr_output_matches_netcdf(smoke_workdir, tmp_path):
    period = ["2019-03-22T00", "2019-03-22T01"]
    nc = xr.open_dataset(_run(smoke_workdir, tmp_path / "a.nc", period=period, batch_size=2, num_devices=2))
    zr = xr.open_zarr(_run(smoke_workdir, tmp_path / "a.zarr", period=period, batch_size=2, num_devices=2))
    assert zr.attrs["Conventions"] == "CF-1.8" and zr.t2m.attrs["units"] == "K"
    assert zr.completed.values.tolist() == [1, 1]
    np.testing.assert_array_equal(nc.time.values, zr.time.values)
    np.testing.assert_allclose(nc.t2m.values, zr.t2m.values, atol=1e-6)
