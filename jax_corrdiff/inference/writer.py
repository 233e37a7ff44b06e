"""CF-1.8 output of generation, written as it goes (NetCDF-4 or Zarr).

The file is laid out for all requested times up front; each batch fills its rows and then
sets ``completed[t] = 1``. A crash keeps every finished time, and a rerun with the same
times skips them. The global attribute ``run_settings`` (JSON) holds what defines the run (seed,
sampler, model, input, members): a rerun with other settings is refused (``RunMismatchError``),
so one file never mixes two runs.

Variables, in physical units, for each target field NAME (levelled fields share ``level``):
    NAME               (time, ensemble, [level,] y, x)   CorrDiff members: regression mean + residual
    NAME_regression    (time, [level,] y, x)             the regression (stage 1) mean
    NAME_interpolated  (time, [level,] y, x)             coarse input, bilinear on the fine grid (if an input)
    NAME_truth         (time, [level,] y, x)             truth (coarsened-truth mode)
    NAME_bcsd          (time, [level,] y, x)             extra baselines, where the generator gives them
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import netCDF4
import numpy as np
import zarr

from jax_corrdiff.data.sources import FieldSpec, is_zarr

TIME_UNITS = "hours since 1970-01-01 00:00:00"
RUN_SETTINGS = "run_settings"  # global attribute: JSON of what defines the run
# Deterministic baselines a generator may add beside the regression mean and the interpolation.
BASELINE_COMMENTS = {"bcsd": "BCSD baseline: quantile-mapped coarse field, disaggregated with the fine climatology"}


class RunMismatchError(ValueError):
    """The output file exists and was written by a run with other settings."""

    def __init__(self, path: str, differences: dict[str, tuple]):
        self.path, self.differences = path, differences
        listed = "; ".join(f"{k}: file {old!r}, this run {new!r}" for k, (old, new) in differences.items())
        super().__init__(
            f"{path} holds a run with other settings ({listed}); rerun with the file's settings to finish it, "
            "or write a new file (another --output, or --overwrite to replace this one)"
        )


@dataclasses.dataclass(frozen=True)
class Field:
    """An output variable: its channels (in model channel order) and their levels."""

    name: str
    channels: tuple[int, ...]
    levels: tuple[float | None, ...]


def group_channels(channels: Sequence[str]) -> tuple[list[Field], list[float]]:
    """Channels "name" / "name@level" -> output fields and the shared sorted level axis."""
    specs = [FieldSpec.parse(c) for c in channels]
    names = list(dict.fromkeys(s.name for s in specs))
    fields = [Field(n, *zip(*[(i, s.level) for i, s in enumerate(specs) if s.name == n])) for n in names]
    levels = sorted({s.level for s in specs if s.level is not None})
    for f in fields:
        if len(f.channels) > 1 and None in f.levels:
            raise ValueError(f"{f.name} appears both with and without a level")
    return fields, levels


def _hours(times: np.ndarray) -> np.ndarray:
    return (times.astype("datetime64[s]").astype(np.int64) / 3600.0).astype(np.float64)


class EnsembleWriter:
    """Opens (or creates) ``path`` for ``times``; ``write(start, ...)`` fills rows start.."""

    def __init__(
        self,
        path: str,
        *,
        times: np.ndarray,
        members: int,
        lat: np.ndarray,
        lon: np.ndarray,
        target_channels: Sequence[str],
        input_channels: Sequence[str],
        has_truth: bool,
        variable_attrs: dict[str, dict],
        global_attrs: dict,
        run_settings: dict,
        init_times: np.ndarray | None = None,
        baselines: Sequence[str] = (),
    ):
        unknown = set(baselines) - set(BASELINE_COMMENTS)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)} (known: {sorted(BASELINE_COMMENTS)})")
        self.path = path
        self.baselines = tuple(baselines)
        self.fields, self.levels = group_channels(target_channels)
        self.interpolated = {
            f.name: [list(input_channels).index(c) for c in self._names(f, target_channels)]
            for f in self.fields
            if all(c in input_channels for c in self._names(f, target_channels))
        }
        self.has_truth = has_truth
        self.coordinates = "lat lon" if init_times is None else "lat lon forecast_reference_time"
        self.zarr = is_zarr(path)
        hours = _hours(times)
        settings = json.dumps(run_settings, sort_keys=True)
        if os.path.exists(path):
            self._open_existing(hours, members, lat.shape)
            self._check_run_settings(json.loads(settings))
        else:
            self._create(hours, members, lat, lon, variable_attrs, {**global_attrs, RUN_SETTINGS: settings}, init_times)

    @staticmethod
    def _names(field: Field, channels: Sequence[str]) -> list[str]:
        return [channels[i] for i in field.channels]

    # ----------------------------------------------------------------- layout
    def _variables(self, variable_attrs: dict):
        lev = ("level",) if self.levels else ()
        for f in self.fields:
            dims = lev if f.levels[0] is not None else ()
            attrs = {**variable_attrs.get(f.name, {}), "coordinates": self.coordinates}
            yield f.name, ("time", "ensemble", *dims, "y", "x"), attrs
            yield f"{f.name}_regression", ("time", *dims, "y", "x"), {**attrs, "comment": "CorrDiff regression mean"}
            if f.name in self.interpolated:
                yield (
                    f"{f.name}_interpolated",
                    ("time", *dims, "y", "x"),
                    {**attrs, "comment": "coarse input, bilinearly interpolated"},
                )
            if self.has_truth:
                yield f"{f.name}_truth", ("time", *dims, "y", "x"), {**attrs, "comment": "truth"}
            for baseline in self.baselines:
                yield (
                    f"{f.name}_{baseline}",
                    ("time", *dims, "y", "x"),
                    {**attrs, "comment": BASELINE_COMMENTS[baseline]},
                )

    def _coordinates(self, hours, members, lat, lon, init_times) -> list[tuple]:
        """(name, dims, values, attrs) of every coordinate-like variable, ``completed`` included."""
        time_attrs = {"units": TIME_UNITS, "calendar": "standard"}
        flags = {
            "long_name": "time step written",
            "flag_values": np.array([0, 1], np.int8),
            "flag_meanings": "pending written",
        }
        coords = [
            ("time", ("time",), hours, {**time_attrs, "standard_name": "time"}),
            ("ensemble", ("ensemble",), np.arange(members, dtype=np.int32), {"long_name": "ensemble member"}),
            ("y", ("y",), np.arange(lat.shape[0], dtype=np.int32), {"long_name": "grid row"}),
            ("x", ("x",), np.arange(lat.shape[1], dtype=np.int32), {"long_name": "grid column"}),
            ("lat", ("y", "x"), lat.astype(np.float32), {"units": "degrees_north", "standard_name": "latitude"}),
            ("lon", ("y", "x"), lon.astype(np.float32), {"units": "degrees_east", "standard_name": "longitude"}),
            ("completed", ("time",), np.zeros(len(hours), np.int8), flags),
        ]
        if self.levels:
            coords.append(("level", ("level",), np.asarray(self.levels, np.float64), {"long_name": "vertical level"}))
        if init_times is not None:  # forecast inputs: the initialization of each valid time
            attrs = {**time_attrs, "standard_name": "forecast_reference_time"}
            coords.append(("forecast_reference_time", ("time",), _hours(init_times), attrs))
        return coords

    def _create(self, hours, members, lat, lon, variable_attrs, global_attrs, init_times):
        """Write the empty file under a temporary name, then move it into place."""
        sizes = {"time": len(hours), "ensemble": members, "y": lat.shape[0], "x": lat.shape[1]}
        if self.levels:
            sizes["level"] = len(self.levels)
        coords = self._coordinates(hours, members, lat, lon, init_times)
        # One chunk per time, member and level: batches write whole chunks.
        variables = [
            (
                name,
                dims,
                tuple(sizes[d] for d in dims),
                tuple(1 if d in ("time", "ensemble", "level") else sizes[d] for d in dims),
                attrs,
            )
            for name, dims, attrs in self._variables(variable_attrs)
        ]
        tmp = self.path + ".partial"
        create = _create_zarr if self.zarr else _create_netcdf
        create(tmp, {"Conventions": "CF-1.8", **global_attrs}, sizes, coords, variables)
        os.replace(tmp, self.path)
        self.completed = np.zeros(len(hours), bool)

    def _open_existing(self, hours, members, shape):
        time, ensemble, lat, completed = (self._read(v) for v in ("time", "ensemble", "lat", "completed"))
        if len(time) != len(hours) or not np.allclose(time, hours) or len(ensemble) != members or lat.shape != shape:
            raise ValueError(
                f"{self.path} exists with other times/members/grid ({len(time)} times, {len(ensemble)} members, "
                f"grid {lat.shape}); choose a new output file or rerun with the same options"
            )
        self.completed = completed.astype(bool)

    def _check_run_settings(self, run_settings: dict) -> None:
        if self.zarr:
            stored = zarr.open_group(self.path, mode="r").attrs.get(RUN_SETTINGS)
        else:
            with netCDF4.Dataset(self.path) as nc:
                stored = nc.getncattr(RUN_SETTINGS) if RUN_SETTINGS in nc.ncattrs() else None
        stored = json.loads(stored) if stored else {}
        keys = sorted(set(stored) | set(run_settings))
        differences = {k: (stored.get(k), run_settings.get(k)) for k in keys if stored.get(k) != run_settings.get(k)}
        if differences:
            raise RunMismatchError(self.path, differences)

    def _read(self, name: str) -> np.ndarray:
        if self.zarr:
            return np.asarray(zarr.open_group(self.path, mode="r")[name][...])
        with netCDF4.Dataset(self.path) as nc:
            nc.set_auto_mask(False)
            return np.asarray(nc[name][...])

    # ------------------------------------------------------------------ write
    def write(self, start: int, prediction, regression, inputs, truth, baselines: dict | None = None) -> None:
        """Rows start..start+B: prediction (B, M, H, W, C), regression (B, H, W, C),
        inputs (B, H, W, C_in) interpolated coarse input, truth (B, H, W, C) or None, and each of
        the writer's ``baselines`` as {name: (B, H, W, C)}."""
        rows = slice(start, start + len(regression))
        values = {}
        for f in self.fields:
            idx = list(f.channels)
            levelled = f.levels[0] is not None
            values[f.name] = self._arrange(prediction[..., idx], f, levelled, member_axis=True)
            values[f"{f.name}_regression"] = self._arrange(regression[..., idx], f, levelled)
            if f.name in self.interpolated:
                values[f"{f.name}_interpolated"] = self._arrange(inputs[..., self.interpolated[f.name]], f, levelled)
            if self.has_truth:
                values[f"{f.name}_truth"] = self._arrange(truth[..., idx], f, levelled)
            for baseline in self.baselines:
                values[f"{f.name}_{baseline}"] = self._arrange(baselines[baseline][..., idx], f, levelled)
        done = np.ones(rows.stop - rows.start, np.int8)
        if self.zarr:
            root = zarr.open_group(self.path, mode="r+")
            for name, v in values.items():
                root[name][rows] = v
            root["completed"][rows] = done
        else:
            with netCDF4.Dataset(self.path, "a") as nc:
                for name, v in values.items():
                    nc[name][rows] = v
                nc["completed"][rows] = done
        self.completed[rows] = True

    def _arrange(self, x: np.ndarray, field: Field, levelled: bool, member_axis: bool = False) -> np.ndarray:
        """(..., H, W, C_field) -> (..., [level,] H, W) on the shared level axis (NaN where absent)."""
        x = np.moveaxis(np.asarray(x, np.float32), -1, -3)  # (..., C, H, W)
        if not levelled:
            return x[..., 0, :, :]
        out = np.full((*x.shape[:-3], len(self.levels), *x.shape[-2:]), np.nan, np.float32)
        for c, level in enumerate(field.levels):
            out[..., self.levels.index(level), :, :] = x[..., c, :, :]
        return out


def _jsonable(attrs: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}


def _create_zarr(path: str, attrs: dict, sizes: dict, coords: list, variables: list) -> None:
    root = zarr.open_group(path, mode="w", zarr_format=2)
    root.attrs.update(_jsonable(attrs))
    for name, dims, values, var_attrs in coords:
        arr = root.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=values.shape or None, fill_value=None
        )
        arr[...] = values
        arr.attrs.update({"_ARRAY_DIMENSIONS": list(dims), **_jsonable(var_attrs)})
    for name, dims, shape, chunks, var_attrs in variables:
        arr = root.create_array(name, shape=shape, dtype="float32", chunks=chunks, fill_value=np.nan)
        arr.attrs.update({"_ARRAY_DIMENSIONS": list(dims), **_jsonable(var_attrs)})
    zarr.consolidate_metadata(path)


def _create_netcdf(path: str, attrs: dict, sizes: dict, coords: list, variables: list) -> None:
    with netCDF4.Dataset(path, "w") as nc:
        nc.setncatts(attrs)
        for dim, size in sizes.items():
            nc.createDimension(dim, size)
        for name, dims, values, var_attrs in coords:
            var = nc.createVariable(name, values.dtype, dims)
            var.setncatts(var_attrs)
            var[...] = values
        for name, dims, _, chunks, var_attrs in variables:
            fill = np.float32(np.nan)
            var = nc.createVariable(name, "f4", dims, zlib=True, complevel=1, chunksizes=chunks, fill_value=fill)
            var.setncatts(var_attrs)
