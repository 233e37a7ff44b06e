"""EDM diffusion math as pure functions: the conditioning layout, losses, patching and samplers
over denoise callables."""

from jax_corrdiff.diffusion.conditioning import ConditioningLayout, PatchSettings
from jax_corrdiff.diffusion.losses import edm_loss_weight, regression_loss, residual_loss
from jax_corrdiff.diffusion.samplers import EDMSampler, edm_sigma_steps, sample_ensemble, sample_member

__all__ = [
    "ConditioningLayout",
    "EDMSampler",
    "PatchSettings",
    "edm_loss_weight",
    "edm_sigma_steps",
    "regression_loss",
    "residual_loss",
    "sample_ensemble",
    "sample_member",
]
