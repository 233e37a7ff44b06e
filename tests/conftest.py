"""Test-wide JAX setup: four virtual CPU devices so sharding code runs without a GPU.

Matmul precision is not set here: training and generation scope it themselves (the run
config's, saved with the model), as do imported PhysicsNeMo models.
"""

import jax

jax.config.update("jax_num_cpu_devices", 4)


import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """Both stages of the demo's smoke config, trained briefly once per test session."""
    import demo

    from jax_corrdiff.config import set_stages
    from jax_corrdiff.training.loop import train_and_evaluate

    config = set_stages(demo.get_config("smoke"), training=dict(total_samples=4 * 12, eval_batches=1))
    workdir = str(tmp_path_factory.mktemp("smoke"))
    train_and_evaluate(config, workdir)
    return workdir
