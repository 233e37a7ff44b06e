"""Test-wide JAX setup: four virtual CPU devices so sharding code runs without a GPU; one
persistent compilation cache and unoptimised LLVM for the whole run; fixtures that train built
once per run.

Matmul precision is not set here: training and generation scope it themselves (the run
config's, saved with the model), as do imported PhysicsNeMo models.

Compiling is most of a test's time on CPU (a smoke run's initialisation and train step take
about 12 s each to compile, and run in under a second), so two settings are made here, before
xdist starts its workers, for the workers and every process a test starts to inherit:
- ``JAX_COMPILATION_CACHE_DIR``, one cache for the whole run, which training and generation use
  instead of each workdir's own (``jax_corrdiff.compilation_cache.cache_dir``): dozens of tests
  train the same smoke models, and each program now compiles once per run;
- ``--xla_backend_optimization_level=0``: LLVM compiles XLA's kernels without optimising them.
  XLA's own passes (fusion, layouts, sharding, the convolution library), which is what this
  package's code shapes, run as in production, and every test passes at its unchanged
  tolerance. Compiling gets cheaper and running dearer: ``tests/test_training_steps.py`` took
  60 s instead of 127, the HRRR ZSSD test (guided sampling, compute-bound) 99 s instead of 70,
  and the whole suite 1071 s instead of 1569.
"""

import fcntl
import os
import shutil
import sys
import tempfile

_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_corrdiff_tests_cache_")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def built_once_per_run(tmp_path_factory):
    """``built_once_per_run(name, build)``: the directory ``build(path)`` fills, built by the first
    xdist worker that asks for it and reused by the others, which wait on a lock meanwhile (a
    session fixture is otherwise built once per worker). Tests must only read it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's, shared by its workers

    def once(name: str, build) -> str:
        path, built = root / name, root / f"{name}.built"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
                build(str(path))
                built.touch()
        return str(path)

    return once


@pytest.fixture(scope="session")
def smoke_workdir(built_once_per_run):
    """Both stages of the demo's smoke config, trained briefly once per test run."""
    import demo

    from jax_corrdiff.config import set_stages
    from jax_corrdiff.training.loop import train_and_evaluate

    config = set_stages(demo.get_config("smoke"), training=dict(total_samples=4 * 12, eval_batches=1))
    return built_once_per_run("smoke", lambda workdir: train_and_evaluate(config, workdir))
