"""Offline preparation: regrid once into a prepared Zarr store (layout in ``data.store``), then
compute the normalization statistics.

Every "variables" store, analysis or forecast inputs, is written by one block writer
(``_write_samples``) from a list of samples: sample k pairs target time ``target_rows[k]`` with
input record ``input_index[k]`` (a time, or an (init, lead) pair). A "cwb" store copies nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable

import numpy as np
import xarray as xr
import zarr

from jax_corrdiff.data.data_config import config_hash, input_fingerprint, with_synthetic_files
from jax_corrdiff.data.errors import (
    DataError,
    MissingTimesError,
    MissingVariableError,
    NoForecastSamplesError,
    PreparedDataMismatchError,
)
from jax_corrdiff.data.grids import describe_paths, input_regridder, read_static
from jax_corrdiff.data.normalization import Normalizer, load_stats
from jax_corrdiff.data.regrid import degrade
from jax_corrdiff.data.sources import (
    LAT_NAMES,
    LON_NAMES,
    CwbStore,
    FieldSource,
    FieldSpec,
    ForecastSource,
    apply_nan_policy,
    expand_paths,
    read_cwb_channels,
    select_period,
    time_str,
)
from jax_corrdiff.data.store import PARTIAL_SUFFIX, STATS_NAME, STORE_NAME, compute_stats, time_blocks

log = logging.getLogger("jax_corrdiff")

_TIME_ENCODING = {"units": "seconds since 1970-01-01 00:00:00", "dtype": "int64"}


def _periods(times: np.ndarray, cfg: dict, path: str) -> np.ndarray:
    """Indices of ``times`` in the train or the valid period (each must select something); warns
    when the periods share time steps (validation losses would not be held out)."""
    train, valid = (select_period(times, cfg[key], path) for key in ("train_period", "valid_period"))
    shared = np.intersect1d(train, valid)
    if len(shared):
        warnings.warn(
            f"{path}: {len(shared)} time step(s) ({time_str(times[shared[0]])} .. {time_str(times[shared[-1]])}) "
            "are in both data.train_period and data.valid_period; validation is not held out",
            stacklevel=2,
        )
    return np.union1d(train, valid)


def forecast_samples(inputs: ForecastSource, target_times: np.ndarray, path: str):
    """(init index, lead index, target time index) of every (init, lead) of ``inputs`` whose valid
    time is one of ``target_times`` (sorted), ordered by valid time then lead. Pairs without a
    target are skipped; NoForecastSamplesError when none is left."""
    n_init, n_lead = len(inputs.init_times), len(inputs.lead_times)
    init_i, lead_i = (a.ravel() for a in np.meshgrid(np.arange(n_init), np.arange(n_lead), indexing="ij"))
    valid = inputs.valid_times(init_i, lead_i)
    pos = np.clip(np.searchsorted(target_times, valid), 0, max(len(target_times) - 1, 0))
    keep = (target_times[pos] == valid) if len(target_times) else np.zeros(len(valid), bool)
    if not keep.any():
        targets = f"{time_str(target_times[0])} .. {time_str(target_times[-1])}" if len(target_times) else "none"
        raise NoForecastSamplesError(
            path,
            f"init times {time_str(inputs.init_times[0])} .. {time_str(inputs.init_times[-1])}, "
            f"lead times {', '.join(f'{h:g}' for h in inputs.lead_times)} h; target times {targets}",
        )
    init_i, lead_i, pos = init_i[keep], lead_i[keep], pos[keep]
    order = np.lexsort((lead_i, pos))
    return init_i[order], lead_i[order], pos[order]


@dataclasses.dataclass
class _Samples:
    """The samples of a "variables" store: sample k pairs target time ``target_rows[k]`` with the
    input record ``inputs.read(*(i[k] for i in input_index))``, regridded by ``regrid``."""

    inputs: FieldSource | ForecastSource
    target_rows: np.ndarray
    input_index: tuple[np.ndarray, ...]
    regrid: Callable[[np.ndarray], np.ndarray] | None
    variables: dict = dataclasses.field(default_factory=dict)  # more (time,) variables, a value per sample
    coords: dict = dataclasses.field(default_factory=dict)  # more (time,) datetime coordinates
    attrs: dict = dataclasses.field(default_factory=dict)  # store attributes


def _analysis_samples(cfg: dict, target: FieldSource) -> _Samples:
    """Inputs with a time axis (or, without input files, the targets' own fields degraded by
    ``coarsen_factor``): the target times of the periods, each with the input at that time."""
    rows = _periods(target.times, cfg, describe_paths(target.paths))
    if not cfg["input_paths"]:
        inputs = FieldSource(cfg["target_paths"], cfg["input_variables"], "inputs (synthetic)")
        factor = int(cfg["coarsen_factor"])
        coarse = [-(-n // factor) for n in target.shape]  # blocks, the last one partial
        if min(coarse) < 2:
            raise DataError(
                f"{describe_paths(target.paths)}: data.coarsen_factor={factor} leaves {coarse[0]} x {coarse[1]} "
                f"coarse cells on the {target.shape[0]} x {target.shape[1]} grid; interpolating needs at least 2 x 2"
            )
        return _Samples(inputs, rows, (rows,), lambda x: degrade(x, factor))
    inputs = FieldSource(cfg["input_paths"], cfg["input_variables"], "inputs")
    pos = np.clip(np.searchsorted(inputs.times, target.times[rows]), 0, len(inputs.times) - 1)
    missing = inputs.times[pos] != target.times[rows]
    if missing.any():
        raise MissingTimesError(describe_paths(inputs.paths), [time_str(t) for t in target.times[rows][missing]])
    return _Samples(inputs, rows, (pos,), input_regridder(inputs, target.lat, target.lon))


def _forecast_samples(cfg: dict, target: FieldSource) -> _Samples:
    """Forecast inputs: one sample per (init, lead) with a target at its valid time, selected
    by valid time; each also carries its lead time, label and init time."""
    inputs = ForecastSource(cfg["input_paths"], cfg["input_variables"], cfg["lead_times"], "forecast inputs")
    init_i, lead_i, t_i = forecast_samples(inputs, target.times, describe_paths(inputs.paths))
    pairs_without_target = len(inputs.init_times) * len(inputs.lead_times) - len(t_i)
    sel = _periods(target.times[t_i], cfg, describe_paths(target.paths))
    init_i, lead_i, t_i = init_i[sel], lead_i[sel], t_i[sel]
    return _Samples(
        inputs,
        t_i,
        (init_i, lead_i),
        input_regridder(inputs, target.lat, target.lon),
        variables={"lead_time_label": lead_i.astype(np.int32), "lead_time": inputs.lead_times[lead_i]},
        coords={"valid_time": target.times[t_i], "init_time": inputs.init_times[init_i]},
        attrs={
            "lead_times": [float(x) for x in inputs.lead_times],
            # (init, lead) pairs of the files whose valid time is not a target time (skipped).
            "forecast_pairs_without_target": int(pairs_without_target),
        },
    )


def _read_block(cfg: dict, target: FieldSource, samples: _Samples, block: slice, counts: dict) -> dict:
    """Target and input values of the samples in ``block`` after the NaN policy (adding to ``counts``)."""
    rows, index = samples.target_rows[block], tuple(i[block] for i in samples.input_index)
    values = {}
    for key, source, idx in (("target", target, (rows,)), ("inputs", samples.inputs, index)):
        values[key] = source.read(*idx)
        counts[key] += apply_nan_policy(
            values[key],
            [str(f) for f in source.fields],
            cfg["nan_policy"],
            cfg["nan_fill_value"],
            paths=[source.file_of(i) for i in idx[0]],
            times=source.times_of(*idx),
        )
    if samples.regrid is not None:
        values["inputs"] = samples.regrid(values["inputs"])
    return values


def _write_samples(cfg: dict, store: str, target: FieldSource, samples: _Samples) -> dict:
    """Write the samples block by block (one time step per chunk); returns the non-finite counts
    per channel of the targets, inputs and static fields."""
    static, static_counts = read_static(cfg, target.lat, target.lon, describe_paths(target.paths))
    names = {"target": [str(f) for f in target.fields], "inputs": [str(f) for f in samples.inputs.fields]}
    counts = {k: np.zeros(len(v), np.int64) for k, v in names.items()}
    h, w = target.shape
    for block in time_blocks(len(samples.target_rows), h * w * 4 * (len(names["target"]) + len(names["inputs"]))):
        values = _read_block(cfg, target, samples, block, counts)
        variables, coords = (
            {k: (("time",), v[block]) for k, v in d.items()} for d in (samples.variables, samples.coords)
        )
        ds = xr.Dataset(
            {
                "target": (("time", "y", "x", "target_channel"), values["target"]),
                "inputs": (("time", "y", "x", "input_channel"), values["inputs"]),
                **variables,
            },
            coords={
                "time": target.times[samples.target_rows[block]],
                "target_channel": names["target"],
                "input_channel": names["inputs"],
                **coords,
            },
        )
        if block.start:
            ds.to_zarr(store, append_dim="time", consolidated=True)
            continue
        encoding = {k: _TIME_ENCODING for k in ("time", *samples.coords)}
        encoding.update({k: {"chunks": (1, *ds[k].shape[1:])} for k in ("target", "inputs")})
        ds = _with_grid(ds, target.lat, target.lon, static, cfg["static_variables"])
        ds.to_zarr(store, mode="w", zarr_format=2, consolidated=True, encoding=encoding)
    return {**{k: dict(zip(names[k], counts[k].tolist())) for k in names}, "static": static_counts}


def _with_grid(ds: xr.Dataset, lat, lon, static, static_names) -> xr.Dataset:
    ds = ds.assign(static=(("y", "x", "static_channel"), static))
    return ds.assign_coords(
        lat=(("y", "x"), lat), lon=(("y", "x"), lon), static_channel=np.array([str(s) for s in static_names], dtype=str)
    )


def _write_variables(cfg: dict, store: str) -> dict:
    target = FieldSource(cfg["target_paths"], cfg["target_variables"], "target")
    if target.lat is None:
        raise MissingVariableError(target.paths[0], "lat/lon coordinates", LAT_NAMES + LON_NAMES)
    samples = (_forecast_samples if cfg.get("lead_times") else _analysis_samples)(cfg, target)
    return {
        "target_files": [os.path.abspath(p) for p in target.paths],
        "input_files": [os.path.abspath(p) for p in samples.inputs.paths],
        **samples.attrs,
        "nonfinite_counts": _write_samples(cfg, store, target, samples),
    }


def _write_cwb(cfg: dict, store: str) -> dict:
    paths = expand_paths(cfg["target_paths"], "target")
    if len(paths) != 1:
        raise ValueError(f"data.format='cwb' takes one Zarr store in data.target_paths, got {paths}")
    path = paths[0]
    src = CwbStore(path, cfg["target_variables"], cfg["input_variables"])
    usable = np.nonzero(src.valid)[0]
    sel = usable[_periods(src.times[usable], cfg, path)]
    static, static_counts = read_static(cfg, src.lat, src.lon, path)
    # Nothing is copied, but every selected step is read once here so that NaNs surface now
    # (policy "error") or get counted (policy "fill"; the reader fills them on the fly).
    g = zarr.open_group(path, mode="r")
    names = {
        "cwb": [str(FieldSpec.parse(f)) for f in cfg["target_variables"]],
        "era5": [str(FieldSpec.parse(f)) for f in cfg["input_variables"]],
    }
    index = {"cwb": src.target_index, "era5": src.input_index}
    counts = {k: np.zeros(len(v), np.int64) for k, v in names.items()}
    h, w = src.shape
    for block in time_blocks(len(sel), h * w * 4 * (len(src.target_index) + len(src.input_index))):
        rows = sel[block]
        for key in ("cwb", "era5"):
            values = read_cwb_channels(g[key], rows, index[key])
            counts[key] += apply_nan_policy(
                values,
                names[key],
                cfg["nan_policy"],
                cfg["nan_fill_value"],
                paths=[path] * len(rows),
                times=src.times[rows],
            )
    ds = xr.Dataset(
        {"source_time_index": (("time",), sel.astype(np.int64))},
        coords={"time": src.times[sel], "target_channel": names["cwb"], "input_channel": names["era5"]},
    )
    ds = _with_grid(ds, src.lat, src.lon, static, cfg["static_variables"])
    ds.to_zarr(store, mode="w", zarr_format=2, consolidated=True, encoding={"time": _TIME_ENCODING})
    return {
        "source_store": os.path.abspath(path),
        "target_channel_index": [int(i) for i in src.target_index],
        "input_channel_index": [int(i) for i in src.input_index],
        "nonfinite_counts": {
            "target": dict(zip(names["cwb"], counts["cwb"].tolist())),
            "inputs": dict(zip(names["era5"], counts["era5"].tolist())),
            "static": static_counts,
        },
    }


def _store_attrs(store: str) -> dict:
    """Attributes of the prepared store at ``store``; {} when there is none, or only the empty
    directory a build killed early left behind (before stores were renamed into place)."""
    try:
        return zarr.open_group(store, mode="r").attrs.asdict()
    except FileNotFoundError:  # zarr's GroupNotFoundError included
        return {}


def prepare_dataset(data_cfg, cache_dir: str, *, overwrite: bool = False) -> str:
    """Build ``<cache_dir>/data.zarr`` from ``config.data`` (or reuse it) and return its path.

    Args:
        data_cfg: ``config.data``; a ``synthetic_dataset`` it names is written under ``cache_dir``.
        cache_dir: the prepared directory (WORKDIR/prepared).
        overwrite: rebuild a store made from a different data config instead of raising
            ``PreparedDataMismatchError``.

    A complete store made from the same data config (same hash of its fields) and the same input
    files (same ``input_fingerprint``: edited files are prepared again) is reused. The store is
    written as ``data.zarr.partial`` and renamed when complete, so an interrupted build leaves
    nothing a later run could take for a store. Rebuilding removes a stale ``stats.json``.
    """
    cfg = with_synthetic_files(data_cfg, cache_dir)
    digest, fingerprint = config_hash(cfg), input_fingerprint(cfg)
    store = os.path.join(cache_dir, STORE_NAME)
    attrs = _store_attrs(store)
    if attrs.get("complete"):
        if attrs.get("config_hash") != digest and not overwrite:
            raise PreparedDataMismatchError(store, attrs.get("config_hash"), digest)
        if attrs.get("config_hash") == digest:
            if attrs.get("input_fingerprint") == fingerprint:
                return store
            log.warning("%s: the input files changed since it was prepared; preparing again", store)
    os.makedirs(cache_dir, exist_ok=True)
    stats = os.path.join(cache_dir, STATS_NAME)
    if os.path.exists(stats):
        os.remove(stats)
    partial = store + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    attrs = (_write_variables if cfg["format"] == "variables" else _write_cwb)(cfg, partial)
    zarr.open_group(partial, mode="r+").attrs.update(
        {
            **attrs,
            "format": cfg["format"],
            "config_hash": digest,
            "input_fingerprint": fingerprint,
            "data_config": cfg,
            "complete": True,
        }
    )
    zarr.consolidate_metadata(partial)
    if os.path.exists(store):
        shutil.rmtree(store)
    os.rename(partial, store)
    return store


def ensure_prepared(data_cfg, cache_dir: str) -> tuple[str, Normalizer]:
    """The prepared store and its Normalizer, building either only when missing (for training).

    Args:
        data_cfg: ``config.data``.
        cache_dir: the prepared directory (WORKDIR/prepared).
    """
    store = prepare_dataset(data_cfg, cache_dir)
    stats = os.path.join(cache_dir, STATS_NAME)
    if os.path.exists(stats):
        with open(stats) as f:
            key = json.load(f)
        attrs = zarr.open_group(store, mode="r").attrs
        if all(key.get(k) == attrs[k] for k in ("config_hash", "input_fingerprint")):
            return store, load_stats(stats)
    return store, compute_stats(store)
