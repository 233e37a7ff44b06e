"""The data config: the fields of ``config.data`` that define a prepared store, checked.

``data_config_dict`` turns ``config.data`` into plain JSON values and checks them; the hash of
that dict names the store it prepares (``config_hash``), so a store is reused only for the same
data. A config that names a ``synthetic_dataset`` gets its file paths from that dataset, written
under the prepared directory by ``with_synthetic_files`` (tests and smoke runs).
``input_fingerprint`` keys the store on the files themselves, so editing one re-prepares.
"""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd

from jax_corrdiff.data.sources import expand_paths
from jax_corrdiff.data.synthetic import write_synthetic_dataset
from jax_corrdiff.data.transforms import parse_transforms

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
# Hashed only when set, so stores of configs that leave them empty keep their hash.
OPTIONAL_DATA_FIELDS = ("lead_times", "synthetic_dataset", "transforms")
SYNTHETIC_DIR = "synthetic"  # <prepared dir>/synthetic/<name>: the files of a synthetic dataset


def _json(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def _check_date(value, key: str) -> None:
    try:
        parsed = pd.Timestamp(str(value))
    except ValueError as exc:  # pandas' DateParseError and OutOfBoundsDatetime included
        raise ValueError(f"{key}: {value!r} is not a date ({exc})") from None
    if parsed is pd.NaT:
        raise ValueError(f"{key}: {value!r} is not a date (write e.g. '2019-03-01' or '2019-03-01T06')")


def _check(cfg: dict) -> None:
    """Raise ValueError naming the first data-config field that cannot work."""
    if cfg.get("lead_times"):
        leads = [float(h) for h in cfg["lead_times"]]
        if len(set(leads)) != len(leads) or min(leads) < 0:
            raise ValueError(f"data.lead_times must be distinct non-negative hours, got {cfg['lead_times']!r}")
        if cfg["format"] != "variables" or not cfg["input_paths"]:
            raise ValueError("data.lead_times needs data.format='variables' and forecast files in data.input_paths")
    unknown = sorted(set(cfg.get("transforms", {})) - set(cfg["target_variables"]) - set(cfg["input_variables"]))
    if unknown:
        raise ValueError(f"data.transforms names {unknown}, which are not target or input variables")
    parse_transforms(cfg.get("transforms", {}))
    if cfg["format"] not in ("variables", "cwb"):
        raise ValueError(f"data.format must be 'variables' or 'cwb', not {cfg['format']!r}")
    if cfg["nan_policy"] not in ("error", "fill"):
        raise ValueError(f"data.nan_policy must be 'error' or 'fill', not {cfg['nan_policy']!r}")
    for key in ("train_period", "valid_period"):
        if len(cfg[key]) != 2:
            raise ValueError(f"data.{key} must be [start, end], got {cfg[key]!r}")
        if list(cfg[key]) == ["", ""]:  # unset: a model read from an Earth2Studio package has no periods
            continue
        for bound in cfg[key]:
            _check_date(bound, f"data.{key}")
    for key in ("target_paths", "target_variables", "input_variables"):
        if not cfg[key]:
            raise ValueError(f"data.{key} is empty")
    if bool(cfg["static_path"]) != bool(cfg["static_variables"]):
        raise ValueError("data.static_path and data.static_variables must be given together")
    if cfg["format"] == "cwb" and cfg["input_paths"]:
        raise ValueError("data.format='cwb' reads inputs from the store's era5 array; data.input_paths must be empty")
    if cfg["format"] == "variables" and not cfg["input_paths"] and int(cfg["coarsen_factor"]) < 1:
        raise ValueError("paired synthetic inputs need data.coarsen_factor >= 1")


def data_config_dict(data_cfg) -> dict:
    """The fields of ``config.data`` that define the prepared data, as plain JSON values, checked."""
    missing = [k for k in DATA_FIELDS if k not in data_cfg]
    if missing:
        raise ValueError(f"data config lacks {', '.join(missing)}")
    cfg = {k: _json(data_cfg[k]) for k in DATA_FIELDS}
    cfg.update({k: _json(data_cfg[k]) for k in OPTIONAL_DATA_FIELDS if data_cfg.get(k)})
    _check(cfg)
    return cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _file_stamps(path: str) -> list[tuple[str, int, int]]:
    """(path, size, modification time in ns) of ``path``, or of every file under a directory (Zarr)."""
    if not os.path.isdir(path):
        stat = os.stat(path)
        return [(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)]
    stamps = []
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            stamps.append((os.path.abspath(os.path.join(root, name)), stat.st_size, stat.st_mtime_ns))
    return sorted(stamps)


def input_fingerprint(cfg: dict) -> str:
    """Hash of the size and modification time of every file the data config reads (target, input
    and static files; each file of a Zarr store): a prepared store is stale once any changes."""
    paths = expand_paths(cfg["target_paths"], "data.target_paths")
    if cfg["input_paths"]:
        paths += expand_paths(cfg["input_paths"], "data.input_paths")
    if cfg["static_path"]:
        paths += expand_paths([cfg["static_path"]], "data.static_path")
    return files_fingerprint(paths)


def files_fingerprint(paths: list[str]) -> str:
    """Hash of the paths, sizes and modification times of ``paths`` (every file of a directory)."""
    stamps = [stamp for path in paths for stamp in _file_stamps(path)]
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def with_synthetic_files(data_cfg, prepared_dir: str) -> dict:
    """``data_config_dict`` of ``data_cfg``, with the paths of its ``synthetic_dataset`` (written
    under ``prepared_dir`` on first use) when it names one."""
    name = data_cfg.get("synthetic_dataset")
    if not name:
        return data_config_dict(data_cfg)
    paths = write_synthetic_dataset(name, os.path.join(prepared_dir, SYNTHETIC_DIR, name))
    return data_config_dict({**_plain(data_cfg), **paths})


def _plain(data_cfg) -> dict:
    return data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
