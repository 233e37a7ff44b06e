"""Prepare the data of a config once: ``python -m jax_corrdiff.prepare --config=configs/X.py --workdir=DIR``.

Regrids/coarsens into DIR/prepared/data.zarr (reused when made from the same data config),
computes the train-period statistics into DIR/prepared/stats.json, and prints a summary.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from jax_corrdiff.console import exit_on
from jax_corrdiff.data import compute_stats, describe_prepared, prepare_dataset
from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.store import PREPARED_DIR

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file whose get_config() has a `data` field.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory; prepared data goes to WORKDIR/prepared.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild a prepared store made from a different data config.")
flags.mark_flags_as_required(["config", "workdir"])


@exit_on(DataError, FileNotFoundError)
def main(argv):
    del argv
    cache_dir = os.path.join(_WORKDIR.value, PREPARED_DIR)
    store = prepare_dataset(_CONFIG.value.data, cache_dir, overwrite=_OVERWRITE.value)
    print(describe_prepared(store, compute_stats(store)))


if __name__ == "__main__":
    app.run(main)
