"""Figures for precipitation-like variables: maps on a logarithmic colour scale and the
distribution of intensities, truth against the ensemble and the baselines (PNG, no pyplot)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from jax_corrdiff.evaluation.dataset import BASELINE_SUFFIXES, SPATIAL_DIMS, TIME_DIM, completed_times
from jax_corrdiff.evaluation.metrics import MEMBER_DIM
from jax_corrdiff.evaluation.precipitation import WET_THRESHOLD

MEMBERS_SHOWN = 2


def _panels(ds: xr.Dataset, variable: str, time_index: int) -> list[tuple[str, np.ndarray]]:
    at = completed_times(ds).isel({TIME_DIM: time_index})
    panels = [("truth", at[f"{variable}_truth"])]
    panels += [(m, at[variable + s]) for m, s in BASELINE_SUFFIXES.items() if variable + s in at]
    members = at[variable]
    shown = min(MEMBERS_SHOWN, members.sizes[MEMBER_DIM])
    panels += [(f"member {m}", members.isel({MEMBER_DIM: m})) for m in range(shown)]
    return [(title, p.transpose(*SPATIAL_DIMS).values) for title, p in panels]


def plot_precipitation_maps(ds: xr.Dataset, variable: str, time_index: int, path: str) -> None:
    """Truth, baselines and members at one time on one log colour scale from the wet threshold
    (0.1 mm/h) up; drier points are left white."""
    panels = _panels(ds, variable, time_index)
    vmax = max(WET_THRESHOLD * 10, max(float(np.nanmax(p)) for _, p in panels))
    cmap = colormaps["turbo"].copy()
    cmap.set_under("white")
    fig = Figure(figsize=(3.6 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, field) in zip(axes, panels):
        mesh = ax.imshow(field, norm=LogNorm(WET_THRESHOLD, vmax), cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    units = ds[variable].attrs.get("units", "")
    fig.colorbar(mesh, ax=list(axes), location="bottom", shrink=0.5, extend="min", label=f"{variable} ({units})")
    fig.savefig(path, dpi=100)


def plot_intensity_distribution(ds: xr.Dataset, variable: str, path: str) -> None:
    """Frequency of intensities in logarithmic bins over every completed time (and member),
    log-log: the heavy tail where a downscaling model most often fails."""
    ds = completed_times(ds)
    sources = {"truth": ds[f"{variable}_truth"], "ensemble": ds[variable]}
    sources.update({m: ds[variable + s] for m, s in BASELINE_SUFFIXES.items() if variable + s in ds})
    values = {name: da.values[np.isfinite(da.values)] for name, da in sources.items()}
    top = max(WET_THRESHOLD * 10, max(float(v.max()) for v in values.values() if v.size))
    bins = np.geomspace(WET_THRESHOLD, top * 1.01, 40)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    for name, v in values.items():
        density, _ = np.histogram(v, bins=bins)
        ax.step(bins[:-1], density / max(v.size, 1), where="post", label=name, linewidth=2 if name == "truth" else 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{variable} ({ds[variable].attrs.get('units', '')})")
    ax.set_ylabel("fraction of points")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
