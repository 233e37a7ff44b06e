"""Putting fields on the target grid: grid checks, the input regridder, static fields."""

from __future__ import annotations

import numpy as np

from jax_corrdiff.data.errors import GridMismatchError
from jax_corrdiff.data.regrid import LatLonBilinear
from jax_corrdiff.data.sources import FieldSource, apply_nan_policy

# Fields count as on the target grid when their lat/lon agree to this many degrees.
GRID_TOLERANCE_DEG = 1e-3


def describe_paths(paths) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"


def _grid_distance(lat_a, lon_a, lat_b, lon_b) -> float:
    """Largest difference in degrees between two grids' lat or lon (longitudes compared mod 360)."""
    return max(np.abs(lat_a - lat_b).max(), np.abs(np.mod(lon_a - lon_b + 180.0, 360.0) - 180.0).max())


def require_on_grid(src, lat: np.ndarray, lon: np.ndarray, what: str, target: str) -> None:
    """Raise GridMismatchError unless ``src`` lies on the (lat, lon) grid of ``target``."""
    path = describe_paths(src.paths)
    if src.shape != lat.shape:
        raise GridMismatchError(
            path, f"{what} are not on the target grid", f"grid {src.shape}, target grid {lat.shape} ({target})"
        )
    if src.lat is not None:
        dist = _grid_distance(src.lat, src.lon, lat, lon)
        if dist > GRID_TOLERANCE_DEG:
            raise GridMismatchError(
                path,
                f"{what} are not on the target grid",
                f"lat/lon differ from the target's ({target}) by up to {dist:.4f} deg",
            )


def input_regridder(inputs, lat: np.ndarray, lon: np.ndarray):
    """None when ``inputs`` (a FieldSource or ForecastSource) already sit on the (lat, lon) target
    grid, else a LatLonBilinear to it."""
    path = describe_paths(inputs.paths)
    on_target = inputs.lat is not None and inputs.shape == lat.shape
    if on_target and _grid_distance(inputs.lat, inputs.lon, lat, lon) <= GRID_TOLERANCE_DEG:
        return None
    if inputs.regular is None:
        raise GridMismatchError(
            path, "input grid", "inputs need a regular grid with 1-D lat and lon (or to be on the target grid already)"
        )
    return LatLonBilinear(*inputs.regular, lat, lon, path=path)


def read_static(cfg: dict, lat: np.ndarray, lon: np.ndarray, target: str) -> tuple[np.ndarray, dict]:
    """Static fields (H, W, C) of the data config ``cfg`` after its NaN policy, and their
    non-finite counts by name."""
    if not cfg["static_variables"]:
        return np.zeros((*lat.shape, 0), np.float32), {}
    src = FieldSource([cfg["static_path"]], cfg["static_variables"], "static", static=True)
    path, names = src.paths[0], [str(f) for f in src.fields]
    require_on_grid(src, lat, lon, "static fields", target)
    values = src.read_static()
    counts = apply_nan_policy(values[None], names, cfg["nan_policy"], cfg["nan_fill_value"], paths=[path], times=[None])
    return values, dict(zip(names, counts.tolist()))
