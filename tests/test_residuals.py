"""The residual diagnostic (training.residuals): moments of target - mean pooled over valid samples."""

import numpy as np
import pytest

from jax_corrdiff.training.residuals import residual_moments


def _batch(target, img_lr, mask):
    return {"target": np.asarray(target), "img_lr": np.asarray(img_lr), "mask": np.asarray(mask)}


def test_residual_moments_pool_pixels_and_skip_masked_samples():
    rng = np.random.default_rng(0)
    img_lr = rng.normal(size=(6, 4, 5, 2))
    residual = rng.normal(loc=[0.5, -1.0], scale=[1.0, 3.0], size=(6, 4, 5, 2))
    target = img_lr + residual

    def mean_fn(batch):
        assert "lead_time_label" not in batch
        return batch["img_lr"]

    mask = np.array([True, True, True, True, False, False])
    target[~mask] = 1e6  # padding slots must not count
    batches = [_batch(target[:3], img_lr[:3], mask[:3]), _batch(target[3:], img_lr[3:], mask[3:])]
    moments = residual_moments(mean_fn, batches)
    kept = residual[mask].reshape(-1, 2)
    assert moments["samples"] == 4
    np.testing.assert_allclose(moments["mean_square"], (kept**2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments["variance"], kept.var(0), rtol=1e-12)


def test_residual_moments_without_valid_samples_is_an_error():
    batch = _batch(np.zeros((2, 3, 3, 1)), np.zeros((2, 3, 3, 1)), [False, False])
    with pytest.raises(ValueError, match="no valid samples"):
        residual_moments(lambda b: b["img_lr"], [batch])
