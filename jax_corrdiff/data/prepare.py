"""Offline preparation: regrid once into a prepared Zarr store, then compute normalization stats.

Layout of ``<cache_dir>/data.zarr`` (Zarr v2, consolidated; opens with ``xr.open_zarr``):
    time (time)                       the target's time steps inside train_period U valid_period
    lat, lon (y, x)                   the target grid (2-D)
    target_channel, input_channel, static_channel   names, "name" or "name@level"
    target (time, y, x, target_channel)  float32, one time step per chunk   ["variables" only]
    inputs (time, y, x, input_channel)   float32, on the target grid        ["variables" only]
    static (y, x, static_channel)        float32
    source_time_index (time)             int64, the step in the CWB Zarr    ["cwb" only]
  forecast inputs (``data.lead_times`` non-empty): the time axis is a sample axis, one sample per
  (init time, lead time) whose valid time init + lead is a target time; samples are sorted by
  valid time, then lead. ``time`` is the VALID time (so train/valid periods select samples by
  valid time, like the targets they are scored on), plus
    valid_time, init_time (time)         datetime64, valid_time == time
    lead_time (time)                     float64, hours
    lead_time_label (time)               int32, index of the lead in data.lead_times
    attrs: format, config_hash, data_config, nonfinite_counts, complete, input/target file
           lists ("variables"); source_store, target/input_channel_index ("cwb")
For ``format="cwb"`` nothing big is copied: the store holds the grid, times, static fields and
channel selection, and samples are read from the original CWB Zarr (``PreparedStore.read``).
``<cache_dir>/stats.json`` holds the ``Normalizer`` over the train period.

``complete`` is written last, so a build that was interrupted is rebuilt on the next call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import xarray as xr
import zarr

from jax_corrdiff.data.errors import (
    DataError,
    GridMismatchError,
    MissingTimesError,
    MissingVariableError,
    NoForecastSamplesError,
    PreparedDataMismatchError,
)
from jax_corrdiff.data.normalization import Normalizer, RunningMoments, load_stats, save_stats
from jax_corrdiff.data.regrid import LatLonBilinear, degrade
from jax_corrdiff.data.sources import (
    LAT_NAMES,
    LON_NAMES,
    CwbStore,
    FieldSource,
    FieldSpec,
    ForecastSource,
    apply_nan_policy,
    decode_times,
    expand_paths,
    select_period,
    time_str,
)

PREPARED_DIR = "prepared"  # WORKDIR/prepared holds the store and its statistics
STORE_NAME = "data.zarr"
STATS_NAME = "stats.json"
DATA_FIELDS = (
    "format",
    "target_paths",
    "target_variables",
    "input_paths",
    "input_variables",
    "coarsen_factor",
    "static_path",
    "static_variables",
    "train_period",
    "valid_period",
    "nan_policy",
    "nan_fill_value",
)
# Hashed only when non-empty, so stores of analysis-input configs keep their hash.
OPTIONAL_DATA_FIELDS = ("lead_times",)
_BLOCK_BYTES = 64 * 2**20  # read/write this much per block of time steps
# Static fields (and inputs) count as on the target grid when their lat/lon agree to this many degrees.
_GRID_TOLERANCE_DEG = 1e-3
_TIME_ENCODING = {"units": "seconds since 1970-01-01 00:00:00", "dtype": "int64"}


def data_config_dict(data_cfg) -> dict:
    """The fields of ``config.data`` that define the prepared data, as plain JSON values, checked."""
    missing = [k for k in DATA_FIELDS if k not in data_cfg]
    if missing:
        raise ValueError(f"data config lacks {', '.join(missing)}")
    cfg = {k: json.loads(json.dumps(data_cfg[k])) for k in DATA_FIELDS}
    for key in OPTIONAL_DATA_FIELDS:
        if key in data_cfg and data_cfg[key]:
            cfg[key] = json.loads(json.dumps(list(data_cfg[key])))
    if cfg.get("lead_times"):
        leads = [float(h) for h in cfg["lead_times"]]
        if len(set(leads)) != len(leads) or min(leads) < 0:
            raise ValueError(f"data.lead_times must be distinct non-negative hours, got {cfg['lead_times']!r}")
        if cfg["format"] != "variables" or not cfg["input_paths"]:
            raise ValueError("data.lead_times needs data.format='variables' and forecast files in data.input_paths")
    if cfg["format"] not in ("variables", "cwb"):
        raise ValueError(f"data.format must be 'variables' or 'cwb', not {cfg['format']!r}")
    if cfg["nan_policy"] not in ("error", "fill"):
        raise ValueError(f"data.nan_policy must be 'error' or 'fill', not {cfg['nan_policy']!r}")
    for key in ("train_period", "valid_period"):
        if len(cfg[key]) != 2:
            raise ValueError(f"data.{key} must be [start, end], got {cfg[key]!r}")
    for key in ("target_paths", "target_variables", "input_variables"):
        if not cfg[key]:
            raise ValueError(f"data.{key} is empty")
    if bool(cfg["static_path"]) != bool(cfg["static_variables"]):
        raise ValueError("data.static_path and data.static_variables must be given together")
    if cfg["format"] == "cwb" and cfg["input_paths"]:
        raise ValueError("data.format='cwb' reads inputs from the store's era5 array; data.input_paths must be empty")
    if cfg["format"] == "variables" and not cfg["input_paths"] and int(cfg["coarsen_factor"]) < 1:
        raise ValueError("paired synthetic inputs need data.coarsen_factor >= 1")
    return cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _describe(paths) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"


def _blocks(n: int, bytes_per_step: int):
    step = max(1, _BLOCK_BYTES // max(bytes_per_step, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _grid_distance(lat_a, lon_a, lat_b, lon_b) -> float:
    """Largest difference in degrees between two grids' lat or lon (longitudes compared mod 360)."""
    return max(np.abs(lat_a - lat_b).max(), np.abs(np.mod(lon_a - lon_b + 180.0, 360.0) - 180.0).max())


def _periods(times: np.ndarray, cfg: dict, path: str) -> np.ndarray:
    """Indices of ``times`` in the train or the valid period (each must select something)."""
    return np.union1d(select_period(times, cfg["train_period"], path), select_period(times, cfg["valid_period"], path))


def require_on_grid(src: FieldSource, lat: np.ndarray, lon: np.ndarray, what: str, target: str) -> None:
    """Raise GridMismatchError unless ``src`` lies on the (lat, lon) grid of ``target``."""
    path = _describe(src.paths)
    if src.shape != lat.shape:
        raise GridMismatchError(
            path, f"{what} are not on the target grid", f"grid {src.shape}, target grid {lat.shape} ({target})"
        )
    if src.lat is not None:
        dist = _grid_distance(src.lat, src.lon, lat, lon)
        if dist > _GRID_TOLERANCE_DEG:
            raise GridMismatchError(
                path,
                f"{what} are not on the target grid",
                f"lat/lon differ from the target's ({target}) by up to {dist:.4f} deg",
            )


def read_static(cfg: dict, lat: np.ndarray, lon: np.ndarray, target: str):
    """Static fields (H, W, C) after the NaN policy, and their non-finite counts."""
    if not cfg["static_variables"]:
        return np.zeros((*lat.shape, 0), np.float32), {}
    src = FieldSource([cfg["static_path"]], cfg["static_variables"], "static", static=True)
    path, names = src.paths[0], [str(f) for f in src.fields]
    require_on_grid(src, lat, lon, "static fields", target)
    values = src.read_static()
    counts = apply_nan_policy(values[None], names, cfg["nan_policy"], cfg["nan_fill_value"], paths=[path], times=[None])
    return values, dict(zip(names, counts.tolist()))


def input_regridder(inputs: FieldSource, lat: np.ndarray, lon: np.ndarray):
    """None when the inputs already sit on the (lat, lon) target grid, else a LatLonBilinear to it."""
    path = _describe(inputs.paths)
    on_target = inputs.lat is not None and inputs.shape == lat.shape
    if on_target and _grid_distance(inputs.lat, inputs.lon, lat, lon) <= _GRID_TOLERANCE_DEG:
        return None
    if inputs.regular is None:
        raise GridMismatchError(
            path, "input grid", "inputs need a regular grid with 1-D lat and lon (or to be on the target grid already)"
        )
    return LatLonBilinear(*inputs.regular, lat, lon, path=path)


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
        raise NoForecastSamplesError(
            path,
            (
                f"init times {time_str(inputs.init_times[0])} .. {time_str(inputs.init_times[-1])}, "
                f"lead times {', '.join(f'{h:g}' for h in inputs.lead_times)} h; target times "
                + (f"{time_str(target_times[0])} .. {time_str(target_times[-1])}" if len(target_times) else "none")
            ),
        )
    init_i, lead_i, pos = init_i[keep], lead_i[keep], pos[keep]
    order = np.lexsort((lead_i, pos))
    return init_i[order], lead_i[order], pos[order]


def _write_forecast(cfg: dict, store: str) -> dict:
    """Forecast inputs: one sample per (init, lead) with a target at its valid time (see module doc)."""
    target = FieldSource(cfg["target_paths"], cfg["target_variables"], "target")
    target_desc = _describe(target.paths)
    if target.lat is None:
        raise MissingVariableError(target.paths[0], "lat/lon coordinates", LAT_NAMES + LON_NAMES)
    inputs = ForecastSource(cfg["input_paths"], cfg["input_variables"], cfg["lead_times"], "forecast inputs")
    input_desc = _describe(inputs.paths)
    init_i, lead_i, t_i = forecast_samples(inputs, target.times, input_desc)
    n_matched = len(t_i)
    sel = _periods(target.times[t_i], cfg, target_desc)  # by valid time
    init_i, lead_i, t_i = init_i[sel], lead_i[sel], t_i[sel]
    regrid = input_regridder(inputs, target.lat, target.lon)
    static, static_counts = read_static(cfg, target.lat, target.lon, target_desc)
    names_t, names_i = [str(f) for f in target.fields], [str(f) for f in inputs.fields]
    counts_t, counts_i = np.zeros(len(names_t), np.int64), np.zeros(len(names_i), np.int64)
    policy, fill = cfg["nan_policy"], cfg["nan_fill_value"]
    h, w = target.shape
    for block in _blocks(len(t_i), h * w * 4 * (len(names_t) + len(names_i))):
        rows = t_i[block]
        t_val = target.read(rows)
        counts_t += apply_nan_policy(
            t_val, names_t, policy, fill, paths=[target.file_of(i) for i in rows], times=target.times[rows]
        )
        i_val = inputs.read(init_i[block], lead_i[block])
        counts_i += apply_nan_policy(
            i_val,
            names_i,
            policy,
            fill,
            paths=[inputs.file_of(i) for i in init_i[block]],
            times=inputs.valid_times(init_i[block], lead_i[block]),
        )  # valid times
        ds = xr.Dataset(
            {
                "target": (("time", "y", "x", "target_channel"), t_val),
                "inputs": (("time", "y", "x", "input_channel"), i_val if regrid is None else regrid(i_val)),
                "lead_time_label": (("time",), lead_i[block].astype(np.int32)),
                "lead_time": (("time",), inputs.lead_times[lead_i[block]]),
            },
            coords={
                "time": target.times[rows],
                "valid_time": (("time",), target.times[rows]),
                "init_time": (("time",), inputs.init_times[init_i[block]]),
                "target_channel": names_t,
                "input_channel": names_i,
            },
        )
        _write_block(
            ds,
            store,
            block.start == 0,
            target,
            static,
            cfg,
            {"valid_time": _TIME_ENCODING, "init_time": _TIME_ENCODING},
        )
    return {
        "target_files": [os.path.abspath(p) for p in target.paths],
        "input_files": [os.path.abspath(p) for p in inputs.paths],
        "lead_times": [float(x) for x in inputs.lead_times],
        # (init, lead) pairs of the files whose valid time is not a target time (skipped).
        "forecast_pairs_without_target": int(len(inputs.init_times) * len(inputs.lead_times) - n_matched),
        "nonfinite_counts": {
            "target": dict(zip(names_t, counts_t.tolist())),
            "inputs": dict(zip(names_i, counts_i.tolist())),
            "static": static_counts,
        },
    }


def _write_variables(cfg: dict, store: str) -> dict:
    if cfg.get("lead_times"):
        return _write_forecast(cfg, store)
    target = FieldSource(cfg["target_paths"], cfg["target_variables"], "target")
    target_desc = _describe(target.paths)
    if target.lat is None:
        raise MissingVariableError(target.paths[0], "lat/lon coordinates", LAT_NAMES + LON_NAMES)
    sel = _periods(target.times, cfg, target_desc)
    if cfg["input_paths"]:
        inputs = FieldSource(cfg["input_paths"], cfg["input_variables"], "inputs")
        pos = np.clip(np.searchsorted(inputs.times, target.times[sel]), 0, len(inputs.times) - 1)
        missing = inputs.times[pos] != target.times[sel]
        if missing.any():
            raise MissingTimesError(_describe(inputs.paths), [time_str(t) for t in target.times[sel][missing]])
        input_sel, regrid = pos, input_regridder(inputs, target.lat, target.lon)
    else:  # paired synthetic: the target files' own fields, degraded
        inputs = FieldSource(cfg["target_paths"], cfg["input_variables"], "inputs (synthetic)")
        input_sel, factor = sel, int(cfg["coarsen_factor"])
        regrid = lambda x: degrade(x, factor)  # noqa: E731
    static, static_counts = read_static(cfg, target.lat, target.lon, target_desc)
    names_t, names_i = [str(f) for f in target.fields], [str(f) for f in inputs.fields]
    counts_t, counts_i = np.zeros(len(names_t), np.int64), np.zeros(len(names_i), np.int64)
    policy, fill = cfg["nan_policy"], cfg["nan_fill_value"]
    h, w = target.shape
    for block in _blocks(len(sel), h * w * 4 * (len(names_t) + len(names_i))):
        rows, in_rows = sel[block], input_sel[block]
        t_val = target.read(rows)
        counts_t += apply_nan_policy(
            t_val, names_t, policy, fill, paths=[target.file_of(i) for i in rows], times=target.times[rows]
        )
        i_val = inputs.read(in_rows)
        counts_i += apply_nan_policy(
            i_val, names_i, policy, fill, paths=[inputs.file_of(i) for i in in_rows], times=inputs.times[in_rows]
        )
        ds = xr.Dataset(
            {
                "target": (("time", "y", "x", "target_channel"), t_val),
                "inputs": (("time", "y", "x", "input_channel"), i_val if regrid is None else regrid(i_val)),
            },
            coords={"time": target.times[rows], "target_channel": names_t, "input_channel": names_i},
        )
        _write_block(ds, store, block.start == 0, target, static, cfg, {})
    return {
        "target_files": [os.path.abspath(p) for p in target.paths],
        "input_files": [os.path.abspath(p) for p in inputs.paths],
        "nonfinite_counts": {
            "target": dict(zip(names_t, counts_t.tolist())),
            "inputs": dict(zip(names_i, counts_i.tolist())),
            "static": static_counts,
        },
    }


def _write_block(ds: xr.Dataset, store: str, first: bool, target, static, cfg: dict, time_encodings: dict) -> None:
    """Create the store with the grid and static fields from the first block of time steps,
    then append each later block along time (one time step per chunk)."""
    if not first:
        ds.to_zarr(store, append_dim="time", consolidated=True)
        return
    ds = _with_grid(ds, target.lat, target.lon, static, cfg["static_variables"])
    encoding = {
        "time": _TIME_ENCODING,
        **time_encodings,
        **{name: {"chunks": (1, *ds[name].shape[1:])} for name in ("target", "inputs")},
    }
    ds.to_zarr(store, mode="w", zarr_format=2, consolidated=True, encoding=encoding)


def _with_grid(ds: xr.Dataset, lat, lon, static, static_names) -> xr.Dataset:
    ds = ds.assign(static=(("y", "x", "static_channel"), static))
    return ds.assign_coords(
        lat=(("y", "x"), lat), lon=(("y", "x"), lon), static_channel=np.array([str(s) for s in static_names], dtype=str)
    )


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
    for block in _blocks(len(sel), h * w * 4 * (len(src.target_index) + len(src.input_index))):
        rows = sel[block]
        for key in ("cwb", "era5"):
            values = np.moveaxis(g[key].get_orthogonal_selection((rows, index[key])), 1, -1).astype(np.float32)
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


def prepare_dataset(data_cfg, cache_dir: str, *, overwrite: bool = False) -> str:
    """Build ``<cache_dir>/data.zarr`` from ``config.data`` (or reuse it) and return its path.

    A complete store made from the same data config (same hash of ``DATA_FIELDS``) is reused.
    One made from a different config raises ``PreparedDataMismatchError`` unless ``overwrite``.
    Rebuilding removes a stale ``stats.json``.
    """
    cfg = data_config_dict(data_cfg)
    digest = config_hash(cfg)
    store = os.path.join(cache_dir, STORE_NAME)
    if os.path.exists(store):
        attrs = zarr.open_group(store, mode="r").attrs.asdict()
        if attrs.get("complete"):
            if attrs.get("config_hash") == digest:
                return store
            if not overwrite:
                raise PreparedDataMismatchError(store, attrs.get("config_hash"), digest)
        shutil.rmtree(store)
    os.makedirs(cache_dir, exist_ok=True)
    stats = os.path.join(cache_dir, STATS_NAME)
    if os.path.exists(stats):
        os.remove(stats)
    attrs = (_write_variables if cfg["format"] == "variables" else _write_cwb)(cfg, store)
    zarr.open_group(store, mode="r+").attrs.update(
        {**attrs, "format": cfg["format"], "config_hash": digest, "data_config": cfg, "complete": True}
    )
    zarr.consolidate_metadata(store)
    return store


def _names(array) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in array[:])


class PreparedStore:
    """Raw (physical-unit) reads from a prepared store. Zarr handles open on first read in each
    process and are dropped when pickled, so instances travel cheaply to Grain workers."""

    def __init__(self, path: str):
        self.path = path
        g = zarr.open_group(path, mode="r")
        self.attrs = g.attrs.asdict()
        if not self.attrs.get("complete"):
            raise DataError(f"{path}: not a complete prepared store; run prepare_dataset")
        self.format = self.attrs["format"]
        self.config = self.attrs["data_config"]
        self.times = decode_times(g["time"])
        self.lat, self.lon = np.asarray(g["lat"][:]), np.asarray(g["lon"][:])
        self.target_channels = _names(g["target_channel"])
        self.input_channels = _names(g["input_channel"])
        self.static_channels = _names(g["static_channel"])
        self.static = np.asarray(g["static"][:], np.float32)
        if self.format == "cwb":
            self._source_index = np.asarray(g["source_time_index"][:])
        # Forecast inputs: per-sample lead-time label (index into lead_times) and init time.
        self.lead_times = tuple(self.attrs.get("lead_times", ()))
        self.lead_time_labels = np.asarray(g["lead_time_label"][:], np.int32) if "lead_time_label" in g else None
        self.init_times = decode_times(g["init_time"]) if "init_time" in g else None
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def split_indices(self, split: str) -> np.ndarray:
        """Store time indices of ``split`` ("train" or "valid")."""
        return select_period(self.times, self.config[f"{split}_period"], self.path)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(target (T, H, W, C_out), inputs (T, H, W, C_in)) float32 at store time ``indices``."""
        indices = np.asarray(indices, np.int64)
        if self.format == "variables":
            if self._arrays is None:
                g = zarr.open_group(self.path, mode="r")
                self._arrays = (g["target"], g["inputs"])
            return tuple(a.get_orthogonal_selection((indices,)) for a in self._arrays)
        if self._arrays is None:
            g = zarr.open_group(self.attrs["source_store"], mode="r")
            self._arrays = (g["cwb"], g["era5"])
        out = []
        for array, channels, names in zip(
            self._arrays,
            (self.attrs["target_channel_index"], self.attrs["input_channel_index"]),
            (self.target_channels, self.input_channels),
        ):
            values = array.get_orthogonal_selection((self._source_index[indices], channels))
            values = np.moveaxis(values, 1, -1).astype(np.float32)
            apply_nan_policy(
                values,
                names,
                self.config["nan_policy"],
                self.config["nan_fill_value"],
                paths=[self.attrs["source_store"]] * len(indices),
                times=self.times[indices],
            )
            out.append(values)
        return tuple(out)


def compute_stats(store_path: str) -> Normalizer:
    """Per-channel mean/std of target, inputs and static over the train period; writes stats.json
    beside the store and returns the Normalizer."""
    store = PreparedStore(store_path)
    train = store.split_indices("train")
    h, w = store.lat.shape
    moments_t = RunningMoments(len(store.target_channels))
    moments_i = RunningMoments(len(store.input_channels))
    for block in _blocks(len(train), h * w * 4 * (len(store.target_channels) + len(store.input_channels))):
        target, inputs = store.read(train[block])
        moments_t.update(target)
        moments_i.update(inputs)
    moments_s = RunningMoments(len(store.static_channels))
    moments_s.update(store.static)
    (tm, ts), (im, is_), (sm, ss) = moments_t.mean_std(), moments_i.mean_std(), moments_s.mean_std()
    normalizer = Normalizer(store.target_channels, tm, ts, store.input_channels, im, is_, store.static_channels, sm, ss)
    save_stats(
        os.path.join(os.path.dirname(os.path.abspath(store_path)), STATS_NAME),
        normalizer,
        config_hash=store.attrs["config_hash"],
        train_period=store.config["train_period"],
    )
    return normalizer


def ensure_prepared(data_cfg, cache_dir: str) -> tuple[str, Normalizer]:
    """The prepared store and its Normalizer, building either only when missing (for training)."""
    store = prepare_dataset(data_cfg, cache_dir)
    stats = os.path.join(cache_dir, STATS_NAME)
    if os.path.exists(stats):
        with open(stats) as f:
            if json.load(f).get("config_hash") == config_hash(data_config_dict(data_cfg)):
                return store, load_stats(stats)
    return store, compute_stats(store)


def describe_prepared(store_path: str, normalizer: Normalizer) -> str:
    """A human-readable summary: grid, channels, split sizes, non-finite counts, statistics."""
    store = PreparedStore(store_path)
    lines = [
        f"prepared store: {store_path} (format {store.format!r}, config hash {store.attrs['config_hash']})",
        f"grid: {store.lat.shape[0]} x {store.lat.shape[1]}, lat {store.lat.min():.3f}..{store.lat.max():.3f}, "
        f"lon {store.lon.min():.3f}..{store.lon.max():.3f}",
        f"times: {len(store.times)} ({time_str(store.times[0])} .. {time_str(store.times[-1])}); "
        f"train {len(store.split_indices('train'))}, valid {len(store.split_indices('valid'))}",
        f"non-finite values ({store.config['nan_policy']}): {json.dumps(store.attrs['nonfinite_counts'])}",
    ]
    if store.lead_time_labels is not None:
        counts = np.bincount(store.lead_time_labels, minlength=len(store.lead_times))
        lines.insert(
            3,
            "forecast samples by lead time (valid time = init + lead; periods select on valid time): "
            + ", ".join(f"{h:g} h: {n}" for h, n in zip(store.lead_times, counts))
            + f" ({store.attrs.get('forecast_pairs_without_target', 0)} (init, lead) pairs without a target skipped)",
        )
    for group in ("target", "input", "static"):
        for name, m, s in zip(
            getattr(normalizer, f"{group}_channels"),
            getattr(normalizer, f"{group}_mean"),
            getattr(normalizer, f"{group}_std"),
        ):
            lines.append(f"  {group:6s} {name:24s} mean {m:12.5g}  std {s:12.5g}")
    return "\n".join(lines)
