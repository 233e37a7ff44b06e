"""Noise-level embeddings and the position-grid channels of CorrDiff's SongUNet."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def positional_noise_embedding(c_noise: jax.Array, num_channels: int) -> jax.Array:
    """Transformer-style embedding of the noise label, ordered [sin, cos].

    Frequencies are (1/10000)^(i / (n - 1)), i = 0..n-1, n = num_channels / 2 (the
    "endpoint" variant of DDPM++, so the last frequency is exactly 1e-4).
    """
    half = num_channels // 2
    freqs = (1.0 / 10000.0) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
    angles = c_noise.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class FourierNoiseEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++), ordered [sin, cos].

    The frequencies are fixed N(0, scale^2) draws: they live in the ``constants``
    collection, not in ``params``, so the optimiser never updates them.
    """

    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        freqs = self.variable(
            "constants",
            "freqs",
            lambda: self.scale * jax.random.normal(self.make_rng("params"), (self.num_channels // 2,)),
        ).value
        angles = c_noise.astype(jnp.float32)[:, None] * (2 * math.pi * freqs[None, :])
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_position_grid(height: int, width: int, num_channels: int) -> np.ndarray:
    """Fixed sinusoidal position channels, shape (height, width, num_channels).

    With x = linspace(0, 2 pi, width) and y = linspace(0, 2 pi, height) (end points
    included), N = 4 gives [sin x, sin y, cos x, cos y]. N > 4 (a multiple of 4) stacks
    [sin(f x), sin(f y), cos(f x), cos(f y)] for f in 2^linspace(0, K, K), K = N / 4,
    PhysicsNeMo's choice (so N = 8 uses f = 1 and 4), kept for checkpoint compatibility.
    """
    if num_channels % 4:
        raise ValueError(f"sinusoidal grid needs a multiple of 4 channels, got {num_channels}")
    x = np.linspace(0.0, 2 * np.pi, width)
    y = np.linspace(0.0, 2 * np.pi, height)
    grid_y, grid_x = np.meshgrid(y, x, indexing="ij")
    channels = []
    num_freqs = num_channels // 4
    for f in 2.0 ** np.linspace(0.0, num_freqs, num_freqs):
        channels += [np.sin(f * grid_x), np.sin(f * grid_y), np.cos(f * grid_x), np.cos(f * grid_y)]
    return np.stack(channels, axis=-1).astype(np.float32)
