"""The prepared store: what ``data.prepare`` writes and everything else reads.

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
    attrs: format, config_hash, input_fingerprint, data_config, nonfinite_counts, complete, input/target file
           lists ("variables"); source_store, target/input_channel_index ("cwb")
For ``format="cwb"`` nothing big is copied: the store holds the grid, times, static fields and
channel selection, and samples are read from the original CWB Zarr (``PreparedStore.read``).
``<cache_dir>/stats.json`` holds the ``Normalizer`` over the train period.

The store is written as ``data.zarr.partial`` and renamed when complete (``complete`` is its last
attribute); ``stats.json`` likewise. ``input_fingerprint`` (sizes and modification times of the
input files) and ``config_hash`` key both, so a changed config or an edited file is noticed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import zarr

from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.normalization import Normalizer, RunningMoments, save_stats
from jax_corrdiff.data.sources import apply_nan_policy, decode_times, read_cwb_channels, select_period, time_str
from jax_corrdiff.data.transforms import apply_per_channel, parse_transforms

PREPARED_DIR = "prepared"  # WORKDIR/prepared holds the store and its statistics
STORE_NAME = "data.zarr"
STATS_NAME = "stats.json"
PARTIAL_SUFFIX = ".partial"  # a store or stats.json being written, renamed into place when complete
_BLOCK_BYTES = 64 * 2**20  # read/write this much per block of time steps


def time_blocks(n: int, bytes_per_step: int) -> list[slice]:
    """Slices of ``range(n)`` of about ``_BLOCK_BYTES`` each."""
    step = max(1, _BLOCK_BYTES // max(bytes_per_step, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


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
        return self._read(indices, (0, 1))

    def read_inputs(self, indices) -> np.ndarray:
        """Inputs (T, H, W, C_in) float32 at store time ``indices``, the targets left unread."""
        return self._read(indices, (1,))[0]

    def _read(self, indices, groups: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """The arrays of ``groups`` (0: target, 1: inputs) at store time ``indices``."""
        indices = np.asarray(indices, np.int64)
        if self.format == "variables":
            if self._arrays is None:
                g = zarr.open_group(self.path, mode="r")
                self._arrays = (g["target"], g["inputs"])
            return tuple(self._arrays[i].get_orthogonal_selection((indices,)) for i in groups)
        if self._arrays is None:
            g = zarr.open_group(self.attrs["source_store"], mode="r")
            self._arrays = (g["cwb"], g["era5"])
        channel_index = (self.attrs["target_channel_index"], self.attrs["input_channel_index"])
        names = (self.target_channels, self.input_channels)
        out = []
        for i in groups:
            values = read_cwb_channels(self._arrays[i], self._source_index[indices], channel_index[i])
            apply_nan_policy(
                values,
                names[i],
                self.config["nan_policy"],
                self.config["nan_fill_value"],
                paths=[self.attrs["source_store"]] * len(indices),
                times=self.times[indices],
            )
            out.append(values)
        return tuple(out)


def compute_stats(store_path: str) -> Normalizer:
    """Per-channel mean/std of target, inputs and static over the train period; writes stats.json
    beside the store (renamed into place when written) and returns the Normalizer."""
    store = PreparedStore(store_path)
    train = store.split_indices("train")
    h, w = store.lat.shape
    moments_t = RunningMoments(len(store.target_channels))
    moments_i = RunningMoments(len(store.input_channels))
    transforms = parse_transforms(store.config.get("transforms", {}))
    for block in time_blocks(len(train), h * w * 4 * (len(store.target_channels) + len(store.input_channels))):
        target, inputs = store.read(train[block])
        moments_t.update(apply_per_channel(target, store.target_channels, transforms))
        moments_i.update(apply_per_channel(inputs, store.input_channels, transforms))
    moments_s = RunningMoments(len(store.static_channels))
    moments_s.update(store.static)
    (tm, ts), (im, is_), (sm, ss) = moments_t.mean_std(), moments_i.mean_std(), moments_s.mean_std()
    normalizer = Normalizer(
        store.target_channels, tm, ts, store.input_channels, im, is_, store.static_channels, sm, ss, transforms
    )
    path = os.path.join(os.path.dirname(os.path.abspath(store_path)), STATS_NAME)
    save_stats(
        path + PARTIAL_SUFFIX,
        normalizer,
        config_hash=store.attrs["config_hash"],
        input_fingerprint=store.attrs["input_fingerprint"],
        train_period=store.config["train_period"],
    )
    os.replace(path + PARTIAL_SUFFIX, path)
    return normalizer


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
