"""Generation reruns: a file holds one run (other settings are refused, or --overwrite starts anew),
bad options are usage errors before any work, and scoring a partly written file says so."""

import os
import shutil
import subprocess
import sys

import netCDF4
import pytest
import xarray as xr

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.evaluation import format_table, score_dataset
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.inference.writer import RUN_SETTINGS, RunMismatchError

ERA5 = demo_data_path("era5_t2m_uk_0p25deg.nc")
PERIOD = ["2019-03-22T00", "2019-03-22T01"]


def _run(workdir, output, *, path=ERA5, steps=2, seed=7, members=2, batch_size=0, overwrite=False):
    model = CorrDiffModel.load(workdir)
    inputs = InferenceInputs.open(model.data_config, path, coarsen=True, lat=model.lat, lon=model.lon, period=PERIOD)
    sampler = make_sampler("deterministic", steps=steps)
    return generate(
        model, inputs, str(output), sampler, members=members, seed=seed, batch_size=batch_size, overwrite=overwrite
    )


@pytest.fixture(scope="module")
def partial_output(smoke_workdir, tmp_path_factory):
    """A generation output whose second time was never written (the run was killed)."""
    out = tmp_path_factory.mktemp("reruns") / "out.nc"
    _run(smoke_workdir, out)
    with netCDF4.Dataset(out, "a") as nc:
        nc["completed"][1] = 0
        nc["t2m"][1] = float("nan")
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(seed=8), r"seed: file 7, this run 8"),
        (dict(steps=3), r"sampler\.num_steps: file 2, this run 3"),
        (dict(path="copy"), r"input: file '.*era5_t2m_uk_0p25deg\.nc', this run '.*copy\.nc'"),
    ],
)
def test_a_rerun_with_other_settings_is_refused(smoke_workdir, partial_output, tmp_path, change, named):
    if change.get("path") == "copy":
        change["path"] = str(shutil.copy(ERA5, tmp_path / "copy.nc"))
    out = shutil.copy(partial_output, tmp_path / "out.nc")
    with pytest.raises(RunMismatchError, match=named):
        _run(smoke_workdir, out, **change)
    with netCDF4.Dataset(out) as nc:
        assert nc["completed"][:].tolist() == [1, 0]  # untouched


def test_overwrite_starts_a_new_file(smoke_workdir, partial_output, tmp_path):
    out = shutil.copy(partial_output, tmp_path / "out.nc")
    _run(smoke_workdir, out, seed=8, overwrite=True)
    with xr.open_dataset(out) as ds:
        assert ds.completed.values.tolist() == [1, 1] and '"seed": 8' in ds.attrs[RUN_SETTINGS]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(members=0), r"members=0: at least one member"),
        (dict(members=-2), r"members=-2: at least one member"),
        (dict(batch_size=-1), r"batch_size=-1: must be positive"),
    ],
)
def test_bad_options_fail_before_any_work(smoke_workdir, tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        _run(smoke_workdir, tmp_path / "out.nc", **option)
    assert os.listdir(tmp_path) == []


def test_command_line_usage_errors(tmp_path):
    common = [sys.executable, "-m", "jax_corrdiff.generate", f"--workdir={tmp_path}", f"--input={ERA5}"]
    for flags, message in (
        ([f"--output={tmp_path}/o.nc", "--members=0"], "--members=0: at least one member"),
        ([f"--output={tmp_path}/o.nc", "--batch_size=-1"], "--batch_size=-1: must be positive"),
        ([f"--output={tmp_path}/missing/o.nc"], f"--output={tmp_path}/missing/o.nc: the directory"),
    ):
        result = subprocess.run([*common, *flags], capture_output=True, text=True, check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_score_says_when_the_file_is_partly_written(partial_output):
    with xr.open_dataset(partial_output) as ds:
        scores = score_dataset(ds.load())
    assert len(scores["times"]) == 1 and scores["times_in_file"] == 2
    assert "PARTIAL: 1 of 2 times scored" in format_table(scores)
