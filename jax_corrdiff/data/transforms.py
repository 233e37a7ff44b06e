"""Per-channel transforms applied to physical values before normalization and inverted after.

Declared in the data config (``config.data.transforms``: {channel: spec}), applied to the target
and the coarse input of that name alike, and saved with the normalization statistics (so in
every checkpoint and model directory). A spec is

    {"kind": "none" | "log1p" | "asinh", "scale": eps, "min": lower bound, "max": upper bound}

log1p: y = log(1 + x / eps) and asinh: y = asinh(x / eps) compress heavy tails (precipitation)
so a Gaussian-noise diffusion model can learn them; eps sets where the compression starts.
Physical values are clamped to [min, max] before the transform and again after the inverse, so
precipitation samples are never negative whatever the network outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TRANSFORM_KINDS = ("none", "log1p", "asinh")


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


@dataclasses.dataclass(frozen=True)
class ChannelTransform:
    kind: str = "none"
    scale: float = 1.0
    min: float | None = None
    max: float | None = None

    def __post_init__(self):
        if self.kind not in TRANSFORM_KINDS:
            raise ValueError(f"data.transforms: kind must be one of {TRANSFORM_KINDS}, got {self.kind!r}")
        if not self.scale > 0:
            raise ValueError(f"data.transforms: scale must be > 0, got {self.scale}")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"data.transforms: min {self.min} must be below max {self.max}")
        if self.kind == "log1p" and (self.min is None or self.min <= -self.scale):
            raise ValueError("data.transforms: log1p needs min > -scale (e.g. min 0 for precipitation)")

    @classmethod
    def from_spec(cls, spec: Mapping) -> ChannelTransform:
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"data.transforms: unknown key(s) {sorted(unknown)}; allowed: kind, scale, min, max")
        return cls(**spec)

    def _clamp(self, x):
        if self.min is None and self.max is None:
            return x
        return _xp(x).clip(x, self.min, self.max)

    def forward(self, x):
        x, xp = self._clamp(x), _xp(x)
        if self.kind == "log1p":
            return xp.log1p(x / self.scale)
        if self.kind == "asinh":
            return xp.arcsinh(x / self.scale)
        return x

    def inverse(self, y):
        xp = _xp(y)
        if self.min is not None or self.max is not None:
            # The transform is increasing: clamping y to [T(min), T(max)] first is the same clamp,
            # and keeps expm1 / sinh of far-off network outputs from overflowing.
            lo, hi = (None if b is None else float(self.forward(np.float64(b))) for b in (self.min, self.max))
            y = xp.clip(y, lo, hi)
        if self.kind == "log1p":
            y = self.scale * xp.expm1(y)
        elif self.kind == "asinh":
            y = self.scale * xp.sinh(y)
        return self._clamp(y)


def parse_transforms(specs: Mapping[str, Mapping]) -> dict[str, ChannelTransform]:
    return {str(channel): ChannelTransform.from_spec(dict(spec)) for channel, spec in specs.items()}


def apply_per_channel(x, channels: Sequence[str], transforms: Mapping[str, ChannelTransform], inverse: bool = False):
    """Transform each channel (last axis) of ``x`` that has a transform; NumPy or JAX arrays."""
    if not any(c in transforms for c in channels):
        return x
    xp = _xp(x)
    parts = []
    for i, c in enumerate(channels):
        t = transforms.get(c)
        part = x[..., i]
        parts.append(part if t is None else (t.inverse(part) if inverse else t.forward(part)))
    return xp.stack(parts, axis=-1).astype(x.dtype)
