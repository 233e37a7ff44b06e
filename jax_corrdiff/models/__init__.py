"""Flax modules of CorrDiff: SongUNet backbone, regression UNet, EDM denoiser."""

from jax_corrdiff.models.corrdiff import EDMPrecondSR, RegressionUNet
from jax_corrdiff.models.factory import build_model, count_params, example_inputs, init_variables
from jax_corrdiff.models.songunet import SongUNet

__all__ = [
    "EDMPrecondSR",
    "RegressionUNet",
    "SongUNet",
    "build_model",
    "count_params",
    "example_inputs",
    "init_variables",
]
