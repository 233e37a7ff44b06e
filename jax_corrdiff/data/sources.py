"""Reading named fields from xarray files (NetCDF / Zarr) and from PhysicsNeMo's CWB Zarr.

A field is named ``"name"`` or ``"name@level"``; ``level`` is a value of the variable's vertical
coordinate (the first of ``LEVEL_DIMS`` it has, e.g. 850 on an hPa axis). Everything comes out
as float32 ``(time, y, x, channel)``; ``y``/``x`` are the variable's two non-time, non-level
dimensions in the file's own order and orientation (no flipping).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from jax_corrdiff.data.errors import (
    DataError,
    EmptyTimeRangeError,
    ForecastLayoutError,
    GridMismatchError,
    MissingLeadTimeError,
    MissingLevelError,
    MissingVariableError,
    NonFiniteDataError,
)

LEVEL_DIMS = ("level", "plev", "pressure", "isobaricInhPa", "lev")
LAT_NAMES = ("lat", "latitude", "XLAT", "nav_lat")
LON_NAMES = ("lon", "longitude", "XLONG", "nav_lon")
# Forecast inputs (``data.lead_times``): the initialization and lead-time dimensions.
INIT_DIMS = ("init_time", "forecast_reference_time", "time")
LEAD_DIMS = ("lead_time", "step", "prediction_timedelta")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    level: float | None = None

    @classmethod
    def parse(cls, spec: str) -> FieldSpec:
        name, sep, level = str(spec).partition("@")
        if not name or (sep and not level):
            raise ValueError(f"field {spec!r}: expected 'name' or 'name@level'")
        return cls(name, float(level) if sep else None)

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}@{self.level:g}"


def time_str(t) -> str:
    return str(np.datetime64(t, "s"))


def decode_times(array) -> np.ndarray:
    """A Zarr time array (CF ``units``/``calendar`` attributes, or already datetime64) as datetime64[ns]."""
    if "units" in array.attrs:
        values = xr.coding.times.decode_cf_datetime(
            array[:], array.attrs["units"], array.attrs.get("calendar", "standard")
        )
        return np.asarray(values).astype("datetime64[ns]")
    return np.asarray(array[:]).astype("datetime64[ns]")


def expand_paths(patterns: Sequence[str], what: str) -> list[str]:
    """Paths and glob patterns -> existing paths (each pattern's matches sorted)."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"{what}: no file matches {pattern!r}")
            paths.extend(matches)
        elif os.path.exists(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"{what}: {pattern} does not exist")
    if not paths:
        raise ValueError(f"{what}: no paths given")
    return paths


def is_zarr(path: str) -> bool:
    """The one rule for "is this Zarr?": a ``*.zarr`` path, or any directory (anything else is a file
    for netCDF4/h5netcdf). Holds for outputs not written yet too."""
    return path.rstrip("/").endswith(".zarr") or os.path.isdir(path)


def open_dataset(path: str) -> xr.Dataset:
    """An xarray dataset from a Zarr store (``is_zarr``) or a NetCDF-like file, opened lazily."""
    return xr.open_zarr(path) if is_zarr(path) else xr.open_dataset(path)


def _select_level(da: xr.DataArray, path: str, spec: FieldSpec) -> xr.DataArray:
    level_dims = [d for d in da.dims if d in LEVEL_DIMS]
    if spec.level is None:
        if level_dims:
            levels = da[level_dims[0]].values
            raise MissingLevelError(
                path,
                spec.name,
                None,
                levels,
                reason=f"it has levels {', '.join(f'{v:g}' for v in levels)}; name one as '{spec.name}@LEVEL'",
            )
        return da
    if not level_dims:
        raise MissingLevelError(
            path,
            spec.name,
            spec.level,
            [],
            reason=f"{spec.name!r} has no vertical dimension (looked for {', '.join(LEVEL_DIMS)})",
        )
    levels = np.asarray(da[level_dims[0]].values, np.float64)
    match = np.isclose(levels, spec.level)
    if not match.any():
        raise MissingLevelError(path, spec.name, spec.level, [f"{v:g}" for v in levels])
    return da.isel({level_dims[0]: int(np.argmax(match))})


def _lat_lon(ds: xr.Dataset, dims: tuple[str, str]):
    """(lat2d, lon2d, regular) where regular = (lat1d, lon1d) for a regular grid, else None."""
    lat = next((ds[n] for n in LAT_NAMES if n in ds.variables), None)
    lon = next((ds[n] for n in LON_NAMES if n in ds.variables), None)
    if lat is None or lon is None:
        return None, None, None
    if lat.ndim == 1 and lon.ndim == 1 and lat.dims == dims[:1] and lon.dims == dims[1:]:
        lat1, lon1 = lat.values.astype(np.float64), lon.values.astype(np.float64)
        lat2, lon2 = np.meshgrid(lat1, lon1, indexing="ij")
        return lat2, lon2, (lat1, lon1)
    if set(lat.dims) == set(dims) and set(lon.dims) == set(dims):
        return lat.transpose(*dims).values.astype(np.float64), lon.transpose(*dims).values.astype(np.float64), None
    return None, None, None


def _merge_times(
    file_times: list[np.ndarray], paths: Sequence[str], what: str, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The times of several files as one sorted axis: (times, file of each, index within its
    file). A time found twice is an error naming the file."""
    times = np.concatenate(file_times)
    file_of = np.concatenate([np.full(len(t), i) for i, t in enumerate(file_times)])
    local = np.concatenate([np.arange(len(t)) for t in file_times])
    order = np.argsort(times, kind="stable")
    dup = np.nonzero(np.diff(times[order]) == np.timedelta64(0))[0]
    if len(dup):
        i = order[dup[0]]
        raise DataError(f"{paths[file_of[i]]}: {label} {time_str(times[i])} appears twice in the {what} files")
    return times[order], file_of[order], local[order]


class _GriddedFiles:
    """Named fields of one or more files on one grid, read by one loop for every kind of source:
    each file is opened, each field found (and its level picked); the subclass names the field's
    leading (record) dimensions, and the two dimensions left are its grid, taken from the first
    field and checked on the rest. The subclass then indexes the files' records (``_add_file``,
    ``_index_files``).

    ``lat``/``lon`` are 2-D (or None when the file has no lat/lon); ``regular`` holds the 1-D
    lat/lon of a regular grid (else None); ``shape`` is the grid's (y, x).
    """

    def __init__(self, patterns: Sequence[str], fields: Sequence[str], what: str):
        self.what = what
        self.paths = expand_paths(patterns, what)
        self.fields = [FieldSpec.parse(f) for f in fields]
        if not self.fields:
            raise ValueError(f"{what}: no variables named")
        self.shape = self.lat = self.lon = self.regular = None
        self._arrays = []  # per file, per field: the DataArray, dims (*leading, y, x)
        for path in self.paths:
            ds = open_dataset(path)
            arrays = [self._read_field(ds, spec, path) for spec in self.fields]
            self._arrays.append(arrays)
            self._add_file(ds, arrays, path)
        self._index_files()

    def _read_field(self, ds: xr.Dataset, spec: FieldSpec, path: str) -> xr.DataArray:
        if spec.name not in ds.data_vars:
            raise MissingVariableError(path, spec.name, list(ds.data_vars))
        da = _select_level(ds[spec.name], path, spec)
        leading = self._leading_dims(da, spec, path)
        spatial = tuple(d for d in da.dims if d not in leading)
        if len(spatial) != 2:
            raise self._layout_error(path, spec, da.dims, leading)
        shape = tuple(da.sizes[d] for d in spatial)
        if self.shape is None:
            self.shape = shape
            self.lat, self.lon, self.regular = _lat_lon(ds, spatial)
        elif shape != self.shape:
            raise GridMismatchError(path, f"{self.what} field {spec}", f"grid {shape} differs from {self.shape}")
        return da.transpose(*leading, *spatial)

    def file_of(self, index: int) -> str:
        """The file holding record ``index``."""
        return self.paths[self._file[index]]


class FieldSource(_GriddedFiles):
    """Named fields of files with a ``time`` axis (or ``static`` fields, without one), concatenated
    along time and read as (T, H, W, C). ``times`` is sorted (datetime64[ns]); None for static files.
    """

    def __init__(self, patterns: Sequence[str], fields: Sequence[str], what: str, *, static: bool = False):
        self.static = static
        self._file_times = []
        super().__init__(patterns, fields, what)

    def _leading_dims(self, da: xr.DataArray, spec: FieldSpec, path: str) -> tuple[str, ...]:
        has_time = "time" in da.dims
        if has_time == self.static:
            raise DataError(f"{path}: {spec} {'has' if has_time else 'has no'} 'time' dimension ({self.what})")
        return ("time",) if has_time else ()

    def _layout_error(self, path: str, spec: FieldSpec, dims, leading) -> DataError:
        return DataError(f"{path}: {spec} has dimensions {dims}; expected (time,) y, x")

    def _add_file(self, ds: xr.Dataset, arrays: list, path: str) -> None:
        if self.static:
            return
        if not np.issubdtype(ds["time"].dtype, np.datetime64):
            raise DataError(f"{path}: 'time' does not decode to datetime64 (dtype {ds['time'].dtype})")
        self._file_times.append(ds["time"].values.astype("datetime64[ns]"))

    def _index_files(self) -> None:
        self.times = None
        if not self.static:
            self.times, self._file, self._local = _merge_times(self._file_times, self.paths, self.what, "time")

    def times_of(self, indices) -> np.ndarray:
        return self.times[np.asarray(indices)]

    def read(self, indices) -> np.ndarray:
        """The fields at positions ``indices`` of ``times``: float32 (T, H, W, C)."""
        indices = np.asarray(indices)
        out = np.empty((len(indices), *self.shape, len(self.fields)), np.float32)
        files = self._file[indices]
        for f in np.unique(files):
            rows = np.nonzero(files == f)[0]
            for c, da in enumerate(self._arrays[f]):
                out[rows, ..., c] = da.isel(time=self._local[indices[rows]]).values
        return out

    def read_static(self) -> np.ndarray:
        """Static fields (first file): float32 (H, W, C)."""
        return np.stack([da.values for da in self._arrays[0]], axis=-1).astype(np.float32)


def select_period(times: np.ndarray, period: Sequence[str], path: str) -> np.ndarray:
    """Indices of ``times`` (sorted) within [start, end], inclusive at the precision written:
    an end of "2019-03-20" keeps every step of that day (pandas partial-string semantics)."""
    start, end = (str(p) for p in period)
    index = np.arange(len(times))[pd.DatetimeIndex(times).slice_indexer(start, end)]
    if len(index) == 0:
        raise EmptyTimeRangeError(path, (start, end), (time_str(times[0]), time_str(times[-1])))
    return index


def apply_nan_policy(values, names, policy: str, fill_value: float, *, paths, times) -> np.ndarray:
    """Check (T, H, W, C) ``values`` for NaN/inf, in place. Returns per-channel counts.

    ``paths[t]`` and ``times[t]`` locate row t for error messages (``times`` may hold None for
    static fields). "error" raises NonFiniteDataError at the first bad time step of the first bad
    channel; "fill" replaces the values with ``fill_value``.
    """
    bad = ~np.isfinite(values)
    counts = bad.sum(axis=(0, 1, 2)).astype(np.int64)
    if not counts.any():
        return counts
    if policy == "error":
        c = int(np.argmax(counts > 0))
        per_step = bad[..., c].reshape(len(values), -1).sum(axis=1)
        t = int(np.argmax(per_step > 0))
        when = None if times[t] is None else time_str(times[t])
        raise NonFiniteDataError(paths[t], names[c], when, int(per_step[t]))
    values[bad] = fill_value
    return counts


def _as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class CwbStore:
    """PhysicsNeMo's CWB Zarr: ``cwb``/``era5`` (time, channel, south_north, west_east), channel
    names in ``cwb_variable``/``era5_variable`` with optional ``*_pressure`` levels (NaN for
    surface), ``XLAT``/``XLONG``, CF-encoded ``time``; optional ``cwb_valid`` (time,) and
    ``era5_valid`` (time, channel) flags mark usable steps."""

    def __init__(self, path: str, target_fields: Sequence[str], input_fields: Sequence[str]):
        self.path = path
        g = zarr.open_group(path, mode="r")
        for key in ("cwb", "era5", "cwb_variable", "era5_variable", "XLAT", "XLONG", "time"):
            if key not in g:
                raise MissingVariableError(path, key, sorted(g.array_keys()))
        self.target_index = self._channel_index(g, "cwb", target_fields)
        self.input_index = self._channel_index(g, "era5", input_fields)
        self.times = decode_times(g["time"])
        valid = np.ones(len(self.times), bool)
        if "cwb_valid" in g:
            valid &= np.asarray(g["cwb_valid"][:]) != 0
        if "era5_valid" in g:
            valid &= np.all(np.asarray(g["era5_valid"][:])[:, self.input_index] != 0, axis=1)
        self.valid = valid
        self.lat, self.lon = np.asarray(g["XLAT"][:], np.float64), np.asarray(g["XLONG"][:], np.float64)
        self.shape = tuple(g["cwb"].shape[-2:])
        if self.lat.shape != self.shape or tuple(g["era5"].shape[-2:]) != self.shape:
            raise GridMismatchError(
                path,
                "cwb/era5/XLAT grids",
                f"cwb {self.shape}, era5 {tuple(g['era5'].shape[-2:])}, XLAT {self.lat.shape}",
            )

    def _channel_index(self, g, prefix: str, fields: Sequence[str]) -> list[int]:
        names = [_as_str(v) for v in g[f"{prefix}_variable"][:]]
        key = f"{prefix}_pressure"
        levels = np.asarray(g[key][:], np.float64) if key in g else np.full(len(names), np.nan)
        labels = [n if np.isnan(lv) else f"{n}@{lv:g}" for n, lv in zip(names, levels)]
        index = []
        for spec in map(FieldSpec.parse, fields):
            candidates = [i for i, n in enumerate(names) if n == spec.name]
            if not candidates:
                raise MissingVariableError(self.path, f"{prefix} channel {spec.name}", labels)
            if spec.level is None:
                match = [i for i in candidates if np.isnan(levels[i])]
            else:
                match = [i for i in candidates if np.isclose(levels[i], spec.level)]
            if not match:
                raise MissingLevelError(
                    self.path, f"{prefix} channel {spec.name}", spec.level, [labels[i] for i in candidates]
                )
            index.append(match[0])
        return index


def read_cwb_channels(array, time_index, channel_index) -> np.ndarray:
    """float32 (T, H, W, C) from a CWB array laid out (time, channel, y, x)."""
    return np.moveaxis(array.get_orthogonal_selection((time_index, channel_index)), 1, -1).astype(np.float32)


_HOURS_PER_UNIT = {"d": 24.0, "h": 1.0, "m": 1 / 60, "s": 1 / 3600}


def lead_hours(coord: xr.DataArray) -> np.ndarray:
    """Lead times in hours (float64) from a timedelta64 coordinate, or a numeric one in hours
    (or in the ``units`` it names: days, hours, minutes, seconds)."""
    values = np.asarray(coord.values)
    if np.issubdtype(values.dtype, np.timedelta64):
        return values / np.timedelta64(1, "h")
    units = str(coord.attrs.get("units", "hours")).strip().lower()
    scale = _HOURS_PER_UNIT.get(units[:1] if units[:3] != "min" else "m", 1.0)
    return values.astype(np.float64) * scale


class ForecastSource(_GriddedFiles):
    """Named fields of forecast files laid out ``(init, lead, [level,] y, x)``, at ``lead_times``.

    The init dimension is the first of ``INIT_DIMS`` a variable has, the lead dimension the first
    of ``LEAD_DIMS`` (timedelta64, or numbers in hours). Files are concatenated along init time;
    each must hold every lead time asked for. ``init_times`` is sorted (datetime64[ns]);
    ``lat``/``lon``/``regular``/``shape`` are as for ``FieldSource`` (so ``input_regridder``
    takes either). ``read(init_index, lead_index)`` -> float32 (N, H, W, C).
    """

    def __init__(self, patterns: Sequence[str], fields: Sequence[str], lead_times: Sequence[float], what: str):
        self.lead_times = np.asarray([float(h) for h in lead_times], np.float64)
        self._file_inits, self._lead_positions = [], []
        super().__init__(patterns, fields, what)

    def _leading_dims(self, da: xr.DataArray, spec: FieldSpec, path: str) -> tuple[str, str]:
        init_dim = next((d for d in INIT_DIMS if d in da.dims), None)
        lead_dim = next((d for d in LEAD_DIMS if d in da.dims), None)
        if init_dim is None:
            raise ForecastLayoutError(
                path, str(spec), f"dimensions {da.dims} lack an init-time dimension ({', '.join(INIT_DIMS)})"
            )
        if lead_dim is None:
            raise ForecastLayoutError(
                path, str(spec), f"dimensions {da.dims} lack a lead-time dimension ({', '.join(LEAD_DIMS)})"
            )
        if not np.issubdtype(da[init_dim].dtype, np.datetime64):
            raise ForecastLayoutError(
                path, str(spec), f"{init_dim!r} does not decode to datetime64 (dtype {da[init_dim].dtype})"
            )
        hours = lead_hours(da[lead_dim])
        missing = [h for h in self.lead_times if not np.isclose(hours, h).any()]
        if missing:
            raise MissingLeadTimeError(path, missing, hours)
        return init_dim, lead_dim

    def _layout_error(self, path: str, spec: FieldSpec, dims, leading) -> ForecastLayoutError:
        return ForecastLayoutError(
            path, str(spec), f"dimensions {dims}; expected ({leading[0]}, {leading[1]}, [level,] y, x)"
        )

    def _add_file(self, ds: xr.Dataset, arrays: list, path: str) -> None:
        """The file's init times (the same for every field) and each field's position of every lead time."""
        inits = arrays[0][arrays[0].dims[0]].values.astype("datetime64[ns]")
        for spec, da in zip(self.fields, arrays):
            if not np.array_equal(inits, da[da.dims[0]].values.astype("datetime64[ns]")):
                raise ForecastLayoutError(path, str(spec), "its init times differ from the file's other variables'")
        hours = [lead_hours(da[da.dims[1]]) for da in arrays]
        self._lead_positions.append(
            [np.array([np.nonzero(np.isclose(h, t))[0][0] for t in self.lead_times]) for h in hours]
        )
        self._file_inits.append(inits)

    def _index_files(self) -> None:
        self.init_times, self._file, self._local = _merge_times(self._file_inits, self.paths, self.what, "init time")

    def valid_times(self, init_index, lead_index) -> np.ndarray:
        """init + lead (datetime64[ns]) of the given samples."""
        lead_ns = np.round(self.lead_times[np.asarray(lead_index)] * 3600e9).astype("timedelta64[ns]")
        return self.init_times[np.asarray(init_index)] + lead_ns

    times_of = valid_times

    def read(self, init_index, lead_index) -> np.ndarray:
        """Fields of the samples (init_times[init_index], lead_times[lead_index]): float32 (N, H, W, C)."""
        init_index, lead_index = np.asarray(init_index), np.asarray(lead_index)
        out = np.empty((len(init_index), *self.shape, len(self.fields)), np.float32)
        files = self._file[init_index]
        for f in np.unique(files):
            rows = np.nonzero(files == f)[0]
            inits = xr.DataArray(self._local[init_index[rows]], dims="sample")
            for c, (da, lead_pos) in enumerate(zip(self._arrays[f], self._lead_positions[f])):
                leads = xr.DataArray(lead_pos[lead_index[rows]], dims="sample")
                out[rows, ..., c] = da.isel({da.dims[0]: inits, da.dims[1]: leads}).transpose("sample", ...).values
        return out
