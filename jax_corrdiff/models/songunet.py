"""The SongUNet (DDPM++) backbone shared by CorrDiff's regression and diffusion stages.

One module covers PhysicsNeMo's SongUNet, SongUNetPosEmbd and SongUNetPosLtEmbd: the
position grid and the lead-time embedding are optional channels appended to the input.
The input may have any height and width: it is reflect-padded at the bottom/right to the
multiple of 2^(levels - 1) the encoder needs, and the output is cropped back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_corrdiff.models.embeddings import (
    FourierNoiseEmbedding,
    positional_noise_embedding,
    sinusoidal_position_grid,
)
from jax_corrdiff.models.layers import UNetBlock, conv, dense
from jax_corrdiff.models.normalization import Dtype, GroupNorm, silu_keeping_input

# SongUNet always attends at its coarsest level (the decoder's first block); above this many
# tokens one attention matrix takes over 256 MiB per sample and head in float32.
BOTTLENECK_TOKEN_WARNING = 8192

log = logging.getLogger("jax_corrdiff")

EMBEDDING_TYPES = ("positional", "fourier", "zero")
POSITION_GRIDS = ("none", "sinusoidal", "learnable")
ATTENTION_IMPLS = (None, "xla", "cudnn")
# Rematerialisation of each UNet block in the backward pass: "none" keeps every activation;
# "dots" keeps convolution and matmul outputs and recomputes the cheap GroupNorm / SiLU /
# residual arithmetic around them; "full" keeps only block inputs and recomputes the block.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class SongUNet(nn.Module):
    """DDPM++ UNet, NHWC.

    Attributes mirror the reference's constructor. ``img_resolution`` is the (height, width)
    of the data grid: it sizes the position grid / lead-time embedding and places attention
    (a level gets attention when ``img_resolution[0] >> level`` is in ``attn_resolutions``).
    """

    img_resolution: tuple[int, int]
    out_channels: int
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    channel_mult_noise: int = 1
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    embedding_type: str = "positional"
    position_grid: str = "none"
    num_grid_channels: int = 4
    lead_time_steps: int = 0
    lead_time_channels: int = 0
    prob_channels: Sequence[int] = ()
    unbiased_groupnorm: bool = False
    remat: str = "none"
    attention_impl: str | None = None  # UNetBlock.attention_impl
    dtype: Dtype = jnp.float32

    def setup_checks(self) -> None:
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {self.embedding_type!r}")
        if self.position_grid not in POSITION_GRIDS:
            raise ValueError(f"position_grid must be one of {POSITION_GRIDS}, got {self.position_grid!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if bool(self.lead_time_steps) != bool(self.lead_time_channels):
            raise ValueError("lead_time_steps and lead_time_channels must both be set or both be 0")

    @property
    def pad_multiple(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        noise_labels: jax.Array,
        *,
        lead_time_label: jax.Array | None = None,
        patch_origin: jax.Array | None = None,
        grid_margin: int = 0,
        train: bool = False,
    ) -> jax.Array:
        """x: (B, H, W, C_in); noise_labels: (B,). Returns (B, H, W, C_out).

        Without ``patch_origin`` the input covers ``img_resolution``. With it, x is a patch and
        ``patch_origin`` (B, 2) gives each patch's top-left corner in image coordinates: the
        position grid and lead-time embedding are cropped there. Corners may reach
        ``grid_margin`` pixels outside the image (multi-diffusion's reflect-padded border):
        the embeddings are reflect-padded by that much first.
        """
        self.setup_checks()
        batch, height, width, _ = x.shape
        _warn_on_large_bottleneck(height, width, self.channel_mult)
        extra = self._extra_channels(batch, height, width, lead_time_label, patch_origin, grid_margin)
        x = jnp.concatenate([x, *extra], axis=-1)
        emb = self._noise_embedding(noise_labels, batch)

        m = self.pad_multiple
        pad_h, pad_w = -height % m, -width % m
        if pad_h or pad_w:
            if pad_h >= height or pad_w >= width:
                raise ValueError(f"grid {height}x{width} is too small to pad to a multiple of {m}")
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        # One draw of two uint32 words per step; each block hashes its own mask from them.
        dropout_seed = (
            jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32) if train and self.dropout > 0 else None
        )
        out = self._unet(x.astype(self.dtype), emb.astype(self.dtype), dropout_seed)
        out = out[:, :height, :width, :].astype(jnp.float32)
        if self.prob_channels:
            out = self._probabilities(out, train)
        return out

    def _extra_channels(self, batch, height, width, lead_time_label, patch_origin, margin) -> list[jax.Array]:
        """Position-grid and lead-time channels (B, H, W, .), appended after all conditioning."""
        full_h, full_w = self.img_resolution
        if (
            patch_origin is None
            and (height, width) != (full_h, full_w)
            and (self.position_grid != "none" or self.lead_time_steps)
        ):
            raise ValueError(
                f"input grid {height}x{width} differs from img_resolution {tuple(self.img_resolution)} "
                "that sizes the position/lead-time embedding (pass patch_origin for patches)"
            )
        extra = []
        if self.position_grid == "sinusoidal":
            extra.append(jnp.asarray(sinusoidal_position_grid(full_h, full_w, self.num_grid_channels))[None])
        elif self.position_grid == "learnable":
            extra.append(
                self.param("pos_embd", nn.initializers.normal(1.0), (full_h, full_w, self.num_grid_channels))[None]
            )
        if self.lead_time_steps:
            if lead_time_label is None:
                raise ValueError("this model is lead-time aware: pass lead_time_label")
            table = self.param(
                "lt_embd", nn.initializers.normal(1.0), (self.lead_time_steps, full_h, full_w, self.lead_time_channels)
            )
            extra.append(table[jnp.asarray(lead_time_label, jnp.int32).reshape(batch)])
        if patch_origin is None:
            return [jnp.broadcast_to(e, (batch, *e.shape[1:])).astype(jnp.float32) for e in extra]

        def crop(field, origin):
            return jax.lax.dynamic_slice(
                field, (origin[0] + margin, origin[1] + margin, 0), (height, width, field.shape[-1])
            )

        origins = jnp.asarray(patch_origin, jnp.int32).reshape(batch, 2)
        cropped = []
        for e in extra:
            if margin:
                e = jnp.pad(e, ((0, 0), (margin, margin), (margin, margin), (0, 0)), mode="reflect")
            per_sample = jax.vmap(crop) if e.shape[0] == batch else jax.vmap(crop, in_axes=(None, 0))
            cropped.append(per_sample(e if e.shape[0] == batch else e[0], origins).astype(jnp.float32))
        return cropped

    def _probabilities(self, out: jax.Array, train: bool) -> jax.Array:
        """``prob_channels`` are logits of mutually exclusive classes (SongUNetPosLtEmbd):
        scaled by a learned temperature, and turned into probabilities by a softmax over
        those channels at inference (training keeps logits for a cross-entropy-style loss)."""
        idx = jnp.asarray(self.prob_channels)
        scale = self.param("prob_scale", nn.initializers.ones, (len(self.prob_channels),))
        logits = out[..., idx] * scale
        return out.at[..., idx].set(logits if train else jax.nn.softmax(logits, axis=-1))

    def _noise_embedding(self, noise_labels: jax.Array, batch: int) -> jax.Array:
        emb_channels = self.model_channels * self.channel_mult_emb
        if self.embedding_type == "zero":
            # Each block's Linear(emb) then contributes only its bias, as in the reference.
            return jnp.zeros((batch, emb_channels), jnp.float32)
        noise_channels = self.model_channels * self.channel_mult_noise
        c_noise = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
        if self.embedding_type == "positional":
            emb = positional_noise_embedding(c_noise, noise_channels)
        else:
            emb = FourierNoiseEmbedding(noise_channels, name="map_noise")(c_noise)
        emb = nn.silu(dense(emb_channels, dtype=jnp.float32, name="map_layer0")(emb))
        return nn.silu(dense(emb_channels, dtype=jnp.float32, name="map_layer1")(emb))

    def _unet(self, x: jax.Array, emb: jax.Array, dropout_seed: jax.Array | None) -> jax.Array:
        block_cls = UNetBlock
        if self.remat != "none":
            block_cls = nn.remat(UNetBlock, policy=REMAT_POLICIES[self.remat])
        block = lambda name, out, **kw: block_cls(  # noqa: E731
            out,
            dropout=self.dropout,
            unbiased_groupnorm=self.unbiased_groupnorm,
            attention_impl=self.attention_impl,
            zero_embedding=self.embedding_type == "zero",
            dtype=self.dtype,
            name=name,
            **kw,
        )
        levels = len(self.channel_mult)
        has_attention = [(self.img_resolution[0] >> lvl) in self.attn_resolutions for lvl in range(levels)]

        # Encoder: a 3x3 conv at full resolution, then per level (level > 0: a down block)
        # num_blocks blocks; every output is kept as a skip connection.
        x = conv(self.model_channels, 3, dtype=self.dtype, name="enc_l0_conv")(x)
        skips = [x]
        for level, mult in enumerate(self.channel_mult):
            if level > 0:
                x = block(f"enc_l{level}_down", x.shape[-1], down=True)(x, emb, dropout_seed)
                skips.append(x)
            for i in range(self.num_blocks):
                x = block(f"enc_l{level}_block{i}", self.model_channels * mult, attention=has_attention[level])(
                    x, emb, dropout_seed
                )
                skips.append(x)

        # Decoder: the coarsest level starts with two blocks (the first with attention),
        # others with an up block; then num_blocks + 1 blocks each eating one skip, the last
        # of a level with attention where the encoder had it.
        for level in reversed(range(levels)):
            mult = self.channel_mult[level]
            if level == levels - 1:
                x = block(f"dec_l{level}_in0", x.shape[-1], attention=True)(x, emb, dropout_seed)
                x = block(f"dec_l{level}_in1", x.shape[-1])(x, emb, dropout_seed)
            else:
                x = block(f"dec_l{level}_up", x.shape[-1], up=True)(x, emb, dropout_seed)
            for i in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                attn = i == self.num_blocks and has_attention[level]
                x = block(f"dec_l{level}_block{i}", self.model_channels * mult, attention=attn)(x, emb, dropout_seed)

        x = silu_keeping_input(
            GroupNorm(unbiased_variance=self.unbiased_groupnorm, dtype=self.dtype, name="out_norm")(x)
        )
        return conv(self.out_channels, 3, init_scale=1e-5, dtype=self.dtype, name="out_conv")(x)


def _warn_on_large_bottleneck(height: int, width: int, channel_mult: Sequence[int]) -> None:
    """Attention memory grows with the square of the coarsest level's pixel count
    (H W / 4^(levels - 1)) of the input actually seen (a patch, for patch-trained models): a
    512 x 512 image through 3 levels attends over 16384 tokens, a 1 GiB matrix per sample and
    head (the regression step then planned 10 GB on a CPU). Logged when a call is traced."""
    shrink = 2 ** (len(channel_mult) - 1)
    tokens = (height // shrink) * (width // shrink)
    if tokens > BOTTLENECK_TOKEN_WARNING:
        log.warning(
            "UNet on %s with %d levels attends over %d tokens at its coarsest level: %.2f GiB per attention "
            "matrix per sample and head in float32; add levels to channel_mult or train on patches",
            [height, width],
            len(channel_mult),
            tokens,
            tokens**2 * 4 / 2**30,
        )
