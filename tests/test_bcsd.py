"""BCSD (bias correction and spatial disaggregation): quantile mapping, the centroid
interpolation back to the fine grid, and a field BCSD must recover exactly where bilinear cannot."""

import numpy as np
import pytest

from jax_corrdiff.data.regrid import block_average, interpolate_blocks
from jax_corrdiff.diffusion.guidance import area_weighted_operator, block_average_operator
from jax_corrdiff.inference.bcsd import BCSD, ShortClimatologyError, coarse_fields, nearest_hour, quantile_map

HOURLY = np.arange("2019-03-01T00", "2019-03-20T00", dtype="datetime64[h]")


def test_quantile_map_is_the_identity_for_the_reference_itself_and_removes_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.gamma(2.0, size=(200, 3, 4))
    values = reference[50:60]
    np.testing.assert_allclose(quantile_map(values, reference, reference), values, atol=1e-12)
    # A model 2 units too warm everywhere: mapping its record onto the reference removes the bias.
    np.testing.assert_allclose(quantile_map(values + 2.0, reference + 2.0, reference), values, atol=1e-12)
    # Beyond the record's range: the correction of the outermost quantile carries on.
    beyond = reference.max(0)[None] + 5
    np.testing.assert_allclose(quantile_map(beyond, reference, reference), beyond)
    np.testing.assert_allclose(quantile_map(beyond, reference + 1.0, reference), beyond - 1.0)


@pytest.mark.parametrize("shape", [(33, 49), (20, 20), (7, 5)])
def test_block_interpolation_matches_the_paired_synthetic_interpolation(shape):
    rng = np.random.default_rng(1)
    factor = 4
    training = rng.normal(size=(10, *shape, 2))
    operator, times = block_average_operator(factor, shape), np.repeat(HOURLY[:1], len(training))
    bcsd = BCSD.fit(operator, training, times, coarse_fields(operator, training), times)
    coarse = rng.normal(size=(2, *block_average(training[:1], factor).shape[1:]))
    got = np.einsum("ha,tabc,wb->thwc", bcsd.rows, coarse, bcsd.cols)
    np.testing.assert_allclose(got, interpolate_blocks(coarse, factor, shape), atol=1e-12)


def test_interpolation_from_an_unaligned_grid_in_either_order_keeps_linear_fields():
    fine_lat, fine_lon = np.linspace(60.0, 50.0, 41), np.linspace(-5.0, 5.0, 41)  # north to south
    operator, _ = area_weighted_operator(fine_lat, fine_lon, np.arange(49.0, 62.0, 1.3), np.arange(-6.0, 6.0, 1.7))
    training, times = np.zeros((10, 41, 41, 1)), np.repeat(HOURLY[:1], 10)
    bcsd = BCSD.fit(operator, training, times, coarse_fields(operator, training), times)
    lat2d, lon2d = np.meshgrid(fine_lat, fine_lon, indexing="ij")
    linear = (0.5 * lat2d - 0.2 * lon2d)[None, ..., None]
    back = np.einsum("ha,tabc,wb->thwc", bcsd.rows, coarse_fields(operator, linear), bcsd.cols)
    np.testing.assert_allclose(bcsd.rows.sum(1), 1.0)
    np.testing.assert_allclose(bcsd.cols.sum(1), 1.0)
    # Exact between the outermost cell centroids, held constant beyond them.
    inner = (slice(None), slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(back[inner], linear[inner], atol=1e-9)


def test_bcsd_recovers_the_hourly_fine_climatology_plus_a_large_scale_anomaly_where_bilinear_cannot():
    rng = np.random.default_rng(2)
    shape, factor, n = (24, 32), 8, len(HOURLY)
    # A fine-scale pattern (e.g. the land-sea contrast) whose sign turns with the hour of day,
    # plus weather that is uniform over the domain.
    pattern = rng.normal(scale=3.0, size=(*shape, 1))
    diurnal = np.cos(2 * np.pi * (HOURLY - HOURLY.astype("datetime64[D]")).astype(int) / 24)
    fields = diurnal[:, None, None, None] * pattern + rng.normal(scale=2.0, size=(n, 1, 1, 1))
    train, test = slice(0, 400), slice(400, n)
    operator = block_average_operator(factor, shape)
    record = coarse_fields(operator, fields)  # the observing model's whole file
    bcsd = BCSD.fit(operator, fields[train], HOURLY[train], record, HOURLY)
    got = bcsd(record[test], HOURLY[test])
    bilinear = interpolate_blocks(record[test], factor, shape)
    bcsd_error, bilinear_error = np.abs(got - fields[test]).mean(), np.abs(bilinear - fields[test]).mean()
    assert bcsd_error < 0.3 * bilinear_error, (bcsd_error, bilinear_error)  # 0.35 vs 1.48 K
    assert got.shape == fields[test].shape and got.dtype == np.float32


def test_hours_missing_from_a_climatology_use_the_nearest_hour_it_holds():
    assert nearest_hour(np.array([0, 6, 12, 18]), 23) == 0 and nearest_hour(np.array([0, 6, 12, 18]), 4) == 6
    assert nearest_hour(np.array([3]), 20) == 3 and nearest_hour(np.array([0, 12]), 6) == 0


def test_too_short_climatologies_are_refused():
    operator = block_average_operator(2, (4, 4))
    with pytest.raises(ShortClimatologyError, match=r"training period at each hour of day it holds; it has \{0: 9\}"):
        BCSD.fit(operator, np.zeros((9, 4, 4, 1)), np.repeat(HOURLY[:1], 9), np.zeros((10, 2, 2, 1)), HOURLY[:10])
    with pytest.raises(ShortClimatologyError, match="observation's record"):
        BCSD.fit(operator, np.zeros((10, 4, 4, 1)), np.repeat(HOURLY[:1], 10), np.zeros((3, 2, 2, 1)), HOURLY[:3])
