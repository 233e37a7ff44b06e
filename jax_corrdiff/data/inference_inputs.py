"""Coarse inputs for generation, on the model's target grid, read a batch of times at a time.

Two modes (the data config is the one the model was trained with):
- coarse file (``coarsen=False``): any xarray-readable file with the configured input
  variables on its own regular lat/lon grid (a reanalysis or a global forecast), bilinearly
  interpolated to the target grid; or already on the target grid.
- coarsened truth (``coarsen=True``): a file of the training target schema on the target
  grid; the inputs are made exactly as in training (area-average by ``coarsen_factor``,
  bilinear back), and the truth is kept for verification.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jax_corrdiff.data.errors import MissingTimesError
from jax_corrdiff.data.prepare import data_config_dict, input_regridder, read_static, require_on_grid
from jax_corrdiff.data.regrid import degrade
from jax_corrdiff.data.sources import FieldSource, FieldSpec, apply_nan_policy, select_period, time_str


def _select_times(source: FieldSource, period: Sequence[str] | None, times: Sequence[str] | None) -> np.ndarray:
    """Indices into ``source.times``: a [start, end] period, a list of times, or all."""
    if period is not None and times is not None:
        raise ValueError("give a time period or a list of times, not both")
    path = source.paths[0]
    if period is not None:
        return select_period(source.times, period, path)
    if times is None:
        return np.arange(len(source.times))
    wanted = np.array([np.datetime64(t, "ns") for t in times])
    pos = np.clip(np.searchsorted(source.times, wanted), 0, len(source.times) - 1)
    missing = source.times[pos] != wanted
    if missing.any():
        raise MissingTimesError(path, [time_str(t) for t in wanted[missing]])
    return pos


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

    @classmethod
    def open(cls, data_config, path: str, *, coarsen: bool, lat: np.ndarray, lon: np.ndarray,
             period: Sequence[str] | None = None, times: Sequence[str] | None = None) -> InferenceInputs:  # fmt: skip
        cfg = data_config_dict(data_config)
        if cfg["format"] != "variables":
            raise ValueError(f"generation reads NetCDF/Zarr variables; data.format {cfg['format']!r} is not supported")
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
        rows = _select_times(inputs, period, times)
        static, _ = read_static(cfg, lat, lon, "the model's grid")
        return cls(
            path=path, times=inputs.times[rows], static=static,
            input_channels=tuple(str(f) for f in inputs.fields),
            target_channels=tuple(str(FieldSpec.parse(v)) for v in cfg["target_variables"]),
            has_truth=coarsen, _inputs=inputs, _truth=truth, _rows=rows, _regrid=regrid,
            _nan_policy=(cfg["nan_policy"], float(cfg["nan_fill_value"])),
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._rows)

    def _read(self, source: FieldSource, rows: np.ndarray) -> np.ndarray:
        values = source.read(rows)
        policy, fill = self._nan_policy
        apply_nan_policy(values, [str(f) for f in source.fields], policy, fill,
                         paths=[self.path] * len(rows), times=source.times[rows])  # fmt: skip
        return values

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        rows = self._rows[start:stop]
        inputs = self._read(self._inputs, rows)
        if self._regrid is not None:
            inputs = self._regrid(inputs)
        truth = self._read(self._truth, rows) if self._truth is not None else None
        return inputs, truth
