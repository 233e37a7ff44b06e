"""Score a generation output (``python -m jax_corrdiff.generate``) against its truth.

Layout read: for each target NAME, ``NAME`` (time, ensemble, [level,] y, x) CorrDiff members,
``NAME_truth`` (time, [level,] y, x), and the deterministic baselines ``NAME_regression``
(stage-1 mean), ``NAME_interpolated`` (bilinear coarse input) and ``NAME_bcsd`` where present. Each
(variable, level) is scored one time step at a time, so memory holds one time's members.

Masking: at each time, a point counts only where the truth, every member and every baseline
are finite; elsewhere the truth is set to NaN and all metrics skip it, so every model is
scored on the same points. Spectra need complete fields: a field (one time of one source)
with any NaN is left out of that source's mean spectrum (``n_fields`` says how many went in).

Aggregates over times are point-weighted (MAE, CRPS: mean over all valid points of all
times; RMSE and spread: square root of the pooled mean square / mean variance; p99: quantile
of the pooled absolute errors); per-time values are the same scores for each time alone.
Calibration (aggregate only): the spread-skill ratio with its ensemble-size correction, the
share of truth outside the ensemble (rank-histogram end bins) with its ideal 2 / (M + 1), and
the fine-scale power ratio (mean spectra over all times, top third of resolved wavenumbers).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import xarray as xr

from jax_corrdiff.evaluation import metrics
from jax_corrdiff.evaluation.spectra import (
    fine_scale_power_ratio,
    nyquist_wavenumber,
    radial_bins,
    radial_power_spectrum,
)

TIME_DIM, LEVEL_DIM, SPATIAL_DIMS = "time", "level", ("y", "x")
ENSEMBLE_MODEL = "corrdiff"
BASELINE_SUFFIXES = {"regression": "_regression", "bilinear": "_interpolated", "bcsd": "_bcsd"}
SCORE_NAMES = ("mae", "rmse", "crps", "spread", "spread_skill_ratio", "p99_abs_error")
# Aggregate-only calibration scores (over all times): rank-histogram end bins against their
# ideal 2 / (M + 1) (ensemble only), and the fine-scale spectral power ratio to the truth.
CALIBRATION_NAMES = ("outside_share", "outside_share_ideal", "fine_power_ratio")


class EvaluationInputError(ValueError):
    """The dataset lacks something scoring needs (a variable, its truth, a dimension)."""


def field_key(variable: str, level) -> str:
    """'t2m' or, on a pressure level, 't@500'."""
    return variable if level is None else f"{variable}@{level:g}"


def _require_dims(ds: xr.Dataset, name: str, required: tuple[str, ...]) -> None:
    missing = [d for d in required if d not in ds[name].dims]
    if missing:
        raise EvaluationInputError(f"variable {name!r} lacks dimension(s) {missing}; it has {ds[name].dims}")


def target_variables(ds: xr.Dataset, variables=None) -> list[str]:
    """The variables to score: ``variables``, or every NAME with a ``NAME_truth``; checked."""
    with_truth = [str(n)[: -len("_truth")] for n in ds.data_vars if str(n).endswith("_truth")]
    if not with_truth:
        raise EvaluationInputError(
            "no '*_truth' variables in the dataset (data variables: "
            f"{sorted(map(str, ds.data_vars))}); scoring needs a generation run on coarsened truth"
        )
    names = list(variables) if variables else with_truth
    for name in names:
        if name not in ds.data_vars:
            raise EvaluationInputError(f"variable {name!r} not in the dataset; variables with truth: {with_truth}")
        if f"{name}_truth" not in ds.data_vars:
            raise EvaluationInputError(f"variable {name!r} has no {name + '_truth'!r} in the dataset")
        _require_dims(ds, name, (TIME_DIM, metrics.MEMBER_DIM, *SPATIAL_DIMS))
        for suffix in ("_truth", *BASELINE_SUFFIXES.values()):
            if f"{name}{suffix}" in ds.data_vars:
                _require_dims(ds, f"{name}{suffix}", (TIME_DIM, *SPATIAL_DIMS))
    return names


def completed_times(ds: xr.Dataset) -> xr.Dataset:
    """The time steps generation finished: it lays out all times up front and sets
    ``completed[t] = 1`` when time t is written; rows still pending are all NaN. Without a
    ``completed`` variable every time counts. (Compared with == 1: xarray reads a pending
    row of a Zarr store as NaN, 0 being that array's fill value.)"""
    if TIME_DIM not in ds.dims:
        raise EvaluationInputError(f"the dataset has no {TIME_DIM!r} dimension; dimensions: {dict(ds.sizes)}")
    if "completed" in ds.variables:
        ds = ds.isel({TIME_DIM: ds["completed"].values == 1})
    if ds.sizes[TIME_DIM] == 0:
        raise EvaluationInputError("the dataset has no completed time steps")
    return ds


def _plain_number(value) -> int | float:
    """A level coordinate value as a JSON number: 850.0 -> 850, 12.5 -> 12.5."""
    value = float(value)
    return int(value) if value.is_integer() else value


def levels_present(members: xr.DataArray) -> list:
    """The levels of a levelled variable that hold data: the output has one level axis shared
    by all variables, and a variable's levels it was not generated on are left NaN."""
    first = members.isel({TIME_DIM: 0, metrics.MEMBER_DIM: 0})
    has_data = first.notnull().any(SPATIAL_DIMS).values
    return [_plain_number(level) for level, present in zip(members[LEVEL_DIM].values, has_data) if present]


def time_labels(ds: xr.Dataset) -> list[str]:
    values = ds[TIME_DIM].values
    if np.issubdtype(values.dtype, np.datetime64):
        return [str(t) for t in np.datetime_as_string(values, unit="m")]
    return [str(t) for t in values]


@dataclasses.dataclass
class _ModelAccumulator:
    """Per-time scores of one model and the pooled sums for the aggregate.

    ``members_count`` is None for a deterministic forecast: no spread, CRPS = MAE."""

    members_count: int | None
    per_time: dict[str, list] = dataclasses.field(default_factory=lambda: {s: [] for s in SCORE_NAMES})
    points: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=lambda: {"ae": 0.0, "se": 0.0, "crps": 0.0, "var": 0.0})
    abs_errors: list[np.ndarray] = dataclasses.field(default_factory=list)

    def _scores(self, mae: float, mse: float, crps: float, variance: float | None, p99: float) -> dict:
        rmse = float(np.sqrt(mse))
        spread = None if self.members_count is None else float(np.sqrt(variance))
        ssr = None if spread is None else metrics.spread_skill_ratio(spread, rmse, self.members_count)
        return {
            "mae": float(mae),
            "rmse": rmse,
            "crps": float(crps),
            "spread": spread,
            "spread_skill_ratio": ssr,
            "p99_abs_error": float(p99),
        }

    def add(
        self,
        n_points: int,
        forecast: xr.DataArray,
        truth: xr.DataArray,
        crps: float | None = None,
        variance: float | None = None,
    ) -> None:
        """One time: ``forecast`` (the ensemble mean for an ensemble) against ``truth`` (NaN where
        masked); ``crps`` and ``variance`` (mean ensemble variance) of an ensemble."""
        mae, mse = metrics.mean_absolute_error(forecast, truth), metrics.mean_squared_error(forecast, truth)
        crps = mae if crps is None else crps
        p99 = metrics.abs_error_quantile(forecast, truth)
        for name, value in self._scores(mae, mse, crps, variance, p99).items():
            self.per_time[name].append(value)
        if n_points == 0:
            return
        self.points += n_points
        for name, value in (("ae", mae), ("se", mse), ("crps", crps), ("var", variance or 0.0)):
            self.sums[name] += n_points * value
        errors = np.abs((forecast - truth).values)
        self.abs_errors.append(errors[np.isfinite(errors)].astype(np.float32))

    def aggregate(self) -> dict:
        if self.points == 0:
            return self._scores(*[float("nan")] * 5)
        pooled = {name: total / self.points for name, total in self.sums.items()}
        p99 = np.quantile(np.concatenate(self.abs_errors), 0.99)
        return self._scores(pooled["ae"], pooled["se"], pooled["crps"], pooled["var"], p99)


class _SpectrumAccumulator:
    """Sum of radially averaged spectra of complete (all-finite) fields per source, and their count."""

    def __init__(self, ny: int, nx: int):
        self.grid_shape = (ny, nx)
        self.mode_count = radial_bins(ny, nx)[1]
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, source: str, fields: np.ndarray) -> None:
        """``fields`` (..., ny, nx): every complete 2-D field in it is one sample."""
        fields = fields.reshape(-1, *self.grid_shape)
        complete = fields[np.isfinite(fields).all(axis=(1, 2))]
        self.counts[source] = self.counts.get(source, 0) + len(complete)
        if len(complete):
            self.sums[source] = self.sums.get(source, 0.0) + radial_power_spectrum(complete)[1].sum(axis=0)

    def fine_power_ratio(self, source: str) -> float | None:
        """``spectra.fine_scale_power_ratio`` of ``source``'s mean spectrum to the truth's;
        None when either has no complete field."""
        if source not in self.sums or "truth" not in self.sums:
            return None
        power, truth = (self.sums[s] / self.counts[s] for s in (source, "truth"))
        return fine_scale_power_ratio(power, truth, *self.grid_shape)

    def result(self) -> dict:
        return {
            "wavenumber": np.arange(len(self.mode_count)).tolist(),
            "mode_count": self.mode_count.tolist(),
            "grid_shape": list(self.grid_shape),
            "nyquist_wavenumber": nyquist_wavenumber(*self.grid_shape),
            "power": {s: (self.sums[s] / n).tolist() if n else None for s, n in self.counts.items()},
            "n_fields": dict(self.counts),
        }


def _as_float(da: xr.DataArray) -> xr.DataArray:
    return da.load().astype(np.float64)


def score_field(
    members: xr.DataArray, truth: xr.DataArray, baselines: dict[str, xr.DataArray], rng: np.random.Generator
) -> dict:
    """Scores of one 2-D field over time: ``members`` (time, ensemble, y, x), ``truth`` and each
    baseline (time, y, x). Returns {"n_points", "models": {model: {"aggregate", "per_time"}},
    "rank_histogram", "spectra"} (models: corrdiff, then the baselines in the given order)."""
    m = metrics.ensemble_size(members)
    accumulators = {ENSEMBLE_MODEL: _ModelAccumulator(m), **{name: _ModelAccumulator(None) for name in baselines}}
    spectra = _SpectrumAccumulator(*(members.sizes[d] for d in SPATIAL_DIMS))
    rank_counts = np.zeros(m + 1, np.int64)
    for t in range(members.sizes[TIME_DIM]):
        ens = _as_float(members.isel({TIME_DIM: t}).transpose(metrics.MEMBER_DIM, *SPATIAL_DIMS))
        obs = _as_float(truth.isel({TIME_DIM: t}).transpose(*SPATIAL_DIMS))
        det = {name: _as_float(b.isel({TIME_DIM: t}).transpose(*SPATIAL_DIMS)) for name, b in baselines.items()}
        valid = obs.notnull() & ens.notnull().all(metrics.MEMBER_DIM)
        for forecast in det.values():
            valid &= forecast.notnull()
        obs_valid, n_points = obs.where(valid), int(valid.sum())

        accumulators[ENSEMBLE_MODEL].add(
            n_points,
            ens.mean(metrics.MEMBER_DIM),
            obs_valid,
            crps=metrics.fair_crps(ens, obs_valid),
            variance=metrics.mean_ensemble_variance(ens, obs_valid),
        )
        for name, forecast in det.items():
            accumulators[name].add(n_points, forecast, obs_valid)
        rank_counts += metrics.rank_histogram(ens, obs_valid, rng)

        spectra.add("truth", obs.values)
        spectra.add(ENSEMBLE_MODEL, ens.values)
        for name, forecast in det.items():
            spectra.add(name, forecast.values)

    return {
        "n_points": accumulators[ENSEMBLE_MODEL].points,
        "models": {name: _model_summary(name, acc, rank_counts, spectra) for name, acc in accumulators.items()},
        "rank_histogram": rank_counts.tolist(),
        "spectra": spectra.result(),
    }


def _model_summary(name: str, acc: _ModelAccumulator, rank_counts: np.ndarray, spectra: _SpectrumAccumulator):
    """Aggregate and per-time scores of one model; calibration figures for the ensemble only."""
    ensemble = name == ENSEMBLE_MODEL
    calibration = {
        "outside_share": metrics.outside_share(rank_counts) if ensemble else None,
        "outside_share_ideal": metrics.outside_share_ideal(len(rank_counts) - 1) if ensemble else None,
        "fine_power_ratio": spectra.fine_power_ratio(name),
    }
    return {"aggregate": {**acc.aggregate(), **calibration}, "per_time": acc.per_time}


def score_dataset(ds: xr.Dataset, variables=None, seed: int = 0) -> dict:
    """Score every target variable (and level) of a generation output against its truth.

    Only completed time steps and the levels a variable holds data on are scored. Returns a
    JSON-ready dict: {"ensemble_size", "times" (those scored), "times_in_file" (all, finished or
    not: more than "times" for a partly written file), "rank_histogram_seed", "fields": {key:
    {"variable", "level", "level_units", "units", "long_name", **score_field(...)}}}, key 't2m'
    or 't@500'. ``variables`` restricts to those names; ``seed`` seeds the rank-histogram tie
    breaking. Raises EvaluationInputError naming what is missing.
    """
    times_in_file = int(ds.sizes[TIME_DIM]) if TIME_DIM in ds.dims else 0
    ds = completed_times(ds)
    names = target_variables(ds, variables)
    rng = np.random.default_rng(seed)
    fields = {}
    for name in names:
        baselines = {
            model: ds[f"{name}{suffix}"]
            for model, suffix in BASELINE_SUFFIXES.items()
            if f"{name}{suffix}" in ds.data_vars
        }
        levels = levels_present(ds[name]) if LEVEL_DIM in ds[name].dims else [None]
        for level in levels:
            at_level = {} if level is None else {LEVEL_DIM: level}
            scored = score_field(
                ds[name].sel(at_level),
                ds[f"{name}_truth"].sel(at_level),
                {model: b.sel(at_level) for model, b in baselines.items()},
                rng,
            )
            fields[field_key(name, level)] = {
                "variable": name,
                "level": level,
                "level_units": str(ds[LEVEL_DIM].attrs.get("units", "")) if level is not None else None,
                "units": str(ds[name].attrs.get("units", "")),
                "long_name": str(ds[name].attrs.get("long_name", name)),
                **scored,
            }
    return {
        "ensemble_size": int(ds.sizes[metrics.MEMBER_DIM]),
        "times": time_labels(ds),
        "times_in_file": times_in_file,
        "rank_histogram_seed": seed,
        "fields": fields,
    }
