"""Scores for precipitation-like variables, as forecasters verify them.

Categorical scores at intensity thresholds (an event is rain rate >= threshold) from the
2 x 2 contingency table of hits H, misses M, false alarms F and correct negatives N
(``scores.categorical``; Jolliffe & Stephenson 2012):
    CSI  = H / (H + M + F)
    ETS  = (H - H_r) / (H + M + F - H_r),  H_r = (H + F)(H + M) / (H + M + F + N)
    bias = (H + F) / (H + M)
the fractions skill score over n x n neighbourhoods (Roberts & Lean 2008, ``scores.spatial.fss_2d``),
the wet-pixel fraction and high quantiles of intensity, forecast against truth.

An ensemble's categorical table pools every member (the expected table of one member) and its
FSS aggregates every member's field. Points where the truth is NaN are left out of the table;
the FSS needs complete fields, so there a NaN counts as dry in both fields.
"""

from __future__ import annotations

import operator

import numpy as np
import scores.categorical
import scores.spatial
import xarray as xr

from jax_corrdiff.evaluation import metrics
from jax_corrdiff.evaluation.dataset import BASELINE_SUFFIXES, completed_times, target_variables

THRESHOLDS = (0.1, 1.0, 5.0, 10.0, 20.0)  # mm/h
FSS_WINDOWS = (1, 5, 9, 17, 33)  # neighbourhood widths in grid points
QUANTILES = (0.99, 0.999)
WET_THRESHOLD = 0.1  # mm/h: the usual radar "rain / no rain" limit
SPATIAL_DIMS = ("y", "x")


def contingency_scores(forecast: xr.DataArray, truth: xr.DataArray, threshold: float) -> dict[str, float]:
    """CSI, ETS and frequency bias of the event ``value >= threshold``; ``forecast`` may have
    more dimensions than ``truth`` (ensemble members), which are pooled."""
    forecast, truth = xr.broadcast(forecast, truth)
    keep = np.isfinite(truth.values) & np.isfinite(forecast.values)
    fcst = xr.DataArray(forecast.values[keep])
    obs = xr.DataArray(truth.values[keep])
    table = scores.categorical.ThresholdEventOperator(default_op_fn=operator.ge).make_contingency_manager(
        fcst, obs, event_threshold=threshold
    )
    return {
        "csi": float(table.critical_success_index()),
        "ets": float(table.equitable_threat_score()),
        "bias": float(table.frequency_bias()),
    }


def fractions_skill_score(forecast: xr.DataArray, truth: xr.DataArray, threshold: float, window: int) -> float:
    """FSS of the event ``value >= threshold`` over ``window`` x ``window`` neighbourhoods (inside
    the domain, no padding), aggregated over every other dimension (times, members)."""
    forecast, truth = xr.broadcast(forecast.fillna(0.0), truth.fillna(0.0))
    result = scores.spatial.fss_2d(
        forecast,
        truth,
        event_threshold=threshold,
        window_size=(window, window),
        spatial_dims=SPATIAL_DIMS,
        threshold_operator=np.greater_equal,
    )
    return float(result)


def wet_fraction(field: xr.DataArray, threshold: float = WET_THRESHOLD) -> float:
    """Fraction of the finite points with ``value >= threshold``."""
    values = field.values[np.isfinite(field.values)]
    return float(np.mean(values >= threshold))


def intensity_quantiles(field: xr.DataArray, quantiles=QUANTILES) -> dict[str, float]:
    """Quantiles of all finite values (pooled over times and members): {"p99": ..., "p99.9": ...}."""
    values = field.values[np.isfinite(field.values)]
    return {f"p{100 * q:g}": float(np.quantile(values, q)) for q in quantiles}


def precipitation_scores(
    forecast: xr.DataArray, truth: xr.DataArray, thresholds=THRESHOLDS, windows=FSS_WINDOWS
) -> dict[str, float]:
    """Every score above for one forecast: csi@T, ets@T, bias@T, fss@T/W (at each threshold T
    and window W), wet_fraction, p99 and p99.9 and their errors (forecast - truth)."""
    out: dict[str, float] = {}
    for t in thresholds:
        out.update({f"{name}@{t:g}": v for name, v in contingency_scores(forecast, truth, t).items()})
        out.update({f"fss@{t:g}/{w}": fractions_skill_score(forecast, truth, t, w) for w in windows})
    out["wet_fraction"] = wet_fraction(forecast)
    out["wet_fraction_truth"] = wet_fraction(truth)
    truth_q = intensity_quantiles(truth)
    for name, value in intensity_quantiles(forecast).items():
        out[name], out[f"{name}_truth"], out[f"{name}_error"] = value, truth_q[name], value - truth_q[name]
    return out


# Columns of the printed precipitation table: key in precipitation_scores (or "crps") -> header.
TABLE_COLUMNS = {
    "csi@1": "CSI 1",
    "csi@5": "CSI 5",
    "ets@1": "ETS 1",
    "bias@1": "bias 1",
    "fss@1/17": "FSS 1/17",
    "fss@5/17": "FSS 5/17",
    "crps": "CRPS",
    "wet_fraction": "wet frac",
    "p99_error": "p99 err",
    "p99.9_error": "p99.9 err",
}


def score_precipitation(ds: xr.Dataset, variable: str, thresholds=THRESHOLDS, windows=FSS_WINDOWS) -> dict:
    """{model: scores} for a generation output's ensemble (``VARIABLE``), regression mean
    (``VARIABLE_regression``) and bilinear input (``VARIABLE_interpolated``) against
    ``VARIABLE_truth`` over its completed times; the ensemble also gets its fair CRPS, the
    deterministic forecasts their MAE as CRPS."""
    target_variables(ds, [variable])
    ds = completed_times(ds)
    truth = ds[f"{variable}_truth"].load()
    models = {"ensemble": ds[variable]}
    models.update({m: ds[variable + s] for m, s in BASELINE_SUFFIXES.items() if variable + s in ds})
    out = {}
    for name, forecast in models.items():
        forecast = forecast.load()
        result = precipitation_scores(forecast, truth, thresholds, windows)
        if metrics.MEMBER_DIM in forecast.dims:
            result["crps"] = metrics.fair_crps(forecast, truth)
        else:
            result["crps"] = metrics.mean_absolute_error(forecast, truth)
        out[name] = result
    return out


def format_precipitation_table(results: dict[str, dict]) -> str:
    """Rows model, columns ``TABLE_COLUMNS``."""
    header = ["model", *TABLE_COLUMNS.values()]
    rows = [[m, *(f"{r[k]:.4g}" for k in TABLE_COLUMNS)] for m, r in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    )
