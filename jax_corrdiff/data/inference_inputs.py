"""Coarse inputs for generation, on the model's target grid, read a batch of times at a time.

Two modes (the data config is the one the model was trained with):
- coarse file (``coarsen=False``): any xarray-readable file with the configured input
  variables on its own regular lat/lon grid (a reanalysis or a global forecast), bilinearly
  interpolated to the target grid; or already on the target grid.
- coarsened truth (``coarsen=True``): a file of the training target schema on the target
  grid; the inputs are made exactly as in training (area-average by ``coarsen_factor``,
  bilinear back), and the truth is kept for verification.

Forecast inputs (the data config has ``lead_times``): the file is laid out (init_time, lead_time,
[level,] lat, lon) and every (init, lead) with lead in ``lead_times`` is one sample; ``times`` are
their VALID times (init + lead; sorted, then by lead, so a valid time may repeat), ``init_times``
their init times and ``lead_time_labels`` (int32, index into ``lead_times``) the label the
lead-time aware models take. A period or list of times selects on valid time.
For analysis inputs ``init_times`` and ``lead_time_labels`` are None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jax_corrdiff.data.data_config import data_config_dict
from jax_corrdiff.data.errors import MissingTimesError
from jax_corrdiff.data.grids import input_regridder, read_static, require_on_grid
from jax_corrdiff.data.regrid import degrade
from jax_corrdiff.data.sources import (
    FieldSource,
    FieldSpec,
    ForecastSource,
    apply_nan_policy,
    select_period,
    time_str,
)


def _select_times(
    source_times: np.ndarray, path: str, period: Sequence[str] | None, times: Sequence[str] | None
) -> np.ndarray:
    """Indices into ``source_times`` (sorted, may repeat): a [start, end] period, a list of times
    (every position holding each), or all."""
    if period is not None and times is not None:
        raise ValueError("give a time period or a list of times, not both")
    if period is not None:
        return select_period(source_times, period, path)
    if times is None:
        return np.arange(len(source_times))
    wanted = np.array([np.datetime64(t, "ns") for t in times])
    lo, hi = np.searchsorted(source_times, wanted, "left"), np.searchsorted(source_times, wanted, "right")
    missing = lo == hi
    if missing.any():
        raise MissingTimesError(path, [time_str(t) for t in wanted[missing]])
    return np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])


def _analysis_records(cfg: dict, path: str, lat, lon, coarsen: bool):
    """(inputs, truth or None, regrid, record index, record times) of a file with a time axis."""
    inputs = FieldSource([path], cfg["input_variables"], "inputs")
    if not coarsen:
        return inputs, None, input_regridder(inputs, lat, lon), (np.arange(len(inputs.times)),), inputs.times
    truth = FieldSource([path], cfg["target_variables"], "truth")
    require_on_grid(truth, lat, lon, "truth fields", "the model's grid")
    require_on_grid(inputs, lat, lon, "fields to coarsen", "the model's grid")
    factor = int(cfg["coarsen_factor"])
    return inputs, truth, lambda x: degrade(x, factor), (np.arange(len(inputs.times)),), inputs.times


def _forecast_records(cfg: dict, path: str, lat, lon, lead_time: float | None):
    """(inputs, None, regrid, (init index, lead index), valid times) of every (init, lead) of a
    forecast file (of lead ``lead_time`` only, if given), sorted by valid time, then lead."""
    inputs = ForecastSource([path], cfg["input_variables"], cfg["lead_times"], "forecast inputs")
    n_init, n_lead = len(inputs.init_times), len(inputs.lead_times)
    init_i, lead_i = (a.ravel() for a in np.meshgrid(np.arange(n_init), np.arange(n_lead), indexing="ij"))
    if lead_time is not None:
        leads = [float(h) for h in cfg["lead_times"]]
        if float(lead_time) not in leads:
            raise ValueError(f"lead time {lead_time} h is not one of the model's lead times {leads}")
        one = lead_i == leads.index(float(lead_time))
        init_i, lead_i = init_i[one], lead_i[one]
    valid = inputs.valid_times(init_i, lead_i)
    order = np.lexsort((lead_i, valid))
    return inputs, None, input_regridder(inputs, lat, lon), (init_i[order], lead_i[order]), valid[order]


@dataclasses.dataclass
class InferenceInputs:
    """``read(start, stop)`` -> (inputs (B, H, W, C_in), truth (B, H, W, C_out) or None), physical
    units, for the selected samples start..stop; ``times`` are their (valid) times."""

    path: str
    times: np.ndarray
    static: np.ndarray
    input_channels: tuple[str, ...]
    target_channels: tuple[str, ...]
    _inputs: FieldSource | ForecastSource
    _truth: FieldSource | None
    _index: tuple[np.ndarray, ...]  # each selected sample's record: (time index,) or (init, lead) index
    _regrid: Callable[[np.ndarray], np.ndarray] | None
    _nan_policy: tuple[str, float]

    @classmethod
    def open(
        cls,
        data_config,
        path: str,
        *,
        coarsen: bool,
        lat: np.ndarray,
        lon: np.ndarray,
        period: Sequence[str] | None = None,
        times: Sequence[str] | None = None,
        lead_time: float | None = None,
    ) -> InferenceInputs:
        """The samples of ``path`` in ``period`` or at ``times`` (default: all), for a model trained
        with ``data_config`` on the (lat, lon) grid. ``lead_time`` (hours) picks one lead of a
        forecast file, so each valid time is one sample."""
        cfg = data_config_dict(data_config)
        if cfg["format"] != "variables":
            raise ValueError(f"generation reads NetCDF/Zarr variables; data.format {cfg['format']!r} is not supported")
        if cfg.get("lead_times") and coarsen:
            raise ValueError(
                "a forecast-input model (data.lead_times) generates from forecast files, not coarsened truth"
            )
        if not cfg.get("lead_times") and lead_time is not None:
            raise ValueError("lead_time applies to forecast-input models (data.lead_times) only")
        if cfg.get("lead_times"):
            inputs, truth, regrid, index, record_times = _forecast_records(cfg, path, lat, lon, lead_time)
        else:
            inputs, truth, regrid, index, record_times = _analysis_records(cfg, path, lat, lon, coarsen)
        keep = _select_times(record_times, path, period, times)
        return cls(
            path=path,
            times=record_times[keep],
            static=read_static(cfg, lat, lon, "the model's grid")[0],
            input_channels=tuple(str(f) for f in inputs.fields),
            target_channels=tuple(str(FieldSpec.parse(v)) for v in cfg["target_variables"]),
            _inputs=inputs,
            _truth=truth,
            _index=tuple(i[keep] for i in index),
            _regrid=regrid,
            _nan_policy=(cfg["nan_policy"], float(cfg["nan_fill_value"])),
        )

    @property
    def has_truth(self) -> bool:
        return self._truth is not None

    @property
    def init_times(self) -> np.ndarray | None:
        """Forecast inputs: each sample's init time (None for analysis inputs)."""
        return self._inputs.init_times[self._index[0]] if isinstance(self._inputs, ForecastSource) else None

    @property
    def lead_time_labels(self) -> np.ndarray | None:
        """Forecast inputs: each sample's lead-time label, int32 index into ``lead_times`` (else None)."""
        return self._index[1].astype(np.int32) if isinstance(self._inputs, ForecastSource) else None

    def __len__(self) -> int:
        return len(self.times)

    def _read(self, source, index: tuple[np.ndarray, ...]) -> np.ndarray:
        values = source.read(*index)
        policy, fill = self._nan_policy
        names = [str(f) for f in source.fields]
        apply_nan_policy(values, names, policy, fill, paths=[self.path] * len(values), times=source.times_of(*index))
        return values

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        index = tuple(i[start:stop] for i in self._index)
        inputs = self._read(self._inputs, index)
        if self._regrid is not None:
            inputs = self._regrid(inputs)
        return inputs, (self._read(self._truth, index) if self._truth is not None else None)
