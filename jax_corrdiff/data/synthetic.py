"""A small Zarr with the exact layout of PhysicsNeMo's CWB (Taiwan) CorrDiff dataset.

For tests, and to show users what ``data.format = "cwb"`` expects:
    cwb            (time, cwb_channel, south_north, west_east)  float32  2 km target fields
    era5           (time, era5_channel, south_north, west_east) float32  ERA5 already on the 2 km grid
    cwb_variable   (cwb_channel)   str      cwb_pressure  (cwb_channel)  float, NaN for surface
    era5_variable  (era5_channel)  str      era5_pressure (era5_channel) float, NaN for surface
    XLAT, XLONG    (south_north, west_east)
    time           (time)          CF-encoded ("hours since ...")
    cwb_center, cwb_scale, era5_center, era5_scale (channel); cwb_valid (time) int8;
    era5_valid (time, era5_channel) bool    -- also in the real store; the reader uses *_valid
The fields are random but smooth (a few long Fourier modes) with plausible magnitudes.

``write_china3km_dataset`` writes the China 3 km CorrDiff layout (fine targets, a 0.25 deg
forecast file with init/lead time axes, static fields): see its docstring.

A data config may name one of ``SYNTHETIC_DATASETS`` (``data.synthetic_dataset``): preparation
then writes it under the work directory (``write_synthetic_dataset``) and reads its files.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import xarray as xr

from jax_corrdiff.data.sources import FieldSpec, open_dataset

TAIWAN_CWB_VARIABLES = ("maximum_radar_reflectivity", "temperature_2m", "eastward_wind_10m", "northward_wind_10m")
TAIWAN_ERA5_VARIABLES = (
    "total_column_water_vapour",
    "geopotential@500",
    "temperature@500",
    "eastward_wind@500",
    "northward_wind@500",
    "geopotential@850",
    "temperature@850",
    "eastward_wind@850",
    "northward_wind@850",
    "temperature_2m",
    "eastward_wind_10m",
    "northward_wind_10m",
)

# (name, level) -> (mean, amplitude) in the variable's units; unknown names get (0, 1).
_MAGNITUDES = {
    ("maximum_radar_reflectivity", None): (15.0, 15.0),  # dBZ, clipped at 0 below
    ("temperature_2m", None): (295.0, 5.0),  # K
    ("eastward_wind_10m", None): (0.0, 5.0),  # m s-1
    ("northward_wind_10m", None): (0.0, 5.0),
    ("total_column_water_vapour", None): (45.0, 10.0),  # kg m-2
    ("geopotential", 500.0): (57_500.0, 500.0),  # m2 s-2
    ("geopotential", 850.0): (14_800.0, 300.0),
    ("temperature", 500.0): (267.0, 3.0),
    ("temperature", 850.0): (289.0, 4.0),
    ("eastward_wind", 500.0): (5.0, 10.0),
    ("northward_wind", 500.0): (0.0, 8.0),
    ("eastward_wind", 850.0): (2.0, 8.0),
    ("northward_wind", 850.0): (0.0, 6.0),
}


def _smooth_fields(rng, n_fields: int, n_times: int, h: int, w: int, max_wavenumber: int) -> np.ndarray:
    """(n_fields, time, h, w) sums of 6 random plane waves, scaled to unit std per field."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    t = np.arange(n_times)[:, None, None]
    out = np.zeros((n_fields, n_times, h, w))
    for f in range(n_fields):
        for _ in range(6):
            ky, kx = rng.integers(-max_wavenumber, max_wavenumber + 1, size=2)
            omega, phase = rng.uniform(0.1, 0.5), rng.uniform(0, 2 * np.pi)
            out[f] += rng.normal() * np.sin(2 * np.pi * (ky * y + kx * x) + omega * t + phase)
        out[f] /= out[f].std() + 1e-12
    return out


def _scaled(rng, specs, n_times, h, w, max_wavenumber):
    z = _smooth_fields(rng, len(specs), n_times, h, w, max_wavenumber)
    values = np.empty((n_times, len(specs), h, w), np.float32)
    for c, spec in enumerate(specs):
        mean, amp = _MAGNITUDES.get((spec.name, spec.level), (0.0, 1.0))
        values[:, c] = mean + amp * z[c]
        if spec.name == "maximum_radar_reflectivity":
            values[:, c] = np.maximum(values[:, c], 0.0)
    return values


def _names_levels(specs, prefix: str) -> dict:
    """``<prefix>_variable`` and ``<prefix>_pressure`` (NaN for surface fields) of the CWB layout."""
    levels = np.array([np.nan if s.level is None else s.level for s in specs])
    return {
        f"{prefix}_variable": ((f"{prefix}_channel",), np.array([s.name for s in specs])),
        f"{prefix}_pressure": ((f"{prefix}_channel",), levels),
    }


def write_cwb_zarr(path: str, *, times, height: int, width: int, seed: int = 0) -> str:
    """Write a CWB-layout Zarr (v2, consolidated) of the Taiwan channels to ``path``; ``times``
    is a sequence of datetime-likes. Returns ``path``."""
    rng = np.random.default_rng(seed)
    times = np.asarray(times, dtype="datetime64[ns]")
    cwb_specs = [FieldSpec.parse(v) for v in TAIWAN_CWB_VARIABLES]
    era5_specs = [FieldSpec.parse(v) for v in TAIWAN_ERA5_VARIABLES]
    cwb = _scaled(rng, cwb_specs, len(times), height, width, max_wavenumber=4)
    era5 = _scaled(rng, era5_specs, len(times), height, width, max_wavenumber=1)  # ERA5: larger scales
    # A Taiwan-sized box, slightly curvilinear like a Lambert grid: ~2 km steps.
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    lat = 21.9 + 0.018 * ii + 0.0005 * (jj - width / 2) / max(width, 1)
    lon = 120.0 + 0.0195 * jj + 0.002 * (ii - height / 2) / max(height, 1)
    grid = ("south_north", "west_east")
    ds = xr.Dataset(
        {
            "cwb": (("time", "cwb_channel", *grid), cwb),
            "era5": (("time", "era5_channel", *grid), era5),
            **_names_levels(cwb_specs, "cwb"),
            **_names_levels(era5_specs, "era5"),
            "cwb_center": (("cwb_channel",), cwb.mean(axis=(0, 2, 3))),
            "cwb_scale": (("cwb_channel",), cwb.std(axis=(0, 2, 3))),
            "era5_center": (("era5_channel",), era5.mean(axis=(0, 2, 3))),
            "era5_scale": (("era5_channel",), era5.std(axis=(0, 2, 3))),
            "cwb_valid": (("time",), np.ones(len(times), np.int8)),
            "era5_valid": (("time", "era5_channel"), np.ones((len(times), len(era5_specs)), bool)),
        },
        coords={"time": times, "XLAT": (grid, lat), "XLONG": (grid, lon)},
    )
    encoding = {
        "time": {"units": "hours since 1990-01-01 00:00:00", "dtype": "int64"},
        "cwb": {"chunks": (1, len(cwb_specs), height, width)},
        "era5": {"chunks": (1, len(era5_specs), height, width)},
    }
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    return path


# --------------------------------------------------------------------------------------------
# China 3 km CorrDiff (Sun et al.; reference.md section 7): 25 km global forecasts -> 3 km.
# --------------------------------------------------------------------------------------------

CHINA3KM_LEVELS = (1000, 925, 850, 700, 500, 200)  # hPa
CHINA3KM_SURFACE = ("t2m", "u10", "v10", "tp")
CHINA3KM_UPPER = ("t", "u", "v", "q", "z")
# Every channel, "name" or "name@level": the targets, and the same names in the forecast inputs.
CHINA3KM_VARIABLES = (*CHINA3KM_SURFACE, *(f"{v}@{lv}" for v in CHINA3KM_UPPER for lv in CHINA3KM_LEVELS))
CHINA3KM_STATIC = ("orog", "lsm")
CHINA3KM_RESOLUTION_DEG = 0.03
CHINA3KM_FULL_SHAPE = (1670, 2500)  # (lat, lon) points: 10-60N, 70-145E at 0.03 deg
CHINA3KM_ORIGIN = (10.0, 70.0)  # (lat, lon) of the full domain's south-west point
FORECAST_RESOLUTION_DEG = 0.25
FORECAST_MARGIN_DEG = 1.0  # the synthetic forecast grid reaches this far beyond the fine box
_TITLES = {
    "target": "synthetic China 3 km CorrDiff targets (0.03 deg, regular lat/lon)",
    "forecast": "synthetic 0.25 deg global forecast (CMA-GFS / AI-model-like inputs)",
}

_ATTRS = {
    "t2m": ("K", "2 metre temperature"),
    "u10": ("m s-1", "10 metre eastward wind"),
    "v10": ("m s-1", "10 metre northward wind"),
    "tp": ("mm h-1", "total precipitation rate (hourly accumulation)"),
    "t": ("K", "temperature"),
    "u": ("m s-1", "eastward wind"),
    "v": ("m s-1", "northward wind"),
    "q": ("kg kg-1", "specific humidity"),
    "z": ("m2 s-2", "geopotential"),
    "orog": ("m", "surface height above sea level"),
    "lsm": ("1", "land-sea mask (land fraction)"),
}
# name -> (mean, amplitude); upper-air ones per level in CHINA3KM_LEVELS order.
_CHINA_SURFACE_MAG = {"t2m": (288.0, 8.0), "u10": (0.5, 4.0), "v10": (0.5, 4.0), "tp": (0.0, 1.0)}
_CHINA_UPPER_MAG = {
    "t": ([293.0, 289.0, 285.0, 276.0, 260.0, 220.0], [7.0, 6.0, 6.0, 5.0, 4.0, 3.0]),
    "u": ([1.0, 3.0, 5.0, 8.0, 14.0, 25.0], [4.0, 5.0, 6.0, 7.0, 9.0, 12.0]),
    "v": ([0.5, 1.0, 1.0, 1.0, 0.5, 0.0], [4.0, 5.0, 5.0, 6.0, 8.0, 10.0]),
    "q": ([0.012, 0.010, 0.008, 0.005, 0.002, 0.00005], [0.004, 0.0035, 0.003, 0.002, 0.0008, 0.00002]),
    "z": ([1000.0, 7500.0, 14600.0, 30500.0, 56500.0, 118000.0], [400.0, 400.0, 450.0, 550.0, 800.0, 1300.0]),
}


class _Waves:
    """A smooth random field of (lat, lon, hours): a sum of moving plane waves, unit-ish std.
    ``k`` is in cycles per ``extent`` degrees."""

    waves = 6

    def __init__(self, rng, extent: tuple[float, float], k_range: tuple[float, float]):
        n = self.waves
        self.ky = rng.uniform(*k_range, n) * rng.choice([-1, 1], n) / extent[0]
        self.kx = rng.uniform(*k_range, n) * rng.choice([-1, 1], n) / extent[1]
        self.omega = rng.uniform(0.02, 0.08, n)  # radians per hour
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.amp = rng.normal(size=n) * np.sqrt(2.0 / n)

    def __call__(self, lat: np.ndarray, lon: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """(T, H, W) for 1-D lat (H), lon (W), hours (T)."""
        out = np.zeros((len(hours), len(lat), len(lon)))
        for ky, kx, om, ph, a in zip(self.ky, self.kx, self.omega, self.phase, self.amp):
            out += a * np.sin(
                2 * np.pi * (ky * lat[None, :, None] + kx * lon[None, None, :]) + om * hours[:, None, None] + ph
            )
        return out


def _physical(name: str, level_index: int | None, z: np.ndarray) -> np.ndarray:
    if level_index is None:
        mean, amp = _CHINA_SURFACE_MAG[name]
    else:
        means, amps = _CHINA_UPPER_MAG[name]
        mean, amp = means[level_index], amps[level_index]
    if name == "tp":
        return np.maximum(0.0, 2.0 * z - 1.5).astype(np.float32)  # mm/h: dry mostly, showers
    values = mean + amp * z
    if name == "q":
        values = np.maximum(values, 0.0)
    return values.astype(np.float32)


def china3km_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D (lat, lon) of the fine grid: the full 0.03 deg domain from 10N 70E, or a sub-box of
    ``height`` x ``width`` points centred in it when smaller."""
    full_h, full_w = CHINA3KM_FULL_SHAPE
    i0, j0 = max(0, (full_h - height) // 2), max(0, (full_w - width) // 2)
    lat = CHINA3KM_ORIGIN[0] + CHINA3KM_RESOLUTION_DEG * (i0 + np.arange(height))
    lon = CHINA3KM_ORIGIN[1] + CHINA3KM_RESOLUTION_DEG * (j0 + np.arange(width))
    return np.round(lat, 6), np.round(lon, 6)


def _forecast_axis(fine: np.ndarray) -> np.ndarray:
    """0.25 deg points covering the fine axis with a FORECAST_MARGIN_DEG margin."""
    res = FORECAST_RESOLUTION_DEG
    lo, hi = np.floor((fine[0] - FORECAST_MARGIN_DEG) / res), np.ceil((fine[-1] + FORECAST_MARGIN_DEG) / res)
    return np.arange(lo, hi + 1) * res


def _china_fields(rng, lat, lon, valid_h, c_lat, c_lon, init_h, leads) -> tuple[dict, dict]:
    """{(name, level index): values} on the fine grid at the valid hours, and on the forecast grid
    (init, lead, lat, lon): a field's large-scale part plus an error growing with lead time."""
    extent = (max(lat[-1] - lat[0], 1.0), max(lon[-1] - lon[0], 1.0))
    channels = [(n, None) for n in CHINA3KM_SURFACE] + [
        (n, k) for n in CHINA3KM_UPPER for k in range(len(CHINA3KM_LEVELS))
    ]
    growth = 0.05 + 0.3 * (leads / max(leads.max(), 24.0))
    fine, coarse = {}, {}
    for name, k in channels:
        large, small, error = (_Waves(rng, extent, band) for band in ((0.3, 1.2), (3.0, 8.0), (0.3, 1.2)))
        fine[name, k] = _physical(name, k, large(lat, lon, valid_h) + 0.4 * small(lat, lon, valid_h))
        coarse[name, k] = np.stack(
            [
                _physical(
                    name,
                    k,
                    large(c_lat, c_lon, ih + leads) + growth[:, None, None] * error(c_lat, c_lon, ih + 0.5 * leads),
                )
                for ih in init_h
            ]
        )
    return fine, coarse


def _china_dataset(values: dict, dims: tuple[str, ...], coords: dict, title: str) -> xr.Dataset:
    """Surface fields on ``dims``; upper-air ones with a ``level`` axis before the last two."""
    data = {}
    for name in (*CHINA3KM_SURFACE, *CHINA3KM_UPPER):
        units, long_name = _ATTRS[name]
        if name in CHINA3KM_SURFACE:
            arr, d = values[name, None], dims
        else:
            arr = np.stack([values[name, k] for k in range(len(CHINA3KM_LEVELS))], axis=len(dims) - 2)
            d = (*dims[:-2], "level", *dims[-2:])
        data[name] = xr.Variable(d, arr, {"units": units, "long_name": long_name})
    ds = xr.Dataset(data, coords={**coords, "level": np.asarray(CHINA3KM_LEVELS, np.float64)}, attrs={"title": title})
    ds["level"].attrs.update(units="hPa", long_name="pressure level")
    ds["lat"].attrs.update(units="degrees_north")
    ds["lon"].attrs.update(units="degrees_east")
    return ds


def _china_static(rng, lat, lon) -> xr.Dataset:
    """orog (m) and lsm (0..1) on the fine grid: a smooth land fraction, hills on land."""
    extent = (max(lat[-1] - lat[0], 1.0), max(lon[-1] - lon[0], 1.0))
    land = _Waves(rng, extent, (0.5, 2.0))(lat, lon, np.zeros(1))[0]
    lsm = (1.0 / (1.0 + np.exp(-4.0 * (land + 0.3)))).astype(np.float32)
    hills = 1.0 + 0.5 * _Waves(rng, extent, (2.0, 6.0))(lat, lon, np.zeros(1))[0]
    orog = np.maximum(0.0, 1500.0 * lsm * hills).astype(np.float32)
    fields = {
        n: xr.Variable(("lat", "lon"), v, {"units": _ATTRS[n][0], "long_name": _ATTRS[n][1]})
        for n, v in (("orog", orog), ("lsm", lsm))
    }
    return xr.Dataset(fields, coords={"lat": lat, "lon": lon})


def write_china3km_dataset(
    directory: str, *, height: int = 64, width: int = 96, init_times=None, lead_times=(0, 6, 12), seed: int = 0
) -> dict[str, str]:
    """Write a small synthetic China 3 km CorrDiff dataset to ``directory``; returns the paths.

    ``target.nc``   fine 0.03 deg regular lat/lon grid (``china3km_grid``), hourly valid times
                    covering every init + lead: t2m, u10, v10, tp (time, lat, lon); t, u, v, q, z
                    (time, level, lat, lon), ``level`` in hPa (1000, 925, 850, 700, 500, 200).
    ``forecast.nc`` a 0.25 deg global-forecast-like file covering the fine box with a
                    FORECAST_MARGIN_DEG margin, latitudes north to south as in GFS/IFS output:
                    the same variables laid out (init_time, lead_time, [level,] lat, lon),
                    ``lead_time`` timedelta64. The forecast is the fine field's large-scale part
                    at the valid time plus an error growing with lead time.
    ``static.nc``   orog (m), lsm (0..1) on the fine grid (lat, lon).
    ``init_times``  datetime-likes (default: 4 inits 12 h apart from 2024-07-01T00).
    Everything is built in memory (about 34 x 4 bytes per fine point and valid time, plus a
    float64 field at a time), so keep ``height`` x ``width`` small; the full 1670 x 2500 domain
    works but needs tens of GB for a few days of valid times.
    """
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    if init_times is None:
        init_times = pd.date_range("2024-07-01T00", periods=4, freq="12h")
    inits = np.asarray(pd.DatetimeIndex(init_times).values, "datetime64[ns]")
    leads = np.asarray([float(h) for h in lead_times])
    t0 = inits.min()
    span_h = float((inits.max() - t0) / np.timedelta64(1, "h") + leads.max())
    valid = t0 + (np.arange(0, span_h + 1e-9, 1.0) * 3600e9).astype("timedelta64[ns]")
    lat, lon = china3km_grid(height, width)
    c_lat, c_lon = _forecast_axis(lat)[::-1], _forecast_axis(lon)  # forecast latitudes north to south
    hours = lambda times: (times - t0) / np.timedelta64(1, "h")  # noqa: E731
    fine, coarse = _china_fields(rng, lat, lon, hours(valid), c_lat, c_lon, hours(inits), leads)
    lead_ns = (leads * 3600e9).astype("timedelta64[ns]")
    datasets = {
        "target": _china_dataset(
            fine, ("time", "lat", "lon"), {"time": valid, "lat": lat, "lon": lon}, _TITLES["target"]
        ),
        "forecast": _china_dataset(
            coarse,
            ("init_time", "lead_time", "lat", "lon"),
            {"init_time": inits, "lead_time": lead_ns, "lat": c_lat, "lon": c_lon},
            _TITLES["forecast"],
        ),
        "static": _china_static(rng, lat, lon),
    }
    paths = {role: os.path.join(directory, f"{role}.nc") for role in datasets}
    for role, ds in datasets.items():
        ds.to_netcdf(paths[role])
    return paths


def describe_files(paths: dict[str, str]) -> str:
    """A short listing of each written file: dimensions, variables with units, coordinates."""
    lines = []
    for role, path in paths.items():
        with open_dataset(path) as ds:
            dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
            lines.append(f"{role}: {path}\n  dims: {dims}")
            for name, da in ds.data_vars.items():
                lines.append(
                    f"  {name:5s} {str(da.dims):45s} {da.attrs.get('units', '')}  {da.attrs.get('long_name', '')}"
                )
            for name in ("time", "init_time", "lead_time", "level"):
                if name in ds.coords:
                    v = ds[name].values
                    if np.issubdtype(v.dtype, np.timedelta64):
                        v = [f"{h:g} h" for h in v / np.timedelta64(1, "h")]
                    elif np.issubdtype(v.dtype, np.datetime64):
                        v = [str(np.datetime64(t, "s")) for t in v]
                    lines.append(f"  {name}: {v[0]} .. {v[-1]} ({len(v)})")
    return "\n".join(lines)


# Named synthetic datasets in the China 3 km layout: write_china3km_dataset arguments, with
# init_times as (first, count, step).
SYNTHETIC_DATASETS = {
    # configs/china3km.py:smoke: valid times 2024-07-01T00 .. 07-03T06.
    "china3km_smoke": dict(height=64, width=96, init_times=("2024-07-01T00", 8, "6h"), lead_times=(0, 6, 12)),
}


def write_synthetic_dataset(name: str, directory: str) -> dict:
    """Write ``SYNTHETIC_DATASETS[name]`` to ``directory`` unless it is there already; returns the
    data-config fields that point at its files. Written atomically (a temporary directory renamed
    into place), so a concurrent reader never sees half a dataset."""
    if name not in SYNTHETIC_DATASETS:
        raise ValueError(f"unknown data.synthetic_dataset {name!r}; known: {sorted(SYNTHETIC_DATASETS)}")
    paths = {k: os.path.join(directory, f"{k}.nc") for k in ("target", "forecast", "static")}
    if not all(os.path.exists(p) for p in paths.values()):
        spec = dict(SYNTHETIC_DATASETS[name])
        first, count, step = spec.pop("init_times")
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}_", dir=os.path.dirname(os.path.abspath(directory)))
        write_china3km_dataset(tmp, init_times=pd.date_range(first, periods=count, freq=step), **spec)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            if not all(os.path.exists(p) for p in paths.values()):
                raise
    return {"target_paths": [paths["target"]], "input_paths": [paths["forecast"]], "static_path": paths["static"]}
