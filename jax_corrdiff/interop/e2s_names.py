"""Earth2Studio variable names and the names coarse input files use for them.

Earth2Studio names pressure-level fields ``<var><hPa>`` (``z500``, ``t850``, ``q700``) and
surface fields by its own short names (``t2m``, ``u10m``, ``tcwv``).  A file read here holds
ERA5 short names, a pressure-level field as ``<var>@<hPa>`` (a ``level`` dimension; see
:class:`~jax_corrdiff.data.sources.FieldSpec`).  The mapping, both ways:

    ========== =========  ========== =========
    E2S        file       E2S        file
    ========== =========  ========== =========
    t2m        t2m        u100m      u100
    d2m        d2m        v100m      v100
    u10m       u10        msl        msl
    v10m       v10        sp         sp
    tcwv       tcwv       tp         tp
    <v><hPa>   <v>@<hPa>  (v one of z t u v q r w)
    ========== =========  ========== =========

Any other name is used unchanged; ``--variable_map`` overrides the mapping per variable.
"""

from __future__ import annotations

import re

from jax_corrdiff.data.sources import FieldSpec

SURFACE_NAMES = {
    "t2m": "t2m",
    "d2m": "d2m",
    "u10m": "u10",
    "v10m": "v10",
    "u100m": "u100",
    "v100m": "v100",
    "msl": "msl",
    "sp": "sp",
    "tcwv": "tcwv",
    "tp": "tp",
}
_LEVEL_VARIABLES = "ztuvqrw"
_LEVEL_NAME = re.compile(rf"^([{_LEVEL_VARIABLES}])(\d+)$")


def file_variable(name: str, overrides: dict[str, str] | None = None) -> str:
    """The file's name (``name`` or ``name@level``) of an Earth2Studio variable."""
    if overrides and name in overrides:
        return str(FieldSpec.parse(overrides[name]))
    if name in SURFACE_NAMES:
        return SURFACE_NAMES[name]
    match = _LEVEL_NAME.match(name)
    return f"{match.group(1)}@{match.group(2)}" if match else name


def e2s_variable(channel: str) -> str:
    """The Earth2Studio name of one of our channels (the inverse of ``file_variable``)."""
    surface = {ours: theirs for theirs, ours in SURFACE_NAMES.items()}
    if channel in surface:
        return surface[channel]
    spec = FieldSpec.parse(channel)
    if spec.level is not None and spec.name in _LEVEL_VARIABLES and spec.level == int(spec.level):
        return f"{spec.name}{int(spec.level)}"
    return channel


def parse_variable_map(entries: list[str]) -> dict[str, str]:
    """``["z500=geopotential@500", ...]`` (the ``--variable_map`` flag) -> {E2S name: file name}."""
    mapping = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"--variable_map entry {entry!r}: expected E2S_NAME=FILE_VARIABLE")
        mapping[name] = target
    return mapping
