"""Cross-fitting the regression over time blocks (training.cross_fit): fold labels, the
per-sample out-of-fold mean, the checks, and a smoke run that trains and uses the fold models."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_corrdiff.diffusion.residual_mean import CrossFitMean
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.factory import build_model
from jax_corrdiff.training import residuals as residuals_module
from jax_corrdiff.training.cross_fit import CrossFit, fold_directory
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.loop import init_state, train_and_evaluate
from jax_corrdiff.training.regression_means import local_mean_fn
from jax_corrdiff.training.residuals import residual_variances
from jax_corrdiff.training.stage import build_stage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import smoke  # noqa: E402


def test_folds_interleave_blocks_of_block_hours():
    times = np.arange("2019-03-01T00", "2019-03-06T00", dtype="datetime64[h]")
    labels = CrossFit(folds=2, block_hours=24.0).labels(times, times[0])
    days = np.repeat(np.arange(5), 24)
    np.testing.assert_array_equal(labels, days % 2)
    three = CrossFit(folds=3, block_hours=12.0).labels(times, times[0])
    np.testing.assert_array_equal(three, (np.arange(len(times)) // 12) % 3)


def test_a_fold_without_samples_is_refused():
    times = np.arange("2019-03-01T00", "2019-03-02T00", dtype="datetime64[h]")
    cross_fit = CrossFit(folds=2, block_hours=48.0)
    with pytest.raises(ValueError, match="too short"):
        cross_fit.label(_Times(times), _Times(times))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"diffusion.cross_fit.folds": 1}, "folds must be 0"),
        ({"diffusion.cross_fit.block_hours": 0.0}, "block_hours"),
        ({"diffusion.mean": "interpolation"}, "mean='regression'"),
        ({"diffusion.regression_model": "/elsewhere"}, "external"),
    ],
)
def test_settings_that_cannot_cross_fit_are_refused(overrides, message):
    config = smoke(2, stage="all", **{"diffusion.cross_fit.folds": 2, **overrides})
    with pytest.raises(ValueError, match=message):
        CrossFit.from_config(config)


class _Times:
    """A stand-in source: only its times."""

    def __init__(self, times):
        self.times = times

    def with_folds(self, folds):
        raise AssertionError("a fold without samples must be refused before labelling")


class _Scale:
    """A stand-in regression network: img_lr times its one variable."""

    def apply(self, variables, img_lr, *, lead_time_label=None):
        return img_lr * variables["scale"]


def test_each_sample_takes_its_own_fold_models_mean():
    img_lr = jax.random.normal(jax.random.key(0), (4, 3, 5, 2))
    stacked = {"scale": jnp.asarray([1.0, 10.0, 100.0])}
    fold = jnp.asarray([2, 0, 1, 0])
    mean = CrossFitMean(_Scale()).apply(stacked, img_lr, fold=fold)
    expected = img_lr * jnp.asarray([100.0, 1.0, 10.0, 1.0])[:, None, None, None]
    np.testing.assert_allclose(np.asarray(mean), np.asarray(expected), rtol=1e-6)


def test_smoke_run_trains_fold_models_without_their_blocks_and_diffuses_on_them(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = smoke(4, stage="all", **{"diffusion.cross_fit.folds": 2, "diffusion.cross_fit.block_hours": 24.0})
    exported = train_and_evaluate(config, workdir)
    assert sorted(exported) == ["diffusion", "regression", "regression_fold0", "regression_fold1"]

    data = TrainingData.open(config, workdir)
    folds = data.train_source.folds
    days = (data.train_source.times - data.train_source.times.min()) // np.timedelta64(24, "h")
    np.testing.assert_array_equal(folds, days.astype(int) % 2)
    assert data.valid_source.folds is not None
    for fold in (0, 1):
        assert exported[f"regression_fold{fold}"] == os.path.join(fold_directory(workdir, fold), "model")
        saved = load_model(exported[f"regression_fold{fold}"])
        assert saved.source["cross_fit"]["fold"] == fold and saved.source["stage"] == f"regression_fold{fold}"
        kept = data.without_fold(fold).train_source
        assert fold not in kept.folds and len(kept) == int((folds != fold).sum())
        assert set(kept.indices) | set(data.without_fold(1 - fold).train_source.indices) == set(
            data.train_source.indices
        )
    # The diagnostic reads the out-of-fold means the diffusion stage stored (only the full
    # regression model's are computed); computed again, without the stored key, they agree.
    computed = []

    def recording(mean_model, variables):
        computed.append(mean_model)
        return local_mean_fn(mean_model, variables)

    monkeypatch.setattr(residuals_module, "local_mean_fn", recording)
    residuals = residual_variances(workdir)
    assert residuals["train_out_of_fold"]["samples"] == residuals["train"]["samples"] == len(folds)
    assert residuals["train_out_of_fold"]["variance"] != residuals["train"]["variance"]
    assert computed and not any(isinstance(m, CrossFitMean) for m in computed)
    key = os.path.join(workdir, "diffusion", "regression_means", "key.json")
    os.rename(key, key + ".aside")
    recomputed = residual_variances(workdir)
    os.rename(key + ".aside", key)
    assert isinstance(computed[-1], CrossFitMean)
    for moment in ("mean_square", "variance"):
        np.testing.assert_allclose(
            recomputed["train_out_of_fold"][moment], residuals["train_out_of_fold"][moment], rtol=1e-5
        )
    diffusion = load_model(exported["diffusion"])
    assert diffusion.source["cross_fit"] == {"folds": 2, "block_hours": 24.0}

    # The diffusion loss takes each sample's mean from its fold's model: same batch, same noise,
    # other fold labels, another loss; the stacked fold variables are the exported fold models'.
    config.diffusion.precompute_mean = False
    in_step = build_stage(config, "diffusion", workdir, data)
    fold_variables = [load_model(exported[f"regression_fold{k}"]).variables for k in (0, 1)]
    for k in (0, 1):
        for stacked, alone in zip(
            jax.tree_util.tree_leaves(in_step.frozen), jax.tree_util.tree_leaves(fold_variables[k]), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(stacked[k]), alone)
    batch = {k: jnp.asarray(v) for k, v in next(data.valid_iterator(2)).items() if k in ("target", "img_lr")}
    state = init_state(in_step)
    losses = [
        in_step.loss_fn(
            state.params, state.constants, dict(batch, fold=jnp.full(2, k)), jax.random.key(1), in_step.frozen, False
        )
        for k in (0, 1)
    ]
    assert not np.allclose(np.asarray(losses[0]), np.asarray(losses[1]))

    # Precomputed (the default, which the run trained with): a sample's stored mean is its own
    # fold model's, the same as the step computes; the step holds no regression weights.
    config.diffusion.precompute_mean = True
    stage = build_stage(config, "diffusion", workdir, data)
    assert stage.frozen == {}
    network = build_model(load_model(exported["regression_fold0"]).config)
    train = next(stage.data.train_iterator(4, seed=0))
    assert len(set(train["fold"].tolist())) == 2, "the batch should hold samples of both folds"
    for b, k in enumerate(train["fold"]):
        mean = network.apply(fold_variables[k], jnp.asarray(train["img_lr"][b : b + 1]))
        np.testing.assert_allclose(train["regression_mean"][b], np.asarray(mean)[0], rtol=1e-5, atol=1e-5)
