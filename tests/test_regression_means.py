"""Regression means computed once per sample (training.regression_means): the stored mean is the
one the step would compute, the loss is unchanged, the means are reused only when nothing they
depend on changed, and processes split the work between them."""

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.store import PreparedStore
from jax_corrdiff.diffusion.residual_mean import PrecomputedMean
from jax_corrdiff.models.factory import build_model, init_variables
from jax_corrdiff.training import regression_means
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.stage import conditioning_layout, model_config
from jax_corrdiff.training.steps import diffusion_per_sample_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import smoke  # noqa: E402

BATCH = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo data and a smoke-width regression network with random weights everywhere (an
    initialised one's output layer starts near zero, and so would every mean)."""
    workdir = str(tmp_path_factory.mktemp("means"))
    config = smoke(1, stage="diffusion")
    data = TrainingData.open(config, workdir)
    net_config = model_config(config, "regression", conditioning_layout(config, "regression", data), data.grid[0].shape)
    variables = init_variables(net_config, jax.random.key(3))
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(6), len(leaves))
    noisy = [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    variables = jax.device_get(jax.tree_util.tree_unflatten(tree, noisy))
    return config, data, build_model(net_config), variables, workdir


def _means(data, network, variables, directory, config):
    with jax.default_matmul_precision(config.matmul_precision):
        return regression_means.with_regression_means(
            data, network, variables, directory, BATCH, config.matmul_precision
        )


def _stored(directory):
    return np.load(os.path.join(directory, regression_means.MEANS_DIR, regression_means.MEANS_FILE))


def test_each_sample_carries_the_mean_the_step_computes_and_the_loss_is_unchanged(setup, tmp_path):
    config, data, network, variables, _ = setup
    carrying = _means(data, network, variables, str(tmp_path), config)
    layout = conditioning_layout(config, "diffusion", data)
    diff_config = model_config(config, "diffusion", layout, data.grid[0].shape)
    diffusion = build_model(diff_config)
    diff_variables = init_variables(diff_config, jax.random.key(4))
    losses = {
        name: jax.jit(
            diffusion_per_sample_loss(diffusion, mean, layout, p_mean=0.0, p_std=1.2, sigma_data=0.5), static_argnums=5
        )
        for name, mean in (("in the step", network), ("precomputed", PrecomputedMean()))
    }
    forward = jax.jit(network.apply)
    seen = 0
    with jax.default_matmul_precision(config.matmul_precision):
        for source in (carrying.train_source, carrying.valid_source):
            for i, batch in enumerate(regression_means.make_eval_iterator(source, batch_size=BATCH)):
                keep = batch["mask"]
                computed = np.asarray(forward(variables, jnp.asarray(batch["img_lr"])))
                np.testing.assert_allclose(batch["regression_mean"][keep], computed[keep], rtol=1e-5, atol=1e-5)
                seen += int(keep.sum())
                assert np.abs(computed[keep]).mean() > 0.05, "means this small could not tell a wrong one"
                if i < 2:
                    args = (diff_variables["params"], {}, {k: jnp.asarray(v) for k, v in batch.items()})
                    step_loss = losses["in the step"](*args, jax.random.key(5), variables, True)
                    read_loss = losses["precomputed"](*args, jax.random.key(5), {}, True)
                    np.testing.assert_allclose(np.asarray(read_loss), np.asarray(step_loss), rtol=1e-5)
    assert seen == len(data.train_source) + len(data.valid_source) == _stored(str(tmp_path)).shape[0]


def test_means_are_reused_only_when_nothing_they_depend_on_changed(setup, tmp_path, monkeypatch):
    config, data, network, variables, _ = setup
    computed = []
    original = regression_means.compute_means

    def recording(*args, **kwargs):
        computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(regression_means, "compute_means", recording)
    directory = str(tmp_path)
    _means(data, network, variables, directory, config)
    first = _stored(directory)
    _means(data, network, variables, directory, config)
    assert len(computed) == 1, "the same model, variables and data should reuse the stored means"

    changed = jax.tree_util.tree_map(lambda v: v * 1.01, variables)
    _means(data, network, changed, directory, config)
    assert len(computed) == 2 and not np.allclose(_stored(directory), first)

    # A crash before the key was written: the means are recomputed, not trusted.
    os.remove(os.path.join(directory, regression_means.MEANS_DIR, regression_means.KEY_FILE))
    _means(data, network, changed, directory, config)
    assert len(computed) == 3
    assert sorted(os.listdir(os.path.join(directory, regression_means.MEANS_DIR))) == [
        regression_means.KEY_FILE,
        regression_means.MEANS_FILE,
    ]


def test_processes_split_the_samples_and_write_one_file(setup, tmp_path, monkeypatch):
    config, data, network, variables, workdir = setup
    reads = {"targets and inputs": 0, "inputs": 0}
    for method, what in (("read", "targets and inputs"), ("read_inputs", "inputs")):
        original = getattr(PreparedStore, method)

        def counting(store, indices, original=original, what=what):
            reads[what] += 1  # Grain's read threads: a lost increment cannot turn a count to 0
            return original(store, indices)

        monkeypatch.setattr(PreparedStore, method, counting)
    one = _means(data, network, variables, str(tmp_path / "one"), config)
    assert reads["targets and inputs"] == 0 and reads["inputs"] >= len(data.train_source), reads
    alone = _stored(str(tmp_path / "one"))
    assert np.all(np.abs(alone).reshape(len(alone), -1).max(axis=1) > 0), "every sample's row is written"
    shared = str(tmp_path / "shared.npy")
    np.lib.format.open_memmap(shared, mode="w+", dtype=np.float32, shape=alone.shape).flush()
    with jax.default_matmul_precision(config.matmul_precision):
        written = [
            regression_means.compute_means(shared, network, variables, data, BATCH, process, 2) for process in (0, 1)
        ]
    assert sum(written) == len(alone) and abs(written[0] - written[1]) <= 2
    np.testing.assert_allclose(np.load(shared), alone, rtol=1e-5, atol=1e-6)
    assert one.train_source.regression_means_path.startswith(str(tmp_path / "one"))


def test_too_little_disk_and_a_wrong_file_are_clear_errors(setup, tmp_path, monkeypatch):
    config, data, network, variables, _ = setup
    monkeypatch.setattr(regression_means.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(OSError, match="GiB free"):
        _means(data, network, variables, str(tmp_path), config)
    monkeypatch.undo()
    wrong = str(tmp_path / "wrong.npy")
    np.save(wrong, np.zeros((3, 2, 2, 1), np.float32))
    with pytest.raises(DataError, match="regression means, expected float32"):
        data.with_regression_means(wrong)
