"""Named data errors. Each message names the file and the thing that is wrong with it.

All of them subclass ``DataError(ValueError)``, so callers can catch one family for "the data
does not fit the config" while tests and users can tell the cases apart.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataError(ValueError):
    """The data files do not match the data config."""


def _listing(items: Sequence, limit: int = 12) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class MissingVariableError(DataError):
    """A named variable (or channel, or coordinate) is not in the file."""

    def __init__(self, path: str, variable: str, available: Sequence[str]):
        self.path, self.variable = path, variable
        super().__init__(f"{path}: no variable {variable!r}; the file has: {_listing(available)}")


class MissingLevelError(DataError):
    """``name@level`` asks for a level the variable does not have (or the variable has no levels)."""

    def __init__(self, path: str, variable: str, level: float | None, available: Sequence, reason: str = ""):
        self.path, self.variable, self.level = path, variable, level
        what = f"level {level:g} of {variable!r}" if level is not None else f"a level for {variable!r}"
        detail = reason or f"available levels: {_listing(available)}"
        super().__init__(f"{path}: no {what}; {detail}")


class NonFiniteDataError(DataError):
    """NaN or inf in a field while ``nan_policy == "error"``."""

    def __init__(self, path: str, variable: str, time, count: int):
        self.path, self.variable, self.time, self.count = path, variable, time, count
        when = f"at time {time}" if time is not None else "(static field)"
        super().__init__(
            f"{path}: {variable!r} has {count} non-finite value(s) {when}, the first time step with any; "
            "set data.nan_policy='fill' (with data.nan_fill_value) to replace them"
        )


class GridMismatchError(DataError):
    """Two fields that must share a grid (or overlap in space) do not."""

    def __init__(self, path: str, what: str, detail: str):
        self.path, self.what = path, what
        super().__init__(f"{path}: {what}: {detail}")


class EmptyTimeRangeError(DataError):
    """A requested time period selects no time step of the file."""

    def __init__(self, path: str, requested: Sequence[str], available: Sequence):
        self.path, self.requested, self.available = path, tuple(requested), tuple(available)
        super().__init__(
            f"{path}: no time step in the requested period {requested[0]} .. {requested[1]}; "
            f"the file covers {available[0]} .. {available[1]}"
        )


class MissingTimesError(DataError):
    """The input files lack some of the target's time steps."""

    def __init__(self, path: str, missing: Sequence):
        self.path, self.missing = path, tuple(missing)
        super().__init__(f"{path}: input fields missing at target time(s): {_listing(missing, 10)}")


class PreparedDataMismatchError(DataError):
    """A prepared store exists but was made from a different data config."""

    def __init__(self, path: str, stored_hash: str, wanted_hash: str):
        self.path = path
        super().__init__(
            f"{path}: prepared from a different data config (hash {stored_hash}, this config {wanted_hash}); "
            "delete it, choose another work directory, or prepare with overwrite=True (--overwrite)"
        )


class ForecastLayoutError(DataError):
    """A forecast input file lacks the (init time, lead time) layout that ``data.lead_times`` needs."""

    def __init__(self, path: str, variable: str, detail: str):
        self.path, self.variable = path, variable
        super().__init__(f"{path}: {variable!r} is not laid out as a forecast (init_time, lead_time, ...): {detail}")


class MissingLeadTimeError(DataError):
    """A forecast input file lacks some of the lead times named in ``data.lead_times``."""

    def __init__(self, path: str, missing: Sequence, available: Sequence):
        self.path, self.missing, self.available = path, tuple(missing), tuple(available)
        super().__init__(
            f"{path}: no lead time(s) {_listing([f'{h:g} h' for h in missing])} (data.lead_times); "
            f"the file has {_listing([f'{h:g} h' for h in available])}"
        )


class NoForecastSamplesError(DataError):
    """No (init time, lead time) pair of the forecast inputs has its valid time in the target files."""

    def __init__(self, path: str, detail: str):
        self.path = path
        super().__init__(f"{path}: no forecast sample has a valid time (init + lead) in the target files: {detail}")
