"""Figures of a scored generation output: maps, power spectra, rank histograms (PNG).

Built on ``matplotlib.figure.Figure`` without pyplot, so no GUI backend or global state is
involved (PNG output goes through Agg). Labels carry the variable's physical units.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jax_corrdiff.evaluation.dataset import ENSEMBLE_MODEL, LEVEL_DIM, SPATIAL_DIMS, TIME_DIM, time_labels
from jax_corrdiff.evaluation.metrics import MEMBER_DIM

MODEL_STYLES = {
    "truth": {"color": "black", "linewidth": 2.0, "label": "truth"},
    ENSEMBLE_MODEL: {"color": "tab:red", "label": "CorrDiff members"},
    "regression": {"color": "tab:blue", "linestyle": "--", "label": "regression mean"},
    "bilinear": {"color": "tab:green", "linestyle": ":", "label": "bilinear interpolation"},
}
MEMBERS_SHOWN = 2


def _label(field: dict) -> str:
    level = "" if field["level"] is None else f" at {field['level']:g} {field['level_units']}".rstrip()
    return f"{field['long_name']}{level}"


def _units(field: dict, power: int = 1) -> str:
    """'(K)' or '(K)$^2$'; empty when the file gives no units."""
    if not field["units"]:
        return ""
    return f"({field['units']})" if power == 1 else f"({field['units']})$^{power}$"


def _plot_coordinates(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray, str, str]:
    """2-D lon/lat when the dataset has them, else the x/y coordinates (indices if none)."""
    if "lon" in da.coords and "lat" in da.coords:
        return da["lon"].values, da["lat"].values, "longitude (°E)", "latitude (°N)"
    return da["x"].values, da["y"].values, "x", "y"


def _map_panels(ds: xr.Dataset, field: dict, time_index: int) -> tuple[xr.DataArray, list]:
    """The members (member, y, x) and the (title, 2-D field) panels on one colour scale: truth,
    bilinear input and regression mean where the file has them, the first members."""
    name = field["variable"]
    at_level = {} if field["level"] is None else {LEVEL_DIM: field["level"]}

    def field_2d(var: str) -> xr.DataArray:
        return ds[var].isel({TIME_DIM: time_index}).sel(at_level).transpose(..., *SPATIAL_DIMS).load()

    members = field_2d(name).transpose(MEMBER_DIM, *SPATIAL_DIMS)
    panels = [("truth", field_2d(f"{name}_truth"))]
    for title, suffix in (("bilinear interpolation (input)", "_interpolated"), ("regression mean", "_regression")):
        if f"{name}{suffix}" in ds.data_vars:
            panels.append((title, field_2d(f"{name}{suffix}")))
    panels += [(f"CorrDiff member {m}", members.isel({MEMBER_DIM: m})) for m in range(min(MEMBERS_SHOWN, len(members)))]
    return members, panels


def plot_maps(ds: xr.Dataset, field: dict, time_index: int, path: str) -> None:
    """Truth, bilinear input, regression mean, two members (one colour scale) and the
    ensemble standard deviation, at one time."""
    name = field["variable"]
    members, panels = _map_panels(ds, field, time_index)
    spread = members.std(MEMBER_DIM, ddof=1) if members.sizes[MEMBER_DIM] > 1 else None

    n_panels = len(panels) + (spread is not None)
    n_cols = min(3, n_panels)
    n_rows = -(-n_panels // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    x, y, xlabel, ylabel = _plot_coordinates(members)
    values = np.concatenate([p.values.ravel() for _, p in panels])
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    for ax, (title, panel) in zip(axes, panels):
        mesh = ax.pcolormesh(x, y, panel.values, vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
        ax.set_title(title)
    fig.colorbar(
        mesh,
        ax=list(axes[: len(panels)]),
        location="bottom",
        shrink=0.5,
        aspect=40,
        label=f"{name} {_units(field)}".rstrip(),
    )
    if spread is not None:
        ax = axes[len(panels)]
        std_mesh = ax.pcolormesh(x, y, spread.values, cmap="magma", shading="auto", vmin=0)
        ax.set_title(f"ensemble std ({members.sizes[MEMBER_DIM]} members)")
        fig.colorbar(std_mesh, ax=ax, label=f"ensemble std {_units(field)}".rstrip())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax in axes[:n_panels]:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    named = _label(field) if field["long_name"] == name else f"{_label(field)} ({name})"
    fig.suptitle(f"{named}, {time_labels(ds)[time_index]}")
    fig.savefig(path, dpi=110)


def plot_spectra(field: dict, times: list[str], path: str) -> None:
    """Log-log radially averaged power spectra, truth vs CorrDiff vs baselines, up to Nyquist."""
    spectra = field["spectra"]
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    if spectra["wavenumber"] is not None:
        k = np.asarray(spectra["wavenumber"])
        shown = (k >= 1) & (k <= spectra["nyquist_wavenumber"])
        for source, power in spectra["power"].items():
            if power is not None:
                ax.loglog(k[shown], np.asarray(power)[shown], **MODEL_STYLES[source])
        ax.legend()
    ax.set_xlabel(f"radial wavenumber (cycles per {min(spectra['grid_shape'])} grid lengths)")
    ax.set_ylabel(f"power {_units(field, 2)}".rstrip())
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{_label(field)}: power spectrum\nmean over {_period(times)}", fontsize="medium")
    fig.savefig(path, dpi=110)


def plot_rank_histogram(field: dict, times: list[str], path: str) -> None:
    """Relative frequency of the truth's rank among the members; flat = calibrated."""
    counts = np.asarray(field["rank_histogram"], dtype=float)
    frequency = counts / counts.sum() if counts.sum() > 0 else counts
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), frequency, color="tab:red", alpha=0.8)
    ax.axhline(1 / len(counts), color="black", linestyle="--", label="uniform (calibrated)")
    ax.set_xlabel(f"rank of truth among {len(counts) - 1} members (0: below all)")
    ax.set_ylabel("relative frequency")
    ax.legend()
    ax.set_title(f"{_label(field)}: rank histogram\n{_period(times)}", fontsize="medium")
    fig.savefig(path, dpi=110)


def _period(times: list[str]) -> str:
    return times[0] if len(times) == 1 else f"{len(times)} times, {times[0]} to {times[-1]}"
