"""Patch-based diffusion for domains too large for one device (China 3 km CorrDiff, reference.md section 5).

Training: each image contributes P random patches of (h, w); a patch is conditioned (in the
order of its ``ConditioningLayout``) on its crop of the inputs (and of the regression mean), on
the WHOLE coarse input resized to (h, w) as global context, and on the position grid /
lead-time embedding cropped at its origin (the network crops those itself from ``patch_origin``).

Sampling (multi-diffusion, Bar-Tal et al. 2023): the image is reflect-padded by
``boundary`` pixels and covered by tiles of (h, w) whose starts are ``stride = size -
overlap`` apart (the last tile flush with the far edge, so every pixel is covered); at every
noise level each tile is denoised and the overlapping estimates are averaged. The average
of denoisers is itself a denoiser, so the EDM sampler runs unchanged on top.

One layout everywhere: patch p of image b sits at row b * P + p (the reference mixes
patch-major and batch-major and gives patches the wrong embeddings when batch > 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.diffusion.conditioning import ConditioningLayout

# patch_denoise(x (N, h, w, C), cond (N, h, w, Cc), sigma, origins (N, 2), labels (N,) | None) -> (N, h, w, C)
PatchDenoiser = Callable[..., jax.Array]


def global_context(img_lr: jax.Array, height: int, width: int) -> jax.Array:
    """The whole coarse input bilinearly resized to the patch size: (B, H, W, C) -> (B, h, w, C)."""
    return jax.image.resize(img_lr, (img_lr.shape[0], height, width, img_lr.shape[-1]), "bilinear")


def random_origins(
    key: jax.Array, batch: int, num_patches: int, image: tuple[int, int], patch: tuple[int, int]
) -> jax.Array:
    """(batch * num_patches, 2) uniform top-left corners, patch fully inside the image."""
    (big_h, big_w), (h, w) = image, patch
    if h > big_h or w > big_w:
        raise ValueError(f"patch {h}x{w} is larger than the image {big_h}x{big_w}")
    ky, kx = jax.random.split(key)
    n = batch * num_patches
    return jnp.stack(
        [jax.random.randint(ky, (n,), 0, big_h - h + 1), jax.random.randint(kx, (n,), 0, big_w - w + 1)], axis=-1
    )


def crop_patches(images: jax.Array, origins: jax.Array, num_patches: int, patch: tuple[int, int]) -> jax.Array:
    """Rows b * P + p of the result are the patch of image b at origins[b * P + p]."""
    h, w = patch
    per_patch_image = jnp.repeat(images, num_patches, axis=0)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(per_patch_image, origins)


def training_batch(
    key: jax.Array,
    layout: ConditioningLayout,
    target: jax.Array,
    regression_mean: jax.Array,
    img_lr: jax.Array,
    lead_time_label: jax.Array | None,
) -> dict:
    """What the residual loss trains on: target, regression mean, conditioning ``cond`` and the
    ``patch_origin`` / ``lead_time_label`` the network takes.

    Whole images when ``layout.patch`` is None. Otherwise P random patches per image (rows
    b * P + p): the regression mean is computed once per image by the caller and cropped here,
    never recomputed per patch.
    """
    if layout.patch is None:
        cond = layout.assemble(img_lr, regression_mean)
        return dict(
            target=target,
            regression_mean=regression_mean,
            cond=cond,
            patch_origin=None,
            lead_time_label=lead_time_label,
        )
    count, size = layout.patch.num_patches, layout.patch.size
    origins = random_origins(key, target.shape[0], count, target.shape[1:3], size)
    mean = crop_patches(regression_mean, origins, count, size)
    context = jnp.repeat(global_context(img_lr, *size), count, axis=0)
    return dict(
        target=crop_patches(target, origins, count, size),
        regression_mean=mean,
        cond=layout.assemble(crop_patches(img_lr, origins, count, size), mean, context),
        patch_origin=origins,
        lead_time_label=None if lead_time_label is None else jnp.repeat(lead_time_label, count, axis=0),
    )


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Static tiling of an (H, W) image padded by ``boundary`` into (h, w) tiles."""

    image: tuple[int, int]
    tile: tuple[int, int]
    overlap: int
    boundary: int

    def __post_init__(self):
        for size, big in zip(self.tile, self.padded):
            if size > big:
                raise ValueError(f"tile {self.tile} is larger than the padded image {self.padded}")
            if self.overlap >= size:
                raise ValueError(f"overlap {self.overlap} must be smaller than the tile {self.tile}")
        if self.overlap < 0 or self.boundary < 0:
            raise ValueError("overlap and boundary must be >= 0")

    @property
    def padded(self) -> tuple[int, int]:
        return self.image[0] + 2 * self.boundary, self.image[1] + 2 * self.boundary

    def _starts(self, axis: int) -> list[int]:
        size, big = self.tile[axis], self.padded[axis]
        stride = size - self.overlap
        starts = list(range(0, big - size + 1, stride))
        if starts[-1] != big - size:
            starts.append(big - size)
        return starts

    @property
    def origins(self) -> np.ndarray:
        """(T, 2) tile corners in padded coordinates, row-major over the image."""
        return np.array([(y, x) for y in self._starts(0) for x in self._starts(1)], np.int32)

    def coverage(self) -> np.ndarray:
        """How many tiles cover each padded pixel (>= 1 everywhere by construction)."""
        count = np.zeros(self.padded, np.int32)
        for y, x in self.origins:
            count[y : y + self.tile[0], x : x + self.tile[1]] += 1
        return count

    def split(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B * T, h, w, C), rows b * T + t, after reflect-padding."""
        b = self.boundary
        padded = jnp.pad(images, ((0, 0), (b, b), (b, b), (0, 0)), mode="reflect") if b else images
        h, w = self.tile
        tiles = [padded[:, y : y + h, x : x + w] for y, x in self.origins]
        return jnp.stack(tiles, axis=1).reshape(-1, h, w, images.shape[-1])

    def merge(self, tiles: jax.Array) -> jax.Array:
        """Average overlapping tiles back into (B, H, W, C) (the inverse of split where tiles agree)."""
        h, w = self.tile
        n_tiles = len(self.origins)
        tiles = tiles.reshape(-1, n_tiles, h, w, tiles.shape[-1])
        total = jnp.zeros((tiles.shape[0], *self.padded, tiles.shape[-1]), tiles.dtype)
        for t, (y, x) in enumerate(self.origins):
            total = total.at[:, y : y + h, x : x + w].add(tiles[:, t])
        total = total / jnp.asarray(self.coverage(), tiles.dtype)[None, :, :, None]
        b = self.boundary
        return total[:, b : b + self.image[0], b : b + self.image[1]]


def tile_parallel(patch_denoise: PatchDenoiser, sharding, n_tiles: int) -> PatchDenoiser:
    """``patch_denoise`` with its batch of ``n_tiles`` tiles split over the mesh axis of
    ``sharding`` (a ``NamedSharding`` of the tile axis; None: unchanged).

    The batch is padded to a multiple of the axis size with copies of the last tile, whose
    outputs are dropped; every network evaluation then runs on 1/k of the tiles per device.
    """
    if sharding is None:
        return patch_denoise
    pad = -n_tiles % sharding.mesh.shape[sharding.spec[0]]

    def spread(a):
        if a is None:
            return None
        if pad:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
        return jax.lax.with_sharding_constraint(a, sharding)

    def denoise(tiles, cond_tiles, sigma, origins, labels):
        return patch_denoise(spread(tiles), spread(cond_tiles), sigma, spread(origins), spread(labels))[:n_tiles]

    return denoise


def multidiffusion_denoiser(
    patch_denoise: PatchDenoiser,
    layout: ConditioningLayout,
    img_lr: jax.Array,
    regression_mean: jax.Array,
    lead_time_label: jax.Array | None = None,
    tile_sharding=None,
):
    """A whole-image denoiser (x, sigma) -> x0_hat built from a tile denoiser, over tiles of
    ``layout.patch``.

    The conditioning tiles are cut once here, outside the sampling loop. Tile origins are
    passed in image coordinates (negative inside the reflect-padded border), so the network
    crops its position grid at the right place. ``tile_sharding`` splits the tiles over
    devices (``tile_parallel``).
    """
    patch = layout.patch
    tiles = TileLayout(tuple(img_lr.shape[1:3]), patch.size, patch.overlap, patch.boundary)
    n_tiles = len(tiles.origins)
    context = jnp.repeat(global_context(img_lr, *patch.size), n_tiles, axis=0)
    cond_tiles = layout.assemble(tiles.split(img_lr), tiles.split(regression_mean), context)
    origins = jnp.tile(jnp.asarray(tiles.origins - tiles.boundary), (img_lr.shape[0], 1))
    labels = None if lead_time_label is None else jnp.repeat(lead_time_label, n_tiles, axis=0)
    patch_denoise = tile_parallel(patch_denoise, tile_sharding, len(origins))

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        return tiles.merge(patch_denoise(tiles.split(x), cond_tiles, sigma, origins, labels))

    return denoise
