"""Earth2Studio CorrDiff packages: export a trained workdir, generate from the package."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.diffusion.conditioning import ConditioningLayout, PatchSettings
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.interop.e2s_names import e2s_variable, file_variable
from jax_corrdiff.interop.e2s_package import (
    INVARIANTS,
    OUTPUT_GRID,
    PackageError,
    _refuse_for_package,
    load_package,
    write_package,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = np.array(["2019-03-22T00", "2019-03-22T01"], dtype="datetime64[ns]")


@pytest.fixture(scope="session")
def even_smoke_workdir(built_once_per_run):
    """The demo smoke run on the demo grid cropped to 32 x 48 (PhysicsNeMo's UNet does not pad)."""
    import demo

    from jax_corrdiff.config import set_stages
    from jax_corrdiff.training.loop import train_and_evaluate

    def build(directory):
        crop = dict(lat=slice(0, 32), lon=slice(0, 48))
        for name in ("era5_t2m_uk_0p25deg.nc", "static_era5_uk_0p25deg.nc"):
            with xr.open_dataset(demo_data_path(name)) as ds:
                ds.isel(crop).load().to_netcdf(os.path.join(directory, name))
        config = set_stages(demo.get_config("smoke"), training=dict(total_samples=4 * 12, eval_batches=1))
        config.data.target_paths = [os.path.join(directory, "era5_t2m_uk_0p25deg.nc")]
        config.data.static_path = os.path.join(directory, "static_era5_uk_0p25deg.nc")
        train_and_evaluate(config, os.path.join(directory, "workdir"))

    return os.path.join(built_once_per_run("even_smoke", build), "workdir")


@pytest.fixture(scope="session")
def package(even_smoke_workdir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pkg") / "package")
    with pytest.warns(UserWarning, match="north to south"):
        write_package(even_smoke_workdir, path)
    return path


@pytest.fixture(scope="session")
def coarse_file(tmp_path_factory):
    """t2m on a 1-degree grid around the domain, two times."""
    lat, lon = np.arange(61.0, 46.9, -1.0), np.arange(-12.0, 4.1, 1.0)
    field = 280 + 0.5 * lat[None, :, None] + 0.1 * lon[None, None, :] + np.array([0.0, 2.0])[:, None, None]
    path = str(tmp_path_factory.mktemp("coarse") / "coarse.nc")
    xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), field.astype(np.float32), {"units": "K"})},
        coords={"time": TIMES, "latitude": lat, "longitude": lon},
    ).to_netcdf(path)
    return path


def _generate(model, coarse_file, output, members=2):
    inputs = InferenceInputs.open(model.data_config, coarse_file, coarsen=False, lat=model.lat, lon=model.lon)
    sampler = make_sampler("stochastic", steps=3)
    generate(model, inputs, str(output), sampler, members=members, seed=7, num_devices=1)
    return xr.open_dataset(str(output))


def test_package_layout(package):
    assert sorted(os.listdir(package)) == sorted(
        ["regression.mdlus", "diffusion.mdlus", "metadata.json", "stats.json", OUTPUT_GRID, INVARIANTS]
    )
    with open(os.path.join(package, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["input_variables"] == ["t2m"] and meta["output_variables"] == ["t2m"]
    assert meta["invariant_variables"] == ["orog", "land_frac"] and meta["hr_mean_conditioning"] is True
    assert meta["latlon_res"] == pytest.approx(0.25 * 8)  # Earth2Studio builds its input grid from it
    with open(os.path.join(package, "stats.json")) as f:
        stats = json.load(f)
    assert set(stats) == {"input", "output", "invariants"} and set(stats["invariants"]) == {"orog", "land_frac"}
    with xr.open_dataset(os.path.join(package, OUTPUT_GRID)) as grid:
        assert grid["lat"].shape == (32,) and grid["lon"].shape == (48,)


def test_a_north_to_south_grid_is_exported_with_a_warning(even_smoke_workdir, tmp_path):
    with pytest.warns(UserWarning, match="Earth2Studio 0.19 refuses such a package"):
        write_package(even_smoke_workdir, str(tmp_path / "package"))
    lat = load_package(str(tmp_path / "package"))[0].lat
    assert lat[0, 0] > lat[-1, 0]  # written as trained: our generate --model reads it


def test_package_generates_what_the_workdir_generates(even_smoke_workdir, package, coarse_file, tmp_path):
    model, defaults = load_package(package)
    assert (defaults.sampler, defaults.solver, defaults.steps, defaults.members) == ("stochastic", "heun", 18, 1)
    assert defaults.coarsen_factor == 8
    ours = _generate(CorrDiffModel.load(even_smoke_workdir), coarse_file, tmp_path / "workdir.nc")
    theirs = _generate(model, coarse_file, tmp_path / "package.nc")
    mean, mean_pkg = ours["t2m_regression"].values, theirs["t2m_regression"].values
    assert np.abs(mean_pkg - mean).max() <= 1e-5 * np.abs(mean).max()
    np.testing.assert_allclose(theirs["t2m"].values, ours["t2m"].values, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
    assert np.abs(ours["t2m"].values - mean[:, None]).max() > 1e-3  # the members are samples, not the mean


def test_inference_mode_regression_gives_the_mean_for_every_member(package, coarse_file, tmp_path):
    model, _ = load_package(package)
    ds = _generate(dataclasses.replace(model, inference_mode="regression"), coarse_file, tmp_path / "r.nc")
    np.testing.assert_array_equal(ds["t2m"].values, np.repeat(ds["t2m_regression"].values[:, None], 2, axis=1))


def test_generate_command_takes_a_package(package, coarse_file, tmp_path):
    out = tmp_path / "cli.nc"
    command = [sys.executable, "-m", "jax_corrdiff.generate", f"--model={package}", f"--input={coarse_file}"]
    command += [f"--output={out}", "--steps=2", "--members=2", "--variable_map=t2m=t2m"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with xr.open_dataset(out) as ds:
        assert ds["t2m"].shape[:2] == (2, 2) and np.isfinite(ds["t2m"].values).all()
        assert "steps=2" in ds.attrs["sampler"] or "num_steps=2" in ds.attrs["sampler"]


def test_e2s_names_map_both_ways():
    assert file_variable("z500") == "z@500" and file_variable("u10m") == "u10" and file_variable("tcwv") == "tcwv"
    assert file_variable("z500", {"z500": "geopotential@500"}) == "geopotential@500"
    for name in ("t2m", "u10m", "v100m", "z500", "t850", "tcwv", "custom"):
        assert e2s_variable(file_variable(name)) == name


def _edit_json(path, edit):
    with open(path) as f:
        value = json.load(f)
    edit(value)
    with open(path, "w") as f:
        json.dump(value, f)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _drop_grid_lon(path):
    with xr.open_dataset(path) as ds:
        kept = ds.drop_vars("lon").load()
    kept.to_netcdf(path)


MALFORMED = {
    "no metadata": ("metadata.json", None, os.remove),
    "no input_variables": (
        "metadata.json",
        "input_variables",
        lambda p: _edit_json(p, lambda m: m.pop("input_variables")),
    ),
    "repeated input": (
        "metadata.json",
        "input_variables",
        lambda p: _edit_json(p, lambda m: m.update(input_variables=["t2m", "t2m"])),
    ),
    "bad inference_mode": (
        "metadata.json",
        "inference_mode",
        lambda p: _edit_json(p, lambda m: m.update(inference_mode="fast")),
    ),
    "bad number_of_steps": (
        "metadata.json",
        "number_of_steps",
        lambda p: _edit_json(p, lambda m: m.update(number_of_steps="18")),
    ),
    "diffusion alone on a mean": (
        "metadata.json",
        "inference_mode",
        lambda p: _edit_json(p, lambda m: m.update(inference_mode="diffusion")),
    ),
    "no std": ("stats.json", "input.t2m.std", lambda p: _edit_json(p, lambda s: s["input"]["t2m"].pop("std"))),
    "no invariant stats": (
        "stats.json",
        "invariants.orog.mean",
        lambda p: _edit_json(p, lambda s: s["invariants"].pop("orog")),
    ),
    "not json": ("stats.json", None, lambda p: _write(p, "{")),
    "no lon": (OUTPUT_GRID, "lon", _drop_grid_lon),
    "no invariants": (INVARIANTS, None, os.remove),
    "no diffusion": ("diffusion.mdlus", None, os.remove),
    "swapped networks": (
        "regression.mdlus",
        "args.json __name__",
        lambda p: shutil.copy(p.replace("regression", "diffusion"), p),
    ),
    "extra input": (
        "regression.mdlus",
        "args.json __args__.img_in_channels",
        lambda p: (
            _edit_json(
                os.path.join(os.path.dirname(p), "metadata.json"), lambda m: m.update(input_variables=["t2m", "msl"])
            )
            or _edit_json(
                os.path.join(os.path.dirname(p), "stats.json"),
                lambda s: s["input"].update(msl={"mean": 1e5, "std": 100.0}),
            )
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_package_names_file_and_key(package, tmp_path, case):
    member, key, corrupt = MALFORMED[case]
    broken = str(tmp_path / "pkg")
    shutil.copytree(package, broken)
    corrupt(os.path.join(broken, member))
    with pytest.raises(PackageError) as info:
        load_package(broken)
    assert info.value.path == os.path.join(broken, member) and info.value.key == key, str(info.value)


def test_export_refuses_what_earth2studio_would_run_differently():
    layout = ConditioningLayout(["t2m"], ["t2m"], regression_mean=True)
    diff = types.SimpleNamespace(conditioning=layout, source={"data": {}})
    patched = types.SimpleNamespace(
        conditioning=dataclasses.replace(layout, patch=PatchSettings(16, 16, 2, 4, 2)), source={"data": {}}
    )
    with pytest.raises(ValueError, match="patch-trained"):
        _refuse_for_package("w", diff, patched)
    lead = types.SimpleNamespace(conditioning=dataclasses.replace(layout, lead_time_steps=3), source={"data": {}})
    with pytest.raises(ValueError, match="lead-time"):
        _refuse_for_package("w", diff, lead)


FIXTURES = os.path.join(REPO, "tests", "fixtures", "physicsnemo")


def _physicsnemo_package(path):
    """A package around networks PhysicsNeMo saved (the parity fixtures), whose conditioning is
    the fixture's first img_lr: 3 inputs and 2 invariants, in physical units via stats.json."""
    os.makedirs(path)
    shutil.copy(os.path.join(FIXTURES, "regression_unet_posembd_sin4.mdlus"), os.path.join(path, "regression.mdlus"))
    shutil.copy(os.path.join(FIXTURES, "edm_posembd_sin4_hrmean.mdlus"), os.path.join(path, "diffusion.mdlus"))
    names = {"input": ["t2m", "u10m", "z500"], "output": ["t2m", "u10m", "v10m"], "invariants": ["orog", "lsm"]}
    moments = {
        "input": ([280.0, 1.0, 55000.0], [10.0, 5.0, 900.0]),
        "output": ([285.0, 0.5, -0.5], [8.0, 4.0, 3.0]),
        "invariants": ([300.0, 0.5], [400.0, 0.4]),
    }
    stats = {g: {n: {"mean": m, "std": s} for n, m, s in zip(names[g], *moments[g])} for g in names}
    meta = dict(
        input_variables=names["input"],
        output_variables=names["output"],
        invariant_variables=names["invariants"],
        inference_mode="regression",
    )
    for name, value in (("metadata.json", meta), ("stats.json", stats)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(value, f)
    lat, lon = 40.0 + 0.25 * np.arange(32), 0.25 * np.arange(48)
    img_lr = np.load(os.path.join(FIXTURES, "regression_unet_posembd_sin4.npz"))["img_lr"][0]
    physical = {g: img_lr[i : i + len(names[g])] for g, i in (("input", 0), ("invariants", 3))}
    physical = {
        g: v * np.array(moments[g][1])[:, None, None] + np.array(moments[g][0])[:, None, None]
        for g, v in physical.items()
    }
    coords = {"lat": lat, "lon": lon}
    xr.Dataset(coords=coords).to_netcdf(os.path.join(path, OUTPUT_GRID))
    fields = {n: (("lat", "lon"), v.astype(np.float32)) for n, v in zip(names["invariants"], physical["invariants"])}
    xr.Dataset(fields, coords=coords).to_netcdf(os.path.join(path, INVARIANTS))
    inputs = {
        n: (("time", "lat", "lon"), v[None].astype(np.float32))
        for n, v in zip(["t2m", "u10", "z500"], physical["input"])
    }
    xr.Dataset(inputs, coords=dict(coords, time=TIMES[:1])).to_netcdf(os.path.join(path, "..", "coarse.nc"))
    return moments["output"]


def test_physicsnemo_saved_package_generates_the_reference_mean(tmp_path):
    """Physical inputs -> normalization -> PhysicsNeMo-saved regression -> denormalized mean,
    against PhysicsNeMo's own output (the parity fixture); `z500` mapped by an override."""
    out_mean, out_std = (np.array(v)[:, None, None] for v in _physicsnemo_package(str(tmp_path / "pkg")))
    model, _ = load_package(str(tmp_path / "pkg"), {"z500": "z500"})
    assert model.inference_mode == "regression" and model.conditioning.regression_mean
    ds = _generate(model, str(tmp_path / "coarse.nc"), tmp_path / "out.nc", members=1)
    reference = np.load(os.path.join(FIXTURES, "regression_unet_posembd_sin4.npz"))["output"][0] * out_std + out_mean
    ours = np.stack([ds[f"{n}_regression"].values[0] for n in ("t2m", "u10", "v10")])
    assert np.abs(ours - reference).max() <= 1e-4 * reference.std(axis=(1, 2)).min()
