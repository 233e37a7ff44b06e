"""Test-wide JAX setup: four virtual CPU devices so sharding code runs without a GPU."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")


import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """Both stages of the demo's smoke config, trained briefly once per test session."""
    import demo

    from jax_corrdiff.training.loop import train_and_evaluate

    config = demo.get_config("smoke")
    for stage in (config.regression, config.diffusion):
        stage.training.total_samples = stage.training.batch_size * 12
        stage.training.eval_batches = 1
    workdir = str(tmp_path_factory.mktemp("smoke"))
    train_and_evaluate(config, workdir)
    return workdir
