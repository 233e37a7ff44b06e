"""Precipitation scores against hand-computed cases."""

import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.evaluation.precipitation import (
    contingency_scores,
    format_precipitation_table,
    fractions_skill_score,
    intensity_quantiles,
    precipitation_scores,
    score_precipitation,
    wet_fraction,
)


def _field(values, dims=("y", "x")):
    return xr.DataArray(np.asarray(values, np.float64), dims=dims)


def test_contingency_table_scores():
    # 10 points, event >= 1: H = 3, M = 1, F = 2, N = 4.
    truth = _field([[1, 2, 5, 3, 0, 0, 0, 0, 0, 0.5]])
    fcst = _field([[1, 4, 1, 0, 2, 7, 0, 0, 0.9, 0]])
    s = contingency_scores(fcst, truth, 1.0)
    # CSI = 3/6; bias = 5/4; H_r = 5 * 4 / 10 = 2, ETS = (3 - 2) / (6 - 2).
    assert s == pytest.approx({"csi": 0.5, "ets": 0.25, "bias": 1.25})


def test_ensemble_members_are_pooled_and_nan_truth_skipped():
    truth = _field([[2.0, 0.0, np.nan]])
    members = xr.DataArray(np.array([[[2.0, 0.0, 9.0]], [[0.0, 3.0, 9.0]]]), dims=("ensemble", "y", "x"))
    # member 0: H = 1; member 1: M = 1, F = 1. Pooled: H = 1, M = 1, F = 1, N = 1.
    assert contingency_scores(members, truth, 1.0)["csi"] == pytest.approx(1 / 3)
    assert contingency_scores(members, truth, 1.0)["bias"] == pytest.approx(1.0)


def test_fss_by_hand():
    # 2 x 2 windows on two identical rows: a 1-D case.
    fcst, truth = _field([[1.0, 0, 0, 0]] * 2), _field([[0, 1.0, 0, 0]] * 2)
    # Windows at columns 0-1, 1-2, 2-3: P_f = (1/2, 0, 0), P_o = (1/2, 1/2, 0):
    # FSS = 1 - sum (P_f - P_o)^2 / (sum P_f^2 + sum P_o^2) = 1 - 0.25 / 0.75.
    assert fractions_skill_score(fcst, truth, 0.5, 2) == pytest.approx(2 / 3)
    assert fractions_skill_score(fcst, truth, 0.5, 1) == pytest.approx(0.0)
    assert fractions_skill_score(truth, truth, 0.5, 1) == pytest.approx(1.0)


def test_wet_fraction_and_quantiles():
    field = _field([np.arange(1001) / 10.0], ("y", "x"))
    assert wet_fraction(field) == pytest.approx(1000 / 1001)
    q = intensity_quantiles(field)
    assert q == pytest.approx({"p99": 99.0, "p99.9": 99.9})


def test_all_scores_for_a_perfect_forecast():
    rng = np.random.default_rng(0)
    truth = _field(np.where(rng.random((3, 40, 40)) < 0.3, rng.gamma(1.0, 5.0, (3, 40, 40)), 0.0), ("time", "y", "x"))
    s = precipitation_scores(truth, truth, thresholds=(1.0, 5.0), windows=(1, 9))
    assert s["csi@1"] == s["fss@5/9"] == s["bias@5"] == pytest.approx(1.0)
    assert s["p99_error"] == 0.0 and s["wet_fraction"] == s["wet_fraction_truth"]


def test_score_precipitation_of_a_generation_output():
    rng = np.random.default_rng(1)
    truth = np.where(rng.random((2, 20, 20)) < 0.4, rng.gamma(1.0, 6.0, (2, 20, 20)), 0.0)
    dims = ("time", "y", "x")
    ds = xr.Dataset(
        {
            "rain": (("time", "ensemble", "y", "x"), np.stack([truth, truth], axis=1)),
            "rain_truth": (dims, truth),
            "rain_interpolated": (dims, np.full_like(truth, truth.mean())),
            "completed": ("time", np.array([1, 1], np.int8)),
        }
    )
    results = score_precipitation(ds, "rain", thresholds=(1.0, 5.0), windows=(1, 17))
    assert set(results) == {"ensemble", "bilinear"}
    assert results["ensemble"]["csi@5"] == 1.0 and results["ensemble"]["crps"] == 0.0
    assert results["bilinear"]["crps"] == pytest.approx(np.abs(truth - truth.mean()).mean())
    assert results["bilinear"]["bias@5"] == 0.0  # a uniform field below 5 never has the event
    assert "CSI 5" in format_precipitation_table(results)
