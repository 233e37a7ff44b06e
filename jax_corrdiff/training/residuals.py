"""Residual diagnostic: does the regression mean fit its own training period better than new data?

The diffusion stage learns the distribution of the residual r = y - mu(img_lr) over the
training period (CorrDiff, Mardani et al. 2023, eq. 3). If the regression network mu has
fitted its training targets better than it predicts unseen ones, E[r^2] over the training
period is smaller than over new data, and a diffusion model trained on those residuals
samples too little spread where it is used (an under-dispersed ensemble).

    python -c "from jax_corrdiff.training.residuals import residual_variances; print(residual_variances('WORKDIR'))"
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jax_corrdiff.data.normalization import load_stats
from jax_corrdiff.data.pipeline import DownscalingSource, make_eval_iterator
from jax_corrdiff.data.store import PREPARED_DIR, STATS_NAME, STORE_NAME
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.factory import build_model
from jax_corrdiff.training.cross_fit import CrossFit, fold_mean, folds_directory, load_fold_models
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.regression_means import local_mean_fn, means_key, stored_means

MeanFn = Callable[[dict], np.ndarray]  # batch -> the mean of its samples


def residual_moments(mean_fn: MeanFn, batches: Iterable[dict]) -> dict:
    """Moments of r = target - mean_fn(batch) per target channel, pooled over the valid samples
    (``mask``, where present) and all pixels of ``batches`` (dicts of NHWC ``target``,
    ``img_lr``, optional ``lead_time_label``, ``fold`` and ``mask``).

    Returns {"mean_square": E[r^2], "variance": E[r^2] - E[r]^2, "samples": count}, both per
    channel (lists), in the units of ``target``.
    """
    total, total_sq, pixels, samples = 0.0, 0.0, 0, 0
    for batch in batches:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["target"]), bool)), bool)
        if not keep.any():
            continue
        mean = np.asarray(mean_fn(batch), np.float64)
        r = (np.asarray(batch["target"], np.float64) - mean)[keep]
        total = total + r.sum(axis=(0, 1, 2))
        total_sq = total_sq + (r**2).sum(axis=(0, 1, 2))
        pixels += r.shape[0] * r.shape[1] * r.shape[2]
        samples += int(keep.sum())
    if samples == 0:
        raise ValueError("residual_moments: no valid samples in the batches")
    mean_square = total_sq / pixels
    return {
        "mean_square": mean_square.tolist(),
        "variance": (mean_square - (total / pixels) ** 2).tolist(),
        "samples": samples,
    }


def residual_variances(workdir: str, batch_size: int = 8) -> dict:
    """``residual_moments`` of the regression model WORKDIR/regression/model on the training and
    validation periods of the prepared data WORKDIR/prepared, in normalized target units
    (variance 1 = the target's own variance over the training period).

    Returns {"target_channels", "train": moments, "valid": moments, "valid_over_train": the ratio
    of the two variances per channel}; a ratio clearly above 1 says the regression fits its
    training period better than new data. A workdir with cross-fitting fold models
    (``training.cross_fit``) adds "train_out_of_fold": the training residuals to the fold model
    that did not see each sample, the residuals its diffusion stage learned, and
    "valid_over_out_of_fold". Means the diffusion stage stored for the same model and data
    (``training.regression_means``) are read, not computed again; ``batch_size`` is rounded up
    to a multiple of the local device count.
    """
    prepared = os.path.join(workdir, PREPARED_DIR)
    store, stats = os.path.join(prepared, STORE_NAME), os.path.join(prepared, STATS_NAME)
    for path in (store, stats):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: {workdir} is not a trained workdir")
    normalizer = load_stats(stats)
    train, valid = (DownscalingSource(store, split, normalizer) for split in ("train", "valid"))
    saved = load_model(os.path.join(workdir, "regression", "model"))
    batch_size = -(-batch_size // jax.local_device_count()) * jax.local_device_count()
    means = functools.partial(_means, workdir=workdir, matmul_precision=saved.matmul_precision)
    result = {"target_channels": list(normalizer.target_channels)}
    with jax.default_matmul_precision(saved.matmul_precision):
        data, full = means(build_model(saved.config), saved.variables, TrainingData(normalizer, train, valid, {}))
        for split, source in (("train", data.train_source), ("valid", data.valid_source)):
            result[split] = residual_moments(full, make_eval_iterator(source, batch_size=batch_size))
        result["valid_over_train"] = _ratio(result["valid"], result["train"])
        if os.path.isdir(folds_directory(workdir)):
            folds = load_fold_models(workdir)
            settings = folds[0].source["cross_fit"]
            labelled = CrossFit(int(settings["folds"]), float(settings["block_hours"])).label(train, valid)
            data, out_of_fold = means(*fold_mean(folds), TrainingData(normalizer, *labelled, {}))
            batches = make_eval_iterator(data.train_source, batch_size=batch_size)
            result["train_out_of_fold"] = residual_moments(out_of_fold, batches)
            result["valid_over_out_of_fold"] = _ratio(result["valid"], result["train_out_of_fold"])
    return result


def _ratio(numerator: dict, denominator: dict) -> list[float]:
    return (np.array(numerator["variance"]) / denominator["variance"]).tolist()


def _means(mean_model, variables, data: TrainingData, *, workdir: str, matmul_precision: str):
    """(``data``, batch -> mean under ``mean_model``): the means the diffusion stage stored in
    WORKDIR/diffusion for this model and data, read with each sample, else computed here."""
    key = means_key(mean_model, variables, data, matmul_precision)
    stored = stored_means(os.path.join(workdir, "diffusion"), key)
    if stored is not None:
        return data.with_regression_means(stored), operator.itemgetter("regression_mean")
    return data, local_mean_fn(mean_model, variables)
