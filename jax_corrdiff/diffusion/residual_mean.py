"""The mean the diffusion model's residual is taken from: the regression UNet (CorrDiff) or the
interpolated coarse input itself (the DDPM residual-to-interpolation setting, no regression stage).

``config.diffusion.mean`` chooses; the global residual connection of the regression UNet
(``regression.model.global_residual``) is the in-between: a regression trained as a correction
to the same interpolated field. ``batch_mean`` is the mean of a training batch under any of them;
the diffusion stage usually reads the regression's from the batch (``PrecomputedMean``,
``training.regression_means``) rather than running the network at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.diffusion.conditioning import ConditioningLayout

RESIDUAL_MEANS = ("regression", "interpolation")


@dataclasses.dataclass(frozen=True)
class InterpolationMean:
    """mu(img_lr) = the interpolated coarse input of each target, in the target's normalization.

    Input and target c are the same variable (same name, same transform) normalized with their
    own statistics, so x_t = (x_in s_in + m_in - m_t) / s_t maps one to the other exactly.
    ``apply`` has the regression network's call signature (it has no variables), so training and
    generation take either mean alike.
    """

    input_index: tuple[int, ...]
    scale: tuple[float, ...]
    shift: tuple[float, ...]

    @classmethod
    def from_data(cls, layout: ConditioningLayout, normalizer: Normalizer) -> InterpolationMean:
        pairs = dict(layout.residual_pairs())
        missing = [c for i, c in enumerate(layout.target_channels) if i not in pairs]
        if missing:
            raise ValueError(
                f"diffusion.mean='interpolation' needs every target among data.input_variables; "
                f"{missing} are not (use diffusion.mean='regression')"
            )
        idx = [pairs[i] for i in range(len(layout.target_channels))]
        m_in, s_in = normalizer.input_mean[idx], normalizer.input_std[idx]
        m_t, s_t = normalizer.target_mean, normalizer.target_std
        return cls(tuple(idx), tuple(np.float64(s_in / s_t).tolist()), tuple(np.float64((m_in - m_t) / s_t).tolist()))

    def apply(self, variables, img_lr: jax.Array, *, lead_time_label: jax.Array | None = None) -> jax.Array:
        del variables, lead_time_label
        scale, shift = (np.asarray(v, np.float32) for v in (self.scale, self.shift))
        return img_lr[..., list(self.input_index)] * scale + shift


@dataclasses.dataclass(frozen=True)
class CrossFitMean:
    """mu(img_lr) of each sample from the regression fold model that did not train on it
    (``training.cross_fit``): ``variables`` stacks the K fold models' variables on a leading
    axis, every fold model runs on the whole batch and sample b keeps fold[b]'s mean: K
    regression forwards per step. (A ``vmap`` over the stacked weights makes every convolution
    a grouped one: 4.1x slower than K plain forwards on the demo's CPU.)"""

    network: Any  # the regression network all fold models share

    def apply(self, variables, img_lr: jax.Array, *, lead_time_label: jax.Array | None = None, fold: jax.Array):
        folds = jax.tree_util.tree_leaves(variables)[0].shape[0]
        mean = None
        for k in range(folds):
            fold_k = jax.tree_util.tree_map(lambda leaf, k=k: leaf[k], variables)
            mean_k = self.network.apply(fold_k, img_lr, lead_time_label=lead_time_label)
            mean = mean_k if mean is None else jnp.where((fold == k).reshape(-1, 1, 1, 1), mean_k, mean)
        return mean


@dataclasses.dataclass(frozen=True)
class PrecomputedMean:
    """mu(img_lr) computed once per sample before training (``training.regression_means``) and
    carried by each batch as ``regression_mean``.

    The regression network (or its cross-fitted fold models) is frozen while the diffusion stage
    trains, so a sample's mean is the same at every step that draws it; reading it spares every
    step the regression forward: 23% of the full-width Taiwan diffusion step on a CPU, K forwards
    under K-fold cross-fitting (benchmarks/README.md).
    """


def batch_mean(mean_model, variables, batch: dict) -> jax.Array:
    """The residual's mean for ``batch`` (a training batch: ``img_lr``, optional
    ``lead_time_label``, ``fold``, ``regression_mean``) under ``mean_model``: a regression network,
    ``InterpolationMean``, ``CrossFitMean`` (which takes the batch's folds) or ``PrecomputedMean``."""
    if isinstance(mean_model, PrecomputedMean):
        return batch["regression_mean"]
    folds = {"fold": batch["fold"]} if isinstance(mean_model, CrossFitMean) else {}
    return mean_model.apply(variables, batch["img_lr"], lead_time_label=batch.get("lead_time_label"), **folds)
