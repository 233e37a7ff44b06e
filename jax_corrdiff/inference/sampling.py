"""CorrDiff generation: regression mean + sampled residual ensemble, in one jitted call."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.diffusion.patching import multidiffusion_denoiser
from jax_corrdiff.diffusion.samplers import DenoiseFn, EDMSampler, sample_ensemble

# mean_fn(img_lr, lead_time_label) -> (B, H, W, C_out)
MeanFn = Callable[[jax.Array, jax.Array | None], jax.Array]
# make_denoiser(mean (1, H, W, C), img_lr (1, H, W, C_in), lead_time_label (1,) | None) -> denoise(x, sigma)
DenoiserFactory = Callable[[jax.Array, jax.Array, jax.Array | None], DenoiseFn]
# apply(x, cond, sigma, lead_time_label, patch_origin, grid_margin) -> x0_hat, batched
DiffusionApply = Callable[..., jax.Array]


def conditioned_denoisers(apply: DiffusionApply, layout: ConditioningLayout, tile_sharding=None) -> DenoiserFactory:
    """D(x; sigma) for one input, conditioned as ``layout`` says: on the whole image, or, for
    patch-trained models (``layout.patch``), averaged over overlapping tiles (multi-diffusion),
    the tiles split over the devices of ``tile_sharding`` when given."""
    if layout.patch is None:

        def whole_image(mean, img_lr, label):
            cond = layout.assemble(img_lr, mean)
            return lambda x, sigma: apply(x, cond, sigma[None], label, None, 0)

        return whole_image

    def patch_denoise(tiles, cond_tiles, sigma, origins, labels):
        sigma = jnp.broadcast_to(sigma, (tiles.shape[0],))
        return apply(tiles, cond_tiles, sigma, labels, origins, layout.patch.boundary)

    return lambda mean, img_lr, label: multidiffusion_denoiser(
        patch_denoise, layout, img_lr, mean, label, tile_sharding
    )


def corrdiff_ensemble(
    mean_fn: MeanFn,
    make_denoiser: DenoiserFactory,
    sampler: EDMSampler,
    img_lr: jax.Array,
    keys: jax.Array,
    *,
    num_members: int,
    member_batch_size: int | None = None,
    lead_time_label: jax.Array | None = None,
    spmd_axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (regression mean (B, H, W, C), samples (B, M, H, W, C)).

    sample = mean + residual, the residual drawn by the EDM sampler with the denoiser that
    ``make_denoiser`` builds for each input. ``keys`` holds one key per input (e.g. per
    time); member m of input b uses fold_in(keys[b], m), so a sample does not depend on how
    inputs or members are batched. Trace under ``jax.jit``. ``spmd_axis_name``: the mesh axis
    the inputs are sharded over, so sharding constraints inside (tile parallelism) keep it.
    """
    mean = mean_fn(img_lr, lead_time_label)
    labels = lead_time_label if lead_time_label is not None else jnp.zeros(img_lr.shape[0], jnp.int32)

    def one_input(mean_b, img_b, key_b, label_b):
        label = label_b[None] if lead_time_label is not None else None
        denoise = make_denoiser(mean_b[None], img_b[None], label)
        single = lambda x, sigma: denoise(x[None], sigma)[0]  # noqa: E731
        return sample_ensemble(sampler, single, mean.shape[1:], key_b, jnp.arange(num_members), member_batch_size)

    residuals = jax.vmap(one_input, spmd_axis_name=spmd_axis_name)(mean, img_lr, keys, labels)
    return mean, mean[:, None] + residuals
