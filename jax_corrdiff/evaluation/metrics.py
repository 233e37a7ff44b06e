"""Verification metrics for one field: an ensemble (or deterministic forecast) against the truth.

Every function skips NaN: a point whose truth is NaN does not count (the caller sets the
truth to NaN wherever any compared forecast is NaN too, so that all models are scored on the
same points). MAE and MSE come from ``scores.continuous`` and the fair CRPS from
``scores.probability.crps_for_ensemble`` (Bureau of Meteorology ``scores`` package); what that
package does not provide in the form needed here is written out below with its formula.
"""

from __future__ import annotations

import numpy as np
import scores.continuous
import scores.probability
import xarray as xr

MEMBER_DIM = "ensemble"


def ensemble_size(members: xr.DataArray, member_dim: str = MEMBER_DIM) -> int:
    return int(members.sizes[member_dim])


def mean_absolute_error(forecast: xr.DataArray, truth: xr.DataArray) -> float:
    """MAE = mean |f - y| over the points where both are finite (``scores.continuous.mae``)."""
    return float(scores.continuous.mae(forecast, truth))


def mean_squared_error(forecast: xr.DataArray, truth: xr.DataArray) -> float:
    """MSE = mean (f - y)^2 over the points where both are finite (``scores.continuous.mse``).

    Returned rather than the RMSE so that means over several times can be combined
    point-weighted before the square root."""
    return float(scores.continuous.mse(forecast, truth))


def fair_crps(members: xr.DataArray, truth: xr.DataArray, member_dim: str = MEMBER_DIM) -> float:
    """Mean fair CRPS of an M-member ensemble (Ferro 2014, Q. J. R. Meteorol. Soc. 140:1917):

        CRPS_fair = 1/M sum_i |X_i - y|  -  1/(2 M (M-1)) sum_i sum_j |X_i - X_j|

    the unbiased estimate of E|X - y| - E|X - X'|/2 for the distribution the members are
    drawn from, so a small ensemble is not penalised for its size. For M = 1 the second term
    is undefined; a single member is a deterministic forecast, whose CRPS is its absolute
    error, so the MAE is returned. Averaged over the points where the truth is finite.
    """
    if ensemble_size(members, member_dim) == 1:
        return mean_absolute_error(members.squeeze(member_dim, drop=True), truth)
    return float(scores.probability.crps_for_ensemble(members, truth, member_dim, method="fair"))


def mean_ensemble_variance(members: xr.DataArray, truth: xr.DataArray, member_dim: str = MEMBER_DIM) -> float:
    """Mean over the points where the truth is finite of the unbiased ensemble variance

        s^2 = 1/(M-1) sum_i (X_i - mean X)^2        (ddof=1; NaN for M = 1).

    The ensemble spread is sqrt of this mean (variances, not standard deviations, are
    averaged, so that spread and RMSE are comparable in the spread-skill ratio)."""
    if ensemble_size(members, member_dim) == 1:
        return float("nan")
    variance = members.var(member_dim, ddof=1).where(truth.notnull())
    return float(variance.mean())


def spread_skill_ratio(spread: float, rmse: float, members_count: int) -> float:
    """SSR = sqrt((M+1)/M) * spread / RMSE(ensemble mean), spread = sqrt(mean s^2).

    For a statistically consistent ensemble (truth exchangeable with the members),
    E[(mean X - y)^2] = (M+1)/M * E[s^2] (Fortin et al. 2014, J. Hydrometeor. 15:1708), so
    the corrected ratio is 1 in expectation for any M; < 1 is under-dispersive (over-
    confident), > 1 over-dispersive. NaN for M = 1 or RMSE = 0."""
    if members_count < 2 or not rmse > 0:
        return float("nan")
    return float(np.sqrt((members_count + 1) / members_count) * spread / rmse)


def rank_histogram(
    members: xr.DataArray, truth: xr.DataArray, rng: np.random.Generator, member_dim: str = MEMBER_DIM
) -> np.ndarray:
    """Counts (length M+1) of the rank of the truth among the M members (Hamill 2001).

    rank = #{i: X_i < y} + U, with U drawn uniformly from {0, ..., #{i: X_i == y}}: ties are
    broken at random (``rng``, seeded by the caller for reproducibility), so a calibrated
    ensemble gives a flat histogram also for variables with many ties (e.g. zero
    precipitation). Bin 0: truth below every member; bin M: above every member. Points
    where the truth or any member is NaN are not counted, so the counts sum to the number
    of valid points. ``members`` has the dims of ``truth`` plus ``member_dim``.
    (``scores.probability.rank_histogram`` gives relative frequencies with
    ties shared fractionally; integer counts that add up over times are needed here.)
    """
    m = ensemble_size(members, member_dim)
    x = members.transpose(member_dim, *truth.dims).values.reshape(m, -1)
    y = truth.values.reshape(-1)
    valid = np.isfinite(y) & np.isfinite(x).all(axis=0)
    x, y = x[:, valid], y[valid]
    below = (x < y).sum(axis=0)
    ties = (x == y).sum(axis=0)
    ranks = below + np.floor(rng.random(y.size) * (ties + 1)).astype(np.int64)
    return np.bincount(ranks, minlength=m + 1)


def outside_share(rank_counts) -> float:
    """Share of the truth outside the ensemble's range: (n_0 + n_M) / sum_r n_r, the two end
    bins of the rank histogram (``rank_histogram``). NaN when nothing was counted."""
    counts = np.asarray(rank_counts, dtype=np.float64)
    total = counts.sum()
    return float((counts[0] + counts[-1]) / total) if total > 0 else float("nan")


def outside_share_ideal(members_count: int) -> float:
    """2 / (M + 1): for a calibrated M-member ensemble the truth is exchangeable with the
    members, its rank is uniform on {0, ..., M}, and 2 of those M + 1 ranks lie outside the
    members' range. A larger share is under-dispersion (a U-shaped histogram), a smaller one
    over-dispersion."""
    return 2.0 / (members_count + 1)


def abs_error_quantile(forecast: xr.DataArray, truth: xr.DataArray, quantile: float = 0.99) -> float:
    """The ``quantile`` (default 0.99) of |f - y| over the finite points (numpy's linear
    interpolation between order statistics); the tail of the error that MAE/RMSE average away."""
    errors = np.abs((forecast - truth).values)
    return float(np.nanquantile(errors, quantile)) if np.isfinite(errors).any() else float("nan")
