"""BCSD: bias correction and spatial disaggregation (Wood et al. 2004), the statistical
downscaling baseline of the ZSSD table (Table 1 of the ZSSD paper).

With A the observation operator (fine grid -> the observation's coarse grid) and x_1..x_N the
training period's fine fields:

1. Bias correction: in each coarse cell (and hour of day), the observation y is quantile-mapped from the
   observing model's own climatology (its record over the training period, the historical
   overlap) onto the reference climatology {A x_n}: y_bc = Q_ref(F_obs(y)), both CDFs empirical with linear
   interpolation between order statistics (identical record and reference give y_bc = y).
2. Spatial disaggregation, additive (temperature-like fields): the coarse anomaly
   y_bc - mean_n(A x_n) is interpolated to the fine grid and added to the fine climatology:
   x_bcsd = I (y_bc - mean_n A x_n) + mean_n x_n, the means over the same hour of day.

I interpolates linearly between the coarse cells' centroids in fine-index space (the
row-normalised rows and columns of A), separably like A, so one rule serves block averages and
area-weighted GCM grids alike; beyond the outermost centroids it holds the edge value.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_corrdiff.diffusion.guidance import SeparableOperator

# An empirical CDF from fewer times maps observations onto a handful of order statistics.
MIN_CLIMATOLOGY = 10


class ShortClimatologyError(ValueError):
    """The training period or the observation's record is too short for BCSD's climatologies."""


def coarse_fields(operator: SeparableOperator, fields: np.ndarray) -> np.ndarray:
    """A x for fine ``fields`` (..., H, W, C) -> (..., A, B, C), in float64 numpy."""
    return np.einsum("ah,...hwc,bw->...abc", operator.rows, np.asarray(fields, np.float64), operator.cols)


def _interpolation_matrix(averaging: np.ndarray) -> np.ndarray:
    """(N, A) linear interpolation from the A coarse cells of an (A, N) averaging matrix back to
    the N fine indices, between the cells' centroids (sorted, so either grid order works)."""
    n_coarse, n_fine = averaging.shape
    if n_coarse == 1:
        return np.ones((n_fine, 1))
    centroids = averaging @ np.arange(n_fine) / averaging.sum(axis=1)
    order = np.argsort(centroids)
    sorted_centroids = centroids[order]
    fine = np.arange(n_fine, dtype=np.float64)
    upper = np.clip(np.searchsorted(sorted_centroids, fine, side="right"), 1, n_coarse - 1)
    lower = upper - 1
    span = sorted_centroids[upper] - sorted_centroids[lower]
    w = np.clip((fine - sorted_centroids[lower]) / np.where(span > 0, span, 1.0), 0.0, 1.0)
    matrix = np.zeros((n_fine, n_coarse))
    rows = np.arange(n_fine)
    np.add.at(matrix, (rows, order[lower]), 1.0 - w)
    np.add.at(matrix, (rows, order[upper]), w)
    return matrix


def quantile_map(values: np.ndarray, record: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per cell (last axes), ``values`` (T, ...) mapped from the empirical CDF of ``record``
    (M, ...) onto the quantiles of ``reference`` (N, ...): y + Q_ref(p) - Q_rec(p), p = F_rec(y),
    which is Q_ref(F_rec(y)) inside the record's range and carries the correction of the
    outermost quantile beyond it (a warm spell beyond the record stays beyond the reference)."""
    flat_values = values.reshape(len(values), -1)
    flat_record = np.sort(record.reshape(len(record), -1), axis=0)
    flat_reference = np.sort(reference.reshape(len(reference), -1), axis=0)
    record_p = np.linspace(0.0, 1.0, len(flat_record))
    reference_p = np.linspace(0.0, 1.0, len(flat_reference))
    out = np.empty_like(flat_values, dtype=np.float64)
    for cell in range(flat_values.shape[1]):
        p = np.interp(flat_values[:, cell], flat_record[:, cell], record_p)
        correction = np.interp(p, reference_p, flat_reference[:, cell]) - np.interp(p, record_p, flat_record[:, cell])
        out[:, cell] = flat_values[:, cell] + correction
    return out.reshape(values.shape)


def hour_of_day(times) -> np.ndarray:
    """The UTC hour (0..23) of datetime64 ``times``."""
    times = np.asarray(times, "datetime64[h]")
    return (times - times.astype("datetime64[D]")).astype(np.int64)


def nearest_hour(available: np.ndarray, hour: int) -> int:
    """The hour of ``available`` closest to ``hour`` on the 24-hour circle (earliest on ties)."""
    candidates = np.unique(available)
    distance = np.abs((candidates - hour + 12) % 24 - 12)
    return int(candidates[np.argmin(distance)])


def _by_hour(fields: np.ndarray, times, name: str) -> dict[int, np.ndarray]:
    """{hour of day: the fields at that hour}, each with at least ``MIN_CLIMATOLOGY`` times."""
    hours = hour_of_day(times)
    groups = {int(h): fields[hours == h] for h in np.unique(hours)}
    short = {h: len(g) for h, g in groups.items() if len(g) < MIN_CLIMATOLOGY}
    if short:
        raise ShortClimatologyError(
            f"BCSD needs at least {MIN_CLIMATOLOGY} times of the {name} at each hour of day it holds; "
            f"it has {short} (hour: times)"
        )
    return groups


@dataclasses.dataclass(frozen=True)
class BCSD:
    """The fitted baseline: ``bcsd(observations, times)`` -> fine fields (T, H, W, C).
    Climatologies (the quantiles, both means) are taken per hour of day: the fine-scale pattern
    of 2 m temperature turns with the diurnal cycle (land-sea contrast), as monthly climatologies
    serve daily data in the original method. A time whose hour the training or the record lacks
    uses the nearest hour they hold."""

    reference: dict[int, np.ndarray]  # hour -> (N_h, A, B, C): the training fields seen through A
    fine_mean: dict[int, np.ndarray]  # hour -> (H, W, C): mean of the training fields
    record: dict[int, np.ndarray]  # hour -> (M_h, A, B, C): the observing source's own climatology
    rows: np.ndarray  # (H, A) interpolation back to the fine rows
    cols: np.ndarray  # (W, B) and columns

    @classmethod
    def fit(cls, operator: SeparableOperator, training_fields: np.ndarray, times, record: np.ndarray, record_times):
        """From the training period's fine fields (N, H, W, C), physical units, at ``times`` (N,),
        and the observing source's ``record`` (M, A, B, C) on the operator's coarse grid at
        ``record_times`` (M,), which the bias correction maps from."""
        groups = _by_hour(np.asarray(training_fields, np.float64), times, "training period")
        return cls(
            {h: coarse_fields(operator, g) for h, g in groups.items()},
            {h: g.mean(axis=0) for h, g in groups.items()},
            _by_hour(np.asarray(record, np.float64), record_times, "observation's record"),
            _interpolation_matrix(operator.rows),
            _interpolation_matrix(operator.cols),
        )

    def __call__(self, observations: np.ndarray, times) -> np.ndarray:
        """``observations`` (T, A, B, C) on the operator's coarse grid at ``times`` (T,)."""
        hours = hour_of_day(times)
        fine = np.empty((len(observations), len(self.rows), len(self.cols), observations.shape[-1]), np.float32)
        for hour in np.unique(hours):
            at = hours == hour
            train_hour = nearest_hour(np.array(list(self.reference)), hour)
            record_hour = nearest_hour(np.array(list(self.record)), hour)
            reference = self.reference[train_hour]
            corrected = quantile_map(np.asarray(observations[at], np.float64), self.record[record_hour], reference)
            anomaly = corrected - reference.mean(axis=0)
            fine[at] = np.einsum("ha,tabc,wb->thwc", self.rows, anomaly, self.cols) + self.fine_mean[train_hour]
        return fine
