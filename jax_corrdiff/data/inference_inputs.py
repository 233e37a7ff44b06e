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

from jax_corrdiff.data.errors import MissingTimesError
from jax_corrdiff.data.prepare import data_config_dict, input_regridder, read_static, require_on_grid
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


@dataclasses.dataclass
class InferenceInputs:
    """``read(k)`` -> (inputs (B, H, W, C_in), truth (B, H, W, C_out) or None), physical units,
    for the k-th..k+B-th selected times; ``times`` are the selected times."""

    path: str
    times: np.ndarray
    static: np.ndarray
    input_channels: tuple[str, ...]
    target_channels: tuple[str, ...]
    has_truth: bool
    _inputs: FieldSource
    _truth: FieldSource | None
    _rows: np.ndarray
    _regrid: Callable[[np.ndarray], np.ndarray] | None
    _nan_policy: tuple[str, float]
    init_times: np.ndarray | None = None
    lead_time_labels: np.ndarray | None = None
    _leads: np.ndarray | None = None  # forecast: lead index of each selected sample (_rows = init index)

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
        """``lead_time`` (hours) picks one lead of a forecast file, so each valid time is one sample."""
        cfg = data_config_dict(data_config)
        if cfg["format"] != "variables":
            raise ValueError(f"generation reads NetCDF/Zarr variables; data.format {cfg['format']!r} is not supported")
        if cfg.get("lead_times"):
            if coarsen:
                raise ValueError(
                    "a forecast-input model (data.lead_times) generates from forecast files, not coarsened truth"
                )
            return cls._open_forecast(cfg, path, lat=lat, lon=lon, period=period, times=times, lead_time=lead_time)
        if lead_time is not None:
            raise ValueError("lead_time applies to forecast-input models (data.lead_times) only")
        inputs = FieldSource([path], cfg["input_variables"], "inputs")
        truth, regrid = None, None
        if coarsen:
            truth = FieldSource([path], cfg["target_variables"], "truth")
            require_on_grid(truth, lat, lon, "truth fields", "the model's grid")
            require_on_grid(inputs, lat, lon, "fields to coarsen", "the model's grid")
            factor = int(cfg["coarsen_factor"])
            regrid = lambda x: degrade(x, factor)  # noqa: E731
        else:
            regrid = input_regridder(inputs, lat, lon)
        rows = _select_times(inputs.times, inputs.paths[0], period, times)
        static, _ = read_static(cfg, lat, lon, "the model's grid")
        return cls(
            path=path,
            times=inputs.times[rows],
            static=static,
            input_channels=tuple(str(f) for f in inputs.fields),
            target_channels=tuple(str(FieldSpec.parse(v)) for v in cfg["target_variables"]),
            has_truth=coarsen,
            _inputs=inputs,
            _truth=truth,
            _rows=rows,
            _regrid=regrid,
            _nan_policy=(cfg["nan_policy"], float(cfg["nan_fill_value"])),
        )

    @classmethod
    def _open_forecast(cls, cfg: dict, path: str, *, lat, lon, period, times, lead_time) -> InferenceInputs:
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
        init_i, lead_i, valid = init_i[order], lead_i[order], valid[order]
        keep = _select_times(valid, path, period, times)
        static, _ = read_static(cfg, lat, lon, "the model's grid")
        return cls(
            path=path,
            times=valid[keep],
            static=static,
            input_channels=tuple(str(f) for f in inputs.fields),
            target_channels=tuple(str(FieldSpec.parse(v)) for v in cfg["target_variables"]),
            has_truth=False,
            _inputs=inputs,
            _truth=None,
            _rows=init_i[keep],
            _regrid=input_regridder(inputs, lat, lon),
            _nan_policy=(cfg["nan_policy"], float(cfg["nan_fill_value"])),
            init_times=inputs.init_times[init_i[keep]],
            lead_time_labels=lead_i[keep].astype(np.int32),
            _leads=lead_i[keep],
        )

    def __len__(self) -> int:
        return len(self._rows)

    def _read(self, source, rows: np.ndarray, leads: np.ndarray | None = None) -> np.ndarray:
        if leads is None:
            values, when = source.read(rows), source.times[rows]
        else:
            values, when = source.read(rows, leads), source.valid_times(rows, leads)
        policy, fill = self._nan_policy
        apply_nan_policy(
            values, [str(f) for f in source.fields], policy, fill, paths=[self.path] * len(rows), times=when
        )
        return values

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        rows = self._rows[start:stop]
        leads = None if self._leads is None else self._leads[start:stop]
        inputs = self._read(self._inputs, rows, leads)
        if self._regrid is not None:
            inputs = self._regrid(inputs)
        truth = self._read(self._truth, rows) if self._truth is not None else None
        return inputs, truth
