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
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from jax_corrdiff.data.sources import FieldSpec

TAIWAN_CWB_VARIABLES = ("maximum_radar_reflectivity", "temperature_2m", "eastward_wind_10m", "northward_wind_10m")
TAIWAN_ERA5_VARIABLES = (
    "total_column_water_vapour",
    "geopotential@500", "temperature@500", "eastward_wind@500", "northward_wind@500",
    "geopotential@850", "temperature@850", "eastward_wind@850", "northward_wind@850",
    "temperature_2m", "eastward_wind_10m", "northward_wind_10m",
)

# (name, level) -> (mean, amplitude) in the variable's units; unknown names get (0, 1).
_MAGNITUDES = {
    ("maximum_radar_reflectivity", None): (15.0, 15.0),  # dBZ, clipped at 0 below
    ("temperature_2m", None): (295.0, 5.0),              # K
    ("eastward_wind_10m", None): (0.0, 5.0),             # m s-1
    ("northward_wind_10m", None): (0.0, 5.0),
    ("total_column_water_vapour", None): (45.0, 10.0),   # kg m-2
    ("geopotential", 500.0): (57_500.0, 500.0),          # m2 s-2
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


def write_cwb_zarr(path: str, *, times, height: int, width: int, cwb_variables=TAIWAN_CWB_VARIABLES,
                   era5_variables=TAIWAN_ERA5_VARIABLES, seed: int = 0) -> str:
    """Write a CWB-layout Zarr (v2, consolidated) to ``path``; ``times`` is a sequence of
    datetime-likes; variables are "name" or "name@level". Returns ``path``."""
    rng = np.random.default_rng(seed)
    times = np.asarray(times, dtype="datetime64[ns]")
    cwb_specs = [FieldSpec.parse(v) for v in cwb_variables]
    era5_specs = [FieldSpec.parse(v) for v in era5_variables]
    cwb = _scaled(rng, cwb_specs, len(times), height, width, max_wavenumber=4)
    era5 = _scaled(rng, era5_specs, len(times), height, width, max_wavenumber=1)  # ERA5: larger scales
    # A Taiwan-sized box, slightly curvilinear like a Lambert grid: ~2 km steps.
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    lat = 21.9 + 0.018 * ii + 0.0005 * (jj - width / 2) / max(width, 1)
    lon = 120.0 + 0.0195 * jj + 0.002 * (ii - height / 2) / max(height, 1)

    def names_levels(specs, prefix):
        return {f"{prefix}_variable": ((f"{prefix}_channel",), np.array([s.name for s in specs])),
                f"{prefix}_pressure": ((f"{prefix}_channel",),
                                       np.array([np.nan if s.level is None else s.level for s in specs]))}

    dims = {"cwb": ("time", "cwb_channel", "south_north", "west_east"),
            "era5": ("time", "era5_channel", "south_north", "west_east")}
    ds = xr.Dataset(
        {
            "cwb": (dims["cwb"], cwb),
            "era5": (dims["era5"], era5),
            **names_levels(cwb_specs, "cwb"),
            **names_levels(era5_specs, "era5"),
            "cwb_center": (("cwb_channel",), cwb.mean(axis=(0, 2, 3))),
            "cwb_scale": (("cwb_channel",), cwb.std(axis=(0, 2, 3))),
            "era5_center": (("era5_channel",), era5.mean(axis=(0, 2, 3))),
            "era5_scale": (("era5_channel",), era5.std(axis=(0, 2, 3))),
            "cwb_valid": (("time",), np.ones(len(times), np.int8)),
            "era5_valid": (("time", "era5_channel"), np.ones((len(times), len(era5_specs)), bool)),
        },
        coords={"time": times, "XLAT": (("south_north", "west_east"), lat),
                "XLONG": (("south_north", "west_east"), lon)},
    )
    encoding = {
        "time": {"units": "hours since 1990-01-01 00:00:00", "dtype": "int64"},
        "cwb": {"chunks": (1, len(cwb_specs), height, width)},
        "era5": {"chunks": (1, len(era5_specs), height, width)},
    }
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    return path
