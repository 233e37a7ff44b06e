"""Cyclic time features: where a time sits in the day and in the year, as sin/cos pairs.

A diffusion prior without a coarse input (ZSSD) learns the diurnal and seasonal cycle from
these: phase_h = 2 pi hour / 24 and phase_d = 2 pi (day of year - 1 + hour / 24) / 365.25, as
[sin phase_h, cos phase_h, sin phase_d, cos phase_d]. sin/cos make 23:00 and 00:00 (and
31 December and 1 January) neighbours.
"""

from __future__ import annotations

import numpy as np

TIME_FEATURES = ("hour_sin", "hour_cos", "day_of_year_sin", "day_of_year_cos")


def cyclic_time_features(times) -> np.ndarray:
    """datetime64 times (N,) -> float32 (N, 4) features in the order of ``TIME_FEATURES``."""
    times = np.asarray(times, "datetime64[m]")
    years = times.astype("datetime64[Y]")
    hours = (times - times.astype("datetime64[D]")).astype(np.int64) / 60.0
    days = (times.astype("datetime64[D]") - years.astype("datetime64[D]")).astype(np.int64)
    phase_h = 2.0 * np.pi * hours / 24.0
    phase_d = 2.0 * np.pi * (days + hours / 24.0) / 365.25
    return np.stack([np.sin(phase_h), np.cos(phase_h), np.sin(phase_d), np.cos(phase_d)], -1).astype(np.float32)
