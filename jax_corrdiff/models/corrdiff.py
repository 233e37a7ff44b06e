"""CorrDiff's two networks around the SongUNet: the regression UNet and the EDM denoiser.

Channel order into the UNet (reference.md section 3):
    [c_in * x | conditioning | position grid | lead-time embedding]
where the caller supplies ``img_lr``, the conditioning image (assembled as the stage's
``diffusion.conditioning.ConditioningLayout`` says, e.g. [regression mean | coarse input |
static fields]), and the UNet appends the grid and lead-time channels itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_corrdiff.models.songunet import SongUNet


class RegressionUNet(nn.Module):
    """Stage 1: predicts the conditional mean E[y | coarse input].

    F(concat[zeros(C_out), img_lr]) with noise label 0, as the reference (the zero
    "latent" keeps the regression and diffusion UNets the same shape).

    ``global_residual`` lists (output channel, input channel) pairs: for those outputs the
    network predicts a correction added to the interpolated coarse field (China 3 km
    CorrDiff, Sun et al. 2025). Outputs without an input counterpart get no skip.
    """

    unet: SongUNet
    global_residual: Sequence[tuple[int, int]] = ()

    @nn.compact
    def __call__(
        self,
        img_lr: jax.Array,
        *,
        latent: jax.Array | None = None,
        lead_time_label: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        batch = img_lr.shape[0]
        if latent is None:
            latent = jnp.zeros((*img_lr.shape[:-1], self.unet.out_channels), img_lr.dtype)
        out = self.unet(
            jnp.concatenate([latent, img_lr], axis=-1),
            jnp.zeros((batch,), jnp.float32),
            lead_time_label=lead_time_label,
            train=train,
        )
        if self.global_residual:
            out_idx, in_idx = (jnp.asarray(i) for i in zip(*self.global_residual))
            out = out.at[..., out_idx].add(img_lr[..., in_idx].astype(out.dtype))
        return out


class EDMPrecondSR(nn.Module):
    """Stage 2: EDM-preconditioned denoiser D(x; sigma, img_lr) (Karras et al. 2022, Table 1).

    D = c_skip x + c_out F(concat[c_in x, img_lr], c_noise) with
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.
    The conditioning is not scaled by c_in; ``legacy_scale_conditioning`` scales it too,
    which only NVIDIA's early published CorrDiff checkpoints need.
    Preconditioning runs in float32 whatever the UNet's compute dtype.
    """

    unet: SongUNet
    sigma_data: float = 0.5
    legacy_scale_conditioning: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        img_lr: jax.Array,
        sigma: jax.Array,
        *,
        lead_time_label: jax.Array | None = None,
        patch_origin: jax.Array | None = None,
        grid_margin: int = 0,
        train: bool = False,
    ) -> jax.Array:
        """``patch_origin`` / ``grid_margin``: x is a patch of the image (see SongUNet)."""
        x = x.astype(jnp.float32)
        img_lr = img_lr.astype(jnp.float32)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
        s = sigma[:, None, None, None]
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / jnp.sqrt(s**2 + sd**2)
        c_in = 1.0 / jnp.sqrt(s**2 + sd**2)
        c_noise = jnp.log(sigma) / 4.0
        if self.legacy_scale_conditioning:
            arg = c_in * jnp.concatenate([x, img_lr], axis=-1)
        else:
            arg = jnp.concatenate([c_in * x, img_lr], axis=-1)
        f_x = self.unet(
            arg,
            c_noise,
            lead_time_label=lead_time_label,
            patch_origin=patch_origin,
            grid_margin=grid_margin,
            train=train,
        )
        return c_skip * x + c_out * f_x


class EpsilonUNet(nn.Module):
    """DDPM noise predictor eps(x_t; t, img_lr) = F(concat[x_t, img_lr], t) (Ho et al. 2020).

    The variance-preserving x_t already has unit variance, so it needs no input scaling; the
    noise label is the integer step t (0..T-1) for the UNet's positional embedding. The
    ``schedule`` and ``num_timesteps`` the network was trained with travel with it, so a sampler
    is built for the schedule of the loaded model (``diffusion.ddpm``).
    """

    unet: SongUNet
    schedule: str = "cosine"
    num_timesteps: int = 1000

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        img_lr: jax.Array,
        t: jax.Array,
        *,
        lead_time_label: jax.Array | None = None,
        patch_origin: jax.Array | None = None,
        grid_margin: int = 0,
        train: bool = False,
    ) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (x.shape[0],))
        arg = jnp.concatenate([x.astype(jnp.float32), img_lr.astype(jnp.float32)], axis=-1)
        out = self.unet(
            arg, t, lead_time_label=lead_time_label, patch_origin=patch_origin, grid_margin=grid_margin, train=train
        )
        return out.astype(jnp.float32)
