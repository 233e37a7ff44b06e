"""Coarsening and bilinear regridding on NumPy arrays laid out ``(..., y, x, channel)``.

Two operations, both done once during preparation (never in the training loop):

* ``degrade(f, k)``: the "paired synthetic" input. Block-average the fine field over k x k cells,
  then interpolate bilinearly back to the fine grid. A block average of a field that is linear
  in (i, j) equals the field at the block's centre, so linear fields come back exactly between
  the first and last block centres (tested); outside that band (half a block at each edge) the
  edge value is held constant rather than extrapolated, so no overshoot is made up.
* ``LatLonBilinear``: coarse inputs on their own regular lat/lon grid to the (possibly
  curvilinear, 2-D lat/lon) fine grid. Longitudes may be -180..180 or 0..360 on either side;
  a global source grid wraps around.

Arithmetic is in float64 and the result is cast back to the input dtype.
"""

from __future__ import annotations

import numpy as np

from jax_corrdiff.data.errors import GridMismatchError

# Target points may sit this far (degrees) outside the source grid's outermost centres and
# still count as inside: float32 coordinates differ from float64 ones by ~1e-5 degrees.
_EDGE_TOLERANCE_DEG = 1e-4


def _block_sizes(n: int, k: int) -> np.ndarray:
    """Number of fine cells in each of the ceil(n / k) blocks along an axis (the last may be short)."""
    return np.minimum(k, n - k * np.arange(-(-n // k)))


def block_centres(n: int, k: int) -> np.ndarray:
    """Centre of each block in fine index units: the mean index of the cells the block holds."""
    return k * np.arange(-(-n // k)) + (_block_sizes(n, k) - 1) / 2.0


def block_average(field: np.ndarray, factor: int) -> np.ndarray:
    """``(..., H, W, C) -> (..., ceil(H/k), ceil(W/k), C)``: the mean over each k x k block.

    When k does not divide H or W the last row/column of blocks is partial; each block divides
    its sum by the number of cells it actually holds, so the zero padding never enters a mean.
    """
    k = int(factor)
    *lead, h, w, c = field.shape
    hc, wc = -(-h // k), -(-w // k)
    padded = np.zeros((*lead, hc * k, wc * k, c), np.float64)
    padded[..., :h, :w, :] = field
    sums = padded.reshape(*lead, hc, k, wc, k, c).sum(axis=(-4, -2))
    counts = np.outer(_block_sizes(h, k), _block_sizes(w, k))[:, :, None]
    return (sums / counts).astype(field.dtype)


def _linear_weights(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w) so that value(dst) = (1 - w) * a[i0] + w * a[i1]; ``src`` strictly increasing.

    Points beyond either end get w clipped to 0 or 1, i.e. the end value is held constant.
    """
    if len(src) == 1:
        zeros = np.zeros(np.shape(dst), np.int64)
        return zeros, zeros, np.zeros(np.shape(dst))
    i1 = np.clip(np.searchsorted(src, dst, side="right"), 1, len(src) - 1)
    i0 = i1 - 1
    w = np.clip((dst - src[i0]) / (src[i1] - src[i0]), 0.0, 1.0)
    return i0, i1, w


def interpolate_blocks(coarse: np.ndarray, factor: int, fine_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear from block centres (see ``block_centres``) back to every fine cell; separable."""
    out = coarse.astype(np.float64)
    for axis, n in ((-3, fine_shape[0]), (-2, fine_shape[1])):
        i0, i1, w = _linear_weights(block_centres(n, factor), np.arange(n, dtype=np.float64))
        w = w.reshape((-1, 1, 1) if axis == -3 else (-1, 1))
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(coarse.dtype)


def degrade(field: np.ndarray, factor: int) -> np.ndarray:
    """Paired synthetic input: block average by ``factor``, then bilinear back to the fine grid."""
    return interpolate_blocks(block_average(field, factor), factor, field.shape[-3:-1])


def _unwrap_longitudes(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order the source longitudes as one increasing run without a jump.

    Returns (order, values): ``values[m]`` is the longitude of source column ``order[m]``. The
    run starts just after the largest gap between neighbouring longitudes on the circle, so a
    grid across the 0 or 180 meridian stays in one piece whatever convention it is stored in. A
    global grid (largest gap no wider than an ordinary step) gets its first column repeated at
    +360 so that points between the last and first column interpolate across the seam.
    """
    lon360 = np.mod(lon, 360.0)
    order = np.argsort(lon360, kind="stable")
    s = lon360[order]
    gaps = np.diff(np.append(s, s[0] + 360.0))
    start = (int(np.argmax(gaps)) + 1) % len(s)
    order, s = np.roll(order, -start), np.roll(s, -start)
    s = np.where(np.arange(len(s)) >= len(s) - start, s + 360.0, s) if start else s
    if len(s) > 1 and gaps.max() <= 1.5 * np.median(np.diff(s)):
        order, s = np.append(order, order[0]), np.append(s, s[0] + 360.0)
    return order, s


class LatLonBilinear:
    """Bilinear interpolation from a regular (1-D lat, 1-D lon) grid to 2-D target lat/lon points.

    The four corner indices and weights are computed once; ``__call__`` applies them to fields
    ``(..., ny, nx, C)`` giving ``(..., H, W, C)``:
        f(p) = (1-wy)(1-wx) f[y0,x0] + (1-wy) wx f[y0,x1] + wy (1-wx) f[y1,x0] + wy wx f[y1,x1].
    Raises ``GridMismatchError`` naming ``path`` if any target point lies outside the source grid.
    """

    def __init__(self, src_lat, src_lon, dst_lat, dst_lon, *, path: str):
        src_lat = np.asarray(src_lat, np.float64)
        lat_order = np.argsort(src_lat, kind="stable")
        lat = src_lat[lat_order]
        lon_order, lon = _unwrap_longitudes(np.asarray(src_lon, np.float64))
        if np.any(np.diff(lat) <= 0) or np.any(np.diff(lon) <= 0):
            raise GridMismatchError(path, "input grid", "latitudes and longitudes must be distinct")
        dst_lat = np.asarray(dst_lat, np.float64)
        dst_lon_raw = np.asarray(dst_lon, np.float64)
        dst_lon = lon[0] + np.mod(dst_lon_raw - lon[0], 360.0)
        # A target point just below lon[0] wraps to lon[0] + ~360; bring it back within tolerance.
        dst_lon = np.where(dst_lon > lon[0] + 360.0 - _EDGE_TOLERANCE_DEG, dst_lon - 360.0, dst_lon)
        wrap = lambda v: np.mod(v + 180.0, 360.0) - 180.0  # noqa: E731  (for messages only)
        for name, src, dst, shown, show in (
            ("latitude", lat, dst_lat, dst_lat, float),
            ("longitude", lon, dst_lon, dst_lon_raw, wrap),
        ):
            outside = (dst < src[0] - _EDGE_TOLERANCE_DEG) | (dst > src[-1] + _EDGE_TOLERANCE_DEG)
            if outside.any():
                raise GridMismatchError(
                    path,
                    "input grid does not cover the target grid",
                    f"{int(outside.sum())} target point(s) outside the input {name} range "
                    f"{show(src[0]):.4f}..{show(src[-1]):.4f} (target {name} {shown.min():.4f}..{shown.max():.4f})",
                )
        y0, y1, wy = _linear_weights(lat, dst_lat)
        x0, x1, wx = _linear_weights(lon, dst_lon)
        self._y = (lat_order[y0], lat_order[y1])
        self._x = (lon_order[x0], lon_order[x1])
        self._wy, self._wx = wy[..., None], wx[..., None]

    def __call__(self, field: np.ndarray) -> np.ndarray:
        f = field.astype(np.float64)
        (y0, y1), (x0, x1), wy, wx = self._y, self._x, self._wy, self._wx
        out = (1 - wy) * ((1 - wx) * f[..., y0, x0, :] + wx * f[..., y0, x1, :]) + wy * (
            (1 - wx) * f[..., y1, x0, :] + wx * f[..., y1, x1, :]
        )
        return out.astype(field.dtype)


def cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges (n + 1) of cells around increasing ``centres``: midpoints, the outer edges half a
    spacing beyond the outermost centres."""
    c = np.asarray(centres, np.float64)
    if len(c) < 2 or np.any(np.diff(c) <= 0):
        raise ValueError(f"cell centres must be at least two, strictly increasing; got {c[:5]}...")
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def area_weights_1d(
    fine: np.ndarray, coarse: np.ndarray, *, latitude: bool, min_coverage: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted averaging from fine to coarse cells along one axis of a regular lat/lon grid.

    Row a of the matrix is the overlap of each fine cell with coarse cell a, measured in
    sin(lat) for latitude (a cell's area is R^2 (sin phi_1 - sin phi_0)(lambda_1 - lambda_0), so
    the 2-D weights are the product of one row per axis), normalised to sum 1. Coarse cells less
    than ``min_coverage`` covered by the fine grid are dropped (a GCM cell mostly outside the
    domain would be compared with the mean of a corner of it). Returns (matrix (n_kept, n_fine),
    indices of the kept coarse cells).
    """
    fe, ce = cell_edges(fine), cell_edges(coarse)
    measure = (lambda e: np.sin(np.deg2rad(e))) if latitude else (lambda e: e)
    lo = np.maximum(fe[None, :-1], ce[:-1, None])
    hi = np.minimum(fe[None, 1:], ce[1:, None])
    overlap = np.where(hi > lo, measure(np.maximum(hi, lo)) - measure(lo), 0.0)
    coverage = overlap.sum(1) / (measure(ce[1:]) - measure(ce[:-1]))
    kept = np.flatnonzero(coverage >= min_coverage)
    return overlap[kept] / overlap[kept].sum(1, keepdims=True), kept
