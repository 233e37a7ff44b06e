"""Verification scores (jax_corrdiff.evaluation) against hand-computed values, and the score CLI."""

import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scores.probability
import xarray as xr

from jax_corrdiff.evaluation import EvaluationInputError, format_table, metrics, score_dataset
from jax_corrdiff.evaluation.spectra import fine_scale_band, fine_scale_power_ratio, radial_power_spectrum

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensemble(values, point_dims=("point",)) -> xr.DataArray:
    """(ensemble, *points) array -> DataArray."""
    values = np.asarray(values, dtype=float)
    return xr.DataArray(values, dims=("ensemble", *point_dims[: values.ndim - 1]))


def field(values, point_dims=("point",)) -> xr.DataArray:
    values = np.asarray(values, dtype=float)
    return xr.DataArray(values, dims=point_dims[: values.ndim])


def make_generation_dataset(n_time=3, n_members=4, ny=12, nx=16, levels=(500, 850), seed=0) -> xr.Dataset:
    """A synthetic output of ``jax_corrdiff.generate`` with truth: t2m (with bilinear input),
    u10 (no bilinear input) and t on pressure levels; members = regression + noise."""
    rng = np.random.default_rng(seed)
    time = np.datetime64("2023-01-01T00:00", "ns") + np.arange(n_time) * np.timedelta64(6, "h")
    lat, lon = np.meshgrid(22.0 + 0.02 * np.arange(ny), 120.0 + 0.02 * np.arange(nx), indexing="ij")
    coords = {
        "time": time,
        "ensemble": np.arange(n_members),
        "y": np.arange(ny) * 2.0,
        "x": np.arange(nx) * 2.0,
        "lat": (("y", "x"), lat),
        "lon": (("y", "x"), lon),
        "level": ("level", np.array(levels, dtype=float), {"units": "hPa"}),
    }
    data_vars = {}

    def add(name, units, long_name, base, with_levels=False, interpolated=True):
        level_shape = (len(levels),) if with_levels else ()
        level_dims = ("level",) if with_levels else ()
        shape = (n_time, *level_shape, ny, nx)
        truth = base + rng.normal(size=shape)
        regression = truth + 0.5 * rng.normal(size=shape)
        members = regression[:, None] + rng.normal(size=(n_time, n_members, *level_shape, ny, nx))
        attrs = {"units": units, "long_name": long_name}
        data_vars[name] = (("time", "ensemble", *level_dims, "y", "x"), members.astype(np.float32), attrs)
        data_vars[f"{name}_regression"] = (("time", *level_dims, "y", "x"), regression.astype(np.float32), attrs)
        data_vars[f"{name}_truth"] = (("time", *level_dims, "y", "x"), truth.astype(np.float32), attrs)
        if interpolated:
            interp = truth + 1.5 * rng.normal(size=shape)
            data_vars[f"{name}_interpolated"] = (("time", *level_dims, "y", "x"), interp.astype(np.float32), attrs)

    add("t2m", "K", "2 metre temperature", 290.0)
    add("u10", "m s-1", "10 metre eastward wind", 3.0, interpolated=False)
    add("t", "K", "temperature", 250.0, with_levels=True)
    return xr.Dataset(data_vars, coords=coords, attrs={"Conventions": "CF-1.8"})


# ----------------------------------------------------------------------------- CRPS


def test_crps_of_one_member_equals_mae():
    forecast = np.array([1.0, -2.0, 0.5, 4.0])
    truth = np.array([0.0, 1.0, 0.5, 3.0])
    crps = metrics.fair_crps(ensemble([forecast]), field(truth))
    assert crps == pytest.approx(np.mean(np.abs(forecast - truth)))


def test_crps_of_identical_members_equals_mae():
    forecast = np.array([1.0, -2.0, 0.5, 4.0])
    truth = np.array([0.0, 1.0, 0.5, 3.0])
    crps = metrics.fair_crps(ensemble([forecast] * 5), field(truth))
    assert crps == pytest.approx(np.mean(np.abs(forecast - truth)))


@pytest.mark.parametrize("members", [[[0.0, 1.0], [2.0, -1.0]], [[1.0, 0.0], [2.0, 5.0], [4.0, -3.0]]])
def test_fair_crps_equals_ferro_formula_by_hand(members):
    members = np.array(members)
    truth = np.array([3.0, 0.5])
    m = len(members)
    expected = np.mean(
        [
            np.mean([abs(x - y) for x in members[:, p]])
            - sum(abs(a - b) for a, b in itertools.product(members[:, p], repeat=2)) / (2 * m * (m - 1))
            for p, y in enumerate(truth)
        ]
    )
    assert metrics.fair_crps(ensemble(members), field(truth)) == pytest.approx(expected)


def test_fair_crps_known_value():
    # members 1, 2, 4; truth 3: mean|X-y| = 4/3, sum_ij |Xi-Xj| = 12, 12 / (2*3*2) = 1.
    assert metrics.fair_crps(ensemble([[1.0], [2.0], [4.0]]), field([3.0])) == pytest.approx(1 / 3)


def test_perfect_ensemble_scores_lower_crps_than_biased():
    rng = np.random.default_rng(1)
    center = rng.normal(scale=3.0, size=5000)
    truth = center + rng.normal(size=center.size)
    members = center + rng.normal(size=(8, center.size))
    perfect = metrics.fair_crps(ensemble(members), field(truth))
    biased = metrics.fair_crps(ensemble(members + 1.0), field(truth))
    assert perfect < biased


def test_crps_and_mae_skip_nan_truth():
    members = np.array([[1.0, 5.0, 2.0], [3.0, 7.0, 0.0]])
    truth = np.array([2.0, np.nan, 1.0])
    kept = metrics.fair_crps(ensemble(members[:, [0, 2]]), field(truth[[0, 2]]))
    assert metrics.fair_crps(ensemble(members), field(truth)) == pytest.approx(kept)
    # Ensemble means 2, 6, 1 against truth 2, NaN, 1: the NaN point is skipped, not zero-filled.
    assert metrics.mean_absolute_error(field(members.mean(0)), field(truth)) == 0.0


# ----------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("k", [1, 3, 7])
def test_spectrum_of_sinusoid_peaks_at_its_wavenumber(k):
    n = 32
    x = np.arange(n)
    sinusoid = np.broadcast_to(np.sin(2 * np.pi * k * x / n), (n, n))
    wavenumber, power, _ = radial_power_spectrum(sinusoid)
    assert wavenumber[np.argmax(power)] == k
    # sin has mean square 1/2, all of it in bin k.
    assert power[k] * _mode_count(n, n)[k] == pytest.approx(0.5)


def _mode_count(ny, nx):
    return radial_power_spectrum(np.zeros((ny, nx)))[2]


def test_spectrum_of_plane_wave_peaks_at_radial_wavenumber():
    n = 64
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    wave = np.cos(2 * np.pi * (3 * x + 4 * y) / n)
    wavenumber, power, _ = radial_power_spectrum(wave)
    assert wavenumber[np.argmax(power)] == 5


def test_spectrum_wavenumber_on_non_square_grid_counts_cycles_per_shorter_side():
    ny, nx = 16, 32
    along_y = np.broadcast_to(np.sin(2 * np.pi * 2 * np.arange(ny) / ny)[:, None], (ny, nx))
    along_x = np.broadcast_to(np.sin(2 * np.pi * 4 * np.arange(nx) / nx)[None, :], (ny, nx))
    # Both have a wavelength of 8 grid lengths: 2 cycles per 16 grid lengths.
    for wave in (along_y, along_x):
        wavenumber, power, _ = radial_power_spectrum(wave)
        assert wavenumber[np.argmax(power)] == 2


def test_spectrum_parseval_and_batching():
    fields = np.random.default_rng(2).normal(loc=1.0, size=(3, 24, 40))
    _, power, mode_count = radial_power_spectrum(fields)
    np.testing.assert_allclose((power * mode_count).sum(axis=-1), (fields**2).mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(power[1], radial_power_spectrum(fields[1])[1])


# ----------------------------------------------------------------------------- rank histogram, spread


def test_rank_histogram_truth_below_all_members_fills_bin_zero():
    rng = np.random.default_rng(3)
    members = rng.uniform(1.0, 2.0, size=(5, 100))
    counts = metrics.rank_histogram(ensemble(members), field(np.zeros(100)), rng)
    np.testing.assert_array_equal(counts, [100, 0, 0, 0, 0, 0])


def test_rank_histogram_of_calibrated_ensemble_is_flat_and_matches_scores_package():
    rng = np.random.default_rng(4)
    n_points, m = 60_000, 9
    center = rng.normal(scale=2.0, size=n_points)
    members, truth = ensemble(center + rng.normal(size=(m, n_points))), field(center + rng.normal(size=n_points))
    counts = metrics.rank_histogram(members, truth, rng)
    assert counts.shape == (m + 1,) and counts.sum() == n_points
    np.testing.assert_allclose(counts / n_points, 1 / (m + 1), rtol=0.1)
    # No ties in continuous data: same frequencies as scores.probability.rank_histogram.
    reference = scores.probability.rank_histogram(members, truth, "ensemble")
    np.testing.assert_allclose(counts / n_points, reference.values, rtol=1e-12)


def test_rank_histogram_breaks_ties_at_random_and_skips_nan():
    rng = np.random.default_rng(5)
    truth = np.zeros(40_000)
    truth[:10] = np.nan
    counts = metrics.rank_histogram(ensemble(np.zeros((3, truth.size))), field(truth), rng)
    assert counts.sum() == truth.size - 10
    np.testing.assert_allclose(counts / counts.sum(), 0.25, rtol=0.05)


def _spread_skill(members, truth):
    m = len(members)
    spread = np.sqrt(metrics.mean_ensemble_variance(ensemble(members), field(truth)))
    rmse = np.sqrt(metrics.mean_squared_error(field(members.mean(0)), field(truth)))
    return metrics.spread_skill_ratio(spread, rmse, m)


@pytest.mark.parametrize("m", [2, 10])
def test_spread_skill_ratio_is_one_for_calibrated_and_below_for_underdispersive_ensemble(m):
    rng = np.random.default_rng(6)
    center = rng.normal(scale=5.0, size=50_000)
    truth = center + rng.normal(size=center.size)
    noise = rng.normal(size=(m, center.size))
    assert _spread_skill(center + noise, truth) == pytest.approx(1.0, abs=0.03)
    assert _spread_skill(center + 0.5 * noise, truth) < 0.7


def test_spread_of_known_ensemble():
    members = np.array([[1.0, 0.0], [3.0, 0.0]])  # variances (ddof=1): 2 and 0
    assert metrics.mean_ensemble_variance(ensemble(members), field([0.0, 0.0])) == pytest.approx(1.0)
    assert metrics.spread_skill_ratio(1.0, 2.0, 2) == pytest.approx(np.sqrt(1.5) / 2)


def test_outside_share_of_calibrated_ensemble_is_ideal_and_larger_when_underdispersed():
    rng = np.random.default_rng(7)
    m = 8
    center = rng.normal(scale=3.0, size=40_000)
    truth = center + rng.normal(size=center.size)
    noise = rng.normal(size=(m, center.size))
    calibrated = metrics.rank_histogram(ensemble(center + noise), field(truth), rng)
    narrow = metrics.rank_histogram(ensemble(center + 0.5 * noise), field(truth), rng)
    assert metrics.outside_share_ideal(m) == pytest.approx(2 / 9)
    assert metrics.outside_share(calibrated) == pytest.approx(2 / 9, abs=0.01)
    assert metrics.outside_share(narrow) > 0.4
    assert metrics.outside_share([3, 0, 0, 1]) == pytest.approx(1.0)
    assert metrics.outside_share([0, 2, 2, 0]) == 0.0


def test_fine_scale_band_is_top_third_of_resolved_wavenumbers():
    np.testing.assert_array_equal(fine_scale_band(33, 49), [11, 12, 13, 14, 15, 16])  # Nyquist 16
    np.testing.assert_array_equal(fine_scale_band(12, 12), [5, 6])


def test_fine_scale_power_ratio_of_damped_and_smoothed_fields():
    rng = np.random.default_rng(8)
    truth = rng.normal(size=(64, 33, 49))
    _, truth_power, _ = radial_power_spectrum(truth)
    same = radial_power_spectrum(rng.normal(size=truth.shape))[1]
    assert fine_scale_power_ratio(same.mean(0), truth_power.mean(0), 33, 49) == pytest.approx(1.0, abs=0.05)
    halved = radial_power_spectrum(0.5 * truth)[1]
    assert fine_scale_power_ratio(halved.mean(0), truth_power.mean(0), 33, 49) == pytest.approx(0.25)
    # A 3-point running mean along x damps wavelengths of 2-3 grid lengths by far more than 2x.
    smoothed = (truth + np.roll(truth, 1, axis=-1) + np.roll(truth, -1, axis=-1)) / 3
    smoothed_power = radial_power_spectrum(smoothed)[1]
    assert fine_scale_power_ratio(smoothed_power.mean(0), truth_power.mean(0), 33, 49) < 0.3


def _exchangeable_dataset(member_scale: float, n_members=8, n_time=4, ny=24, nx=24, seed=9) -> xr.Dataset:
    """Truth and members drawn alike around a shared white-noise center: members scaled by
    ``member_scale`` about the center (1 = calibrated)."""
    rng = np.random.default_rng(seed)
    center = rng.normal(scale=2.0, size=(n_time, 1, ny, nx))
    truth = center[:, 0] + rng.normal(size=(n_time, ny, nx))
    members = center + member_scale * rng.normal(size=(n_time, n_members, ny, nx))
    coords = {"time": np.arange(n_time), "ensemble": np.arange(n_members)}
    return xr.Dataset(
        {
            "t2m": (("time", "ensemble", "y", "x"), members, {"units": "K"}),
            "t2m_truth": (("time", "y", "x"), truth, {"units": "K"}),
            "t2m_regression": (("time", "y", "x"), center[:, 0], {"units": "K"}),
        },
        coords=coords,
    )


def test_score_dataset_calibration_of_exchangeable_and_underdispersed_ensembles():
    calibrated = score_dataset(_exchangeable_dataset(1.0))
    models = calibrated["fields"]["t2m"]["models"]
    corrdiff = models["corrdiff"]["aggregate"]
    assert corrdiff["spread_skill_ratio"] == pytest.approx(1.0, abs=0.05)
    assert corrdiff["outside_share_ideal"] == pytest.approx(2 / 9)
    assert corrdiff["outside_share"] == pytest.approx(2 / 9, abs=0.03)
    assert corrdiff["fine_power_ratio"] == pytest.approx(1.0, abs=0.1)
    regression = models["regression"]["aggregate"]
    assert regression["outside_share"] is None and regression["outside_share_ideal"] is None
    # The regression center holds the truth's power minus its unit-variance noise: 4 / 5.
    assert regression["fine_power_ratio"] == pytest.approx(0.8, abs=0.1)
    narrow = score_dataset(_exchangeable_dataset(0.4))["fields"]["t2m"]["models"]["corrdiff"]["aggregate"]
    assert narrow["spread_skill_ratio"] < 0.5
    assert narrow["outside_share"] > 0.5
    assert narrow["fine_power_ratio"] < 0.9
    table = format_table(calibrated)
    assert "outside" in table and "(ideal)" in table and "fine power" in table and "0.2222" in table


def test_abs_error_quantile():
    errors = np.arange(101.0)
    assert metrics.abs_error_quantile(field(-errors), field(np.zeros(101))) == pytest.approx(99.0)


# ----------------------------------------------------------------------------- dataset scoring


def test_score_dataset_matches_pooled_hand_computation_with_nan_truth():
    ds = make_generation_dataset()
    truth = ds["t2m_truth"].values.astype(float)
    truth[0, :2, :3] = np.nan
    ds["t2m_truth"].values[:] = truth
    result = score_dataset(ds, ["t2m"])
    field_scores = result["fields"]["t2m"]
    valid = np.isfinite(truth)
    assert field_scores["n_points"] == valid.sum()
    members = ds["t2m"].values.astype(float)
    for model, forecast in (
        ("corrdiff", members.mean(1)),
        ("regression", ds["t2m_regression"].values),
        ("bilinear", ds["t2m_interpolated"].values),
    ):
        errors = np.abs(forecast.astype(float) - truth)[valid]
        aggregate = field_scores["models"][model]["aggregate"]
        assert aggregate["mae"] == pytest.approx(errors.mean(), rel=1e-9)
        assert aggregate["rmse"] == pytest.approx(np.sqrt((errors**2).mean()), rel=1e-9)
        assert aggregate["p99_abs_error"] == pytest.approx(np.quantile(errors, 0.99), rel=1e-5)
        per_time_mae = [np.nanmean(np.abs(forecast[t] - truth[t])) for t in range(len(truth))]
        np.testing.assert_allclose(field_scores["models"][model]["per_time"]["mae"], per_time_mae, rtol=1e-6)
    m = members.shape[1]
    pairwise = np.abs(members[:, :, None] - members[:, None, :]).sum(axis=(1, 2))
    crps = np.abs(members - truth[:, None]).mean(1) - pairwise / (2 * m * (m - 1))
    corrdiff = field_scores["models"]["corrdiff"]["aggregate"]
    assert corrdiff["crps"] == pytest.approx(crps[valid].mean(), rel=1e-9)
    assert corrdiff["spread"] == pytest.approx(np.sqrt(members.var(1, ddof=1)[valid].mean()), rel=1e-9)
    assert (
        field_scores["models"]["regression"]["aggregate"]["crps"]
        == field_scores["models"]["regression"]["aggregate"]["mae"]
    )
    assert field_scores["models"]["regression"]["aggregate"]["spread"] is None
    assert sum(field_scores["rank_histogram"]) == valid.sum()
    assert field_scores["spectra"]["n_fields"] == {"truth": 2, "corrdiff": 12, "regression": 3, "bilinear": 3}


def test_score_dataset_keys_levels_and_models():
    result = score_dataset(make_generation_dataset(n_time=2))
    assert list(result["fields"]) == ["t2m", "u10", "t@500", "t@850"]
    assert list(result["fields"]["u10"]["models"]) == ["corrdiff", "regression"]
    assert result["fields"]["t@850"]["level"] == 850
    assert len(result["fields"]["t@500"]["models"]["corrdiff"]["per_time"]["crps"]) == 2


def test_score_dataset_skips_pending_times_and_levels_without_data():
    """As generate writes it: all times laid out up front with ``completed`` flags, and one
    level axis shared by all variables (NaN on the levels a variable was not generated on)."""
    ds = make_generation_dataset(n_time=3)
    for name in ("t", "t_regression", "t_interpolated", "t_truth"):
        ds[name] = ds[name].where(ds["level"] != 500)
    for name in ds.data_vars:
        ds[name] = ds[name].where(ds["time"] != ds["time"][1])
    ds["completed"] = ("time", np.array([1, np.nan, 1]))  # a Zarr store's pending row (fill value 0) reads as NaN
    result = score_dataset(ds)
    assert list(result["fields"]) == ["t2m", "u10", "t@850"]
    assert result["times"] == ["2023-01-01T00:00", "2023-01-01T12:00"]
    assert result["fields"]["t@850"]["n_points"] == 2 * 12 * 16
    assert result["fields"]["t@850"]["spectra"]["n_fields"]["corrdiff"] == 2 * 4


def test_score_dataset_with_one_member_gives_crps_equal_to_mae_and_no_spread():
    corrdiff = score_dataset(make_generation_dataset(n_members=1), ["t2m"])["fields"]["t2m"]["models"]["corrdiff"]
    assert corrdiff["aggregate"]["crps"] == pytest.approx(corrdiff["aggregate"]["mae"])
    assert np.isnan(corrdiff["aggregate"]["spread"]) and np.isnan(corrdiff["aggregate"]["spread_skill_ratio"])


def test_score_dataset_errors_name_what_is_missing():
    ds = make_generation_dataset(n_time=1)
    with pytest.raises(EvaluationInputError, match="'q2m' not in the dataset"):
        score_dataset(ds, ["q2m"])
    with pytest.raises(EvaluationInputError, match="u10_truth"):
        score_dataset(ds.drop_vars("u10_truth"), ["u10"])
    with pytest.raises(EvaluationInputError, match=r"'t2m' lacks dimension\(s\) \['ensemble'\]"):
        score_dataset(ds.assign(t2m=ds["t2m"].isel(ensemble=0)), ["t2m"])


# ----------------------------------------------------------------------------- CLI


def _run_cli(*args):
    command = [sys.executable, "-m", "jax_corrdiff.score", *args]
    return subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_writes_table_json_csv_and_figures(tmp_path):
    prediction = tmp_path / "out.nc"
    make_generation_dataset(levels=(850,)).to_netcdf(prediction)
    output = tmp_path / "eval"
    run = _run_cli(f"--prediction={prediction}", f"--output={output}", "--variables=t2m,t", "--time_index=1")
    assert run.returncode == 0, run.stderr
    assert "t@850" in run.stdout and "bilinear" in run.stdout and "SSR" in run.stdout
    with open(output / "scores.csv") as f:
        rows = [(r["variable"], r["level"], r["model"]) for r in csv.DictReader(f)]
    assert rows == [
        (v, level, model)
        for v, level in (("t2m", ""), ("t", "850"))
        for model in ("corrdiff", "regression", "bilinear")
    ]
    with open(output / "scores.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["outside_share_ideal"]) == pytest.approx(2 / 5) and float(first["fine_power_ratio"]) > 0
    with open(output / "scores.json") as f:
        scores_json = json.load(f)
    assert set(scores_json["fields"]) == {"t2m", "t@850"}
    assert len(scores_json["fields"]["t2m"]["rank_histogram"]) == 5
    for stem in ("t2m", "t_850"):
        for kind in ("maps", "spectra", "rank_histogram"):
            assert (output / f"{kind}_{stem}.png").stat().st_size > 10_000


def test_cli_without_truth_fails_naming_it(tmp_path):
    ds = make_generation_dataset(n_time=1)
    prediction = tmp_path / "no_truth.nc"
    ds.drop_vars([v for v in ds.data_vars if v.endswith("_truth")]).to_netcdf(prediction)
    run = _run_cli(f"--prediction={prediction}", f"--output={tmp_path / 'eval'}")
    assert run.returncode != 0
    assert "no '*_truth' variables" in run.stderr
    assert not (tmp_path / "eval").exists()
