"""CorrDiff generation: regression mean + sampled residual ensemble, in one jitted call."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax_corrdiff.diffusion.samplers import EDMSampler, sample_ensemble

# mean_fn(img_lr, lead_time_label) -> (B, H, W, C_out)
MeanFn = Callable[[jax.Array, jax.Array | None], jax.Array]
# denoise_fn(x, cond, sigma, lead_time_label) -> x0_hat, batched over the leading axis
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def corrdiff_ensemble(
    mean_fn: MeanFn,
    denoise_fn: DenoiseFn,
    sampler: EDMSampler,
    img_lr: jax.Array,
    keys: jax.Array,
    *,
    num_members: int,
    hr_mean_conditioning: bool,
    member_batch_size: int | None = None,
    lead_time_label: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (regression mean (B, H, W, C), samples (B, M, H, W, C)).

    sample = mean + residual, residual drawn by the EDM sampler from the diffusion model
    conditioned on [mean | img_lr] (or img_lr alone). ``keys`` holds one key per input
    (e.g. per time); member m of input b uses fold_in(keys[b], m), so a sample does not
    depend on how inputs or members are batched. Trace under ``jax.jit``.
    """
    mean = mean_fn(img_lr, lead_time_label)
    cond = jnp.concatenate([mean, img_lr], axis=-1) if hr_mean_conditioning else img_lr
    labels = lead_time_label if lead_time_label is not None else jnp.zeros(img_lr.shape[0], jnp.int32)

    def one_input(cond_b, key_b, label_b):
        label = label_b[None] if lead_time_label is not None else None

        def denoise(x, sigma):
            return denoise_fn(x[None], cond_b[None], sigma[None], label)[0]

        return sample_ensemble(
            sampler, denoise, mean.shape[1:], key_b, jnp.arange(num_members), member_batch_size
        )

    residuals = jax.vmap(one_input)(cond, keys, labels)
    return mean, mean[:, None] + residuals
