"""Data layer: xarray sources, regridding/coarsening, offline preparation, normalization, Grain.

Never imports ``models/``, ``diffusion/`` or ``training/``. Typical use:

    store, normalizer = ensure_prepared(config.data, os.path.join(workdir, PREPARED_DIR))
    train_iter = make_train_iterator(DownscalingSource(store, "train", normalizer),
                                     batch_size=8, seed=0, process_index=jax.process_index(),
                                     process_count=jax.process_count())
"""

import importlib.resources
import os

from jax_corrdiff.data.errors import (
    DataError,
    EmptyTimeRangeError,
    ForecastLayoutError,
    GridMismatchError,
    MissingLeadTimeError,
    MissingLevelError,
    MissingTimesError,
    MissingVariableError,
    NoForecastSamplesError,
    NonFiniteDataError,
    PreparedDataMismatchError,
)
from jax_corrdiff.data.normalization import Normalizer, load_stats, save_stats
from jax_corrdiff.data.pipeline import DownscalingSource, make_eval_iterator, make_train_iterator
from jax_corrdiff.data.prepare import ensure_prepared, prepare_dataset
from jax_corrdiff.data.regrid import LatLonBilinear, block_average, degrade
from jax_corrdiff.data.sources import ForecastSource
from jax_corrdiff.data.store import (
    PREPARED_DIR,
    STATS_NAME,
    STORE_NAME,
    PreparedStore,
    compute_stats,
    describe_prepared,
)
from jax_corrdiff.data.synthetic import (
    CHINA3KM_LEVELS,
    CHINA3KM_VARIABLES,
    TAIWAN_CWB_VARIABLES,
    TAIWAN_ERA5_VARIABLES,
    write_china3km_dataset,
    write_cwb_zarr,
)


def demo_data_path(name: str) -> str:
    """Path of a real demo file shipped in ``jax_corrdiff/data_files`` (see its README.md)."""
    folder = importlib.resources.files("jax_corrdiff") / "data_files"
    path = folder / name
    if not path.is_file():
        shipped = sorted(p.name for p in folder.iterdir() if p.name.endswith(".nc"))
        raise FileNotFoundError(f"no demo file {name!r}; shipped: {', '.join(shipped)}")
    return str(path)


__all__ = [
    "CHINA3KM_LEVELS",
    "CHINA3KM_VARIABLES",
    "DataError",
    "DownscalingSource",
    "EmptyTimeRangeError",
    "ForecastLayoutError",
    "ForecastSource",
    "GridMismatchError",
    "LatLonBilinear",
    "MissingLeadTimeError",
    "MissingLevelError",
    "MissingTimesError",
    "MissingVariableError",
    "NoForecastSamplesError",
    "NonFiniteDataError",
    "Normalizer",
    "PREPARED_DIR",
    "PreparedDataMismatchError",
    "PreparedStore",
    "STATS_NAME",
    "STORE_NAME",
    "TAIWAN_CWB_VARIABLES",
    "TAIWAN_ERA5_VARIABLES",
    "block_average",
    "compute_stats",
    "degrade",
    "demo_data_path",
    "describe_prepared",
    "ensure_prepared",
    "load_stats",
    "make_eval_iterator",
    "make_train_iterator",
    "prepare_dataset",
    "save_stats",
    "write_china3km_dataset",
    "write_cwb_zarr",
]


def relocate_shipped_paths(data_config: dict) -> dict:
    """``data_config`` with every recorded path to a shipped demo file
    (``.../jax_corrdiff/data_files/NAME``) that no longer exists re-pointed at this
    installation's copy: a model trained on the demo data keeps generating after the package
    is reinstalled elsewhere or the checkout that trained it is gone. Other paths are kept."""

    def relocated(path: str) -> str:
        parent = os.path.dirname(path)
        shipped = (
            os.path.basename(parent) == "data_files" and os.path.basename(os.path.dirname(parent)) == "jax_corrdiff"
        )
        if not path or os.path.exists(path) or not shipped:
            return path
        try:
            return demo_data_path(os.path.basename(path))
        except FileNotFoundError:
            return path

    out = dict(data_config)
    for key in ("target_paths", "input_paths"):
        if key in out:
            out[key] = [relocated(p) for p in out[key]]
    if "static_path" in out:
        out["static_path"] = relocated(out["static_path"])
    return out
