"""Train CorrDiff: ``python -m jax_corrdiff.train --config=configs/NAME.py --workdir=DIR``.

``config.stage`` picks "regression", "diffusion" (reads the regression model named in
``config.diffusion.regression_model``, default DIR/regression/model), "all" or "prior"
(the ZSSD prior, ``configs/zssd_era5_uk.py``). Rerunning
the same command resumes from the latest checkpoint. Several processes (one per GPU/host):
see ``jax_corrdiff.distributed`` and ``launch/``.
"""

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from jax_corrdiff import distributed
from jax_corrdiff.console import exit_on, log_progress_to_stdout
from jax_corrdiff.cpu_devices import split_cores_for_training
from jax_corrdiff.data.errors import DataError
from jax_corrdiff.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, models and logs.", required=True)
flags.mark_flags_as_required(["config"])


@exit_on(DataError, FileNotFoundError)
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    log = log_progress_to_stdout()
    config = _CONFIG.value
    cpu_split = split_cores_for_training(config)
    distributed.initialize()
    log.info(
        "JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(), jax.process_count(), jax.devices()
    )
    if jax.default_backend() == "cpu":
        log.info(cpu_split)
    log.info("config:\n%s", config)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
            json.dump(json.loads(config.to_json()), f, indent=2)
    exported = train_and_evaluate(config, _WORKDIR.value)
    for stage, path in exported.items():
        print(f"{stage} model: {path}")


if __name__ == "__main__":
    app.run(main)
