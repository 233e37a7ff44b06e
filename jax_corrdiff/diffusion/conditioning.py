"""The conditioning layout: which channels a CorrDiff network is conditioned on, in which order.

Along the channel axis (NHWC) a network sees

    [x (the noisy residual; diffusion only) | conditioning | position grid | lead-time embedding]

The UNet appends the position grid and the lead-time embedding itself (cropped per patch);
the caller assembles the conditioning image from named parts, always in this order:

    regression mean   (C_out)      diffusion with ``regression_mean``: the frozen stage-1 output
    coarse input      (C_in)       interpolated to the fine grid; empty for a model without one
    static fields     (C_static)
    cyclic time       (4)          with ``cyclic_time`` (the ZSSD prior): hour of day and day of
                                   year as sin/cos (``data.calendar``), constant over the image
    global context    (C_in + C_static)   patched diffusion: the whole [coarse input | static]
                                          resized to the patch, so a patch sees the large scale

The data layer delivers ``img_lr`` = [coarse input | static fields]. A layout is built once per
training stage from the data's channels and the stage's config, saved in the model directory,
and is what the losses, patching, sampling, the model config and generation read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_corrdiff.data.calendar import TIME_FEATURES


@dataclasses.dataclass(frozen=True)
class PatchSettings:
    """Patch-based diffusion (``diffusion.patching``): training on ``num_patches`` random
    ``height`` x ``width`` crops per image; sampling by multi-diffusion over tiles of that size
    overlapping by ``overlap`` pixels, with a reflect-padded border of ``boundary`` pixels."""

    height: int
    width: int
    num_patches: int
    overlap: int
    boundary: int

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclasses.dataclass(frozen=True)
class ConditioningLayout:
    """The parts of one network's conditioning (see the module docstring for their order).

    ``lead_time_steps`` is the number of lead-time labels the network embeds (0: it takes none).
    A prior (ZSSD) has no ``input_channels`` and takes ``cyclic_time`` features instead.
    """

    target_channels: tuple[str, ...]
    input_channels: tuple[str, ...]
    static_channels: tuple[str, ...] = ()
    regression_mean: bool = False
    lead_time_steps: int = 0
    patch: PatchSettings | None = None
    cyclic_time: bool = False

    def __post_init__(self):
        for name in ("target_channels", "input_channels", "static_channels"):
            object.__setattr__(self, name, tuple(str(c) for c in getattr(self, name)))

    @property
    def img_lr_channels(self) -> tuple[str, ...]:
        """The channels of the data's ``img_lr``: coarse input, then static fields."""
        return self.input_channels + self.static_channels

    @property
    def channels(self) -> tuple[str, ...]:
        """Names of the conditioning channels in order (prefixed by their part where it repeats a name)."""
        mean = tuple(f"regression_mean:{c}" for c in self.target_channels) if self.regression_mean else ()
        time = tuple(f"time:{c}" for c in TIME_FEATURES) if self.cyclic_time else ()
        context = tuple(f"global_context:{c}" for c in self.img_lr_channels) if self.patch else ()
        return mean + self.img_lr_channels + time + context

    @property
    def cond_channels(self) -> int:
        return len(self.channels)

    def assemble(
        self,
        img_lr: jax.Array,
        regression_mean: jax.Array | None = None,
        global_context: jax.Array | None = None,
        time_features: jax.Array | None = None,
    ) -> jax.Array:
        """The conditioning image from ``img_lr`` (or its crop) and the parts this layout uses;
        ``time_features`` (B, 4) are broadcast over the image."""
        parts = [img_lr]
        if self.regression_mean:
            if regression_mean is None:
                raise ValueError("this layout is conditioned on the regression mean: pass regression_mean")
            parts.insert(0, regression_mean)
        if self.cyclic_time:
            if time_features is None:
                raise ValueError("this layout is conditioned on cyclic time: pass time_features")
            shape = (*img_lr.shape[:-1], time_features.shape[-1])
            parts.append(jnp.broadcast_to(time_features[:, None, None, :].astype(img_lr.dtype), shape))
        if self.patch:
            if global_context is None:
                raise ValueError("a patched layout is conditioned on the global context: pass global_context")
            parts.append(global_context)
        return jnp.concatenate(parts, axis=-1)

    def residual_pairs(self) -> list[list[int]]:
        """(target channel, img_lr channel) for targets that are also coarse inputs (same name):
        the regression's global residual connection (China 3 km CorrDiff)."""
        inputs = list(self.input_channels)
        return [[i, inputs.index(name)] for i, name in enumerate(self.target_channels) if name in inputs]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> ConditioningLayout:
        fields = {f.name for f in dataclasses.fields(cls)}
        patch = d.get("patch")
        return cls(
            **{k: v for k, v in d.items() if k in fields and k != "patch"}, patch=patch and PatchSettings(**patch)
        )
