"""Build CorrDiff networks from a model config (a ConfigDict or a plain mapping).

A model config is saved with every checkpoint so the weights reload without the file
that trained them. Its keys:

    kind            "regression" | "diffusion" (EDM) | "ddpm" (epsilon prediction) | "unet" (a bare
                    SongUNet, e.g. imported)
    img_resolution  (height, width) of the target grid
    out_channels    target channels
    cond_channels   channels of the conditioning image fed to the network (training takes it
                    from the stage's ConditioningLayout); for a bare "unet", the channels of x
    compute_dtype   "float32" | "bfloat16" (parameters stay float32)
    unet            SongUNet options (see SongUNet)
    global_residual [(out_channel, in_channel), ...]   regression only
    sigma_data, legacy_scale_conditioning              diffusion only
    schedule, num_timesteps                            ddpm only (diffusion.ddpm.beta_schedule)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_corrdiff.models.corrdiff import EDMPrecondSR, EpsilonUNet, RegressionUNet
from jax_corrdiff.models.songunet import SongUNet

# SongUNet options that PhysicsNeMo's SongUNet takes under the same names (widths, noise embedding).
SHARED_UNET_KEYS = (
    "model_channels",
    "channel_mult",
    "channel_mult_emb",
    "channel_mult_noise",
    "num_blocks",
    "attn_resolutions",
    "dropout",
    "embedding_type",
)
UNET_KEYS = frozenset(SHARED_UNET_KEYS) | {
    "position_grid",
    "num_grid_channels",
    "lead_time_steps",
    "lead_time_channels",
    "prob_channels",
    "unbiased_groupnorm",
    "remat",
    "attention_impl",
}
COMMON_KEYS = frozenset({"kind", "img_resolution", "out_channels", "cond_channels", "compute_dtype", "unet"})
KIND_KEYS = {
    "regression": frozenset({"global_residual"}),
    "diffusion": frozenset({"sigma_data", "legacy_scale_conditioning"}),
    "ddpm": frozenset({"schedule", "num_timesteps"}),
    "unet": frozenset(),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _as_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _check_keys(where: str, given: Mapping, allowed: frozenset) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; allowed: {sorted(allowed)}")


def build_model(config: Any) -> RegressionUNet | EDMPrecondSR | EpsilonUNet | SongUNet:
    cfg = _as_dict(config)
    kind = cfg.get("kind")
    if kind not in KIND_KEYS:
        raise ValueError(f"model.kind must be one of {sorted(KIND_KEYS)}, got {kind!r}")
    _check_keys("model", cfg, COMMON_KEYS | KIND_KEYS[kind])
    unet_cfg = _as_dict(cfg.get("unet", {}))
    _check_keys("model.unet", unet_cfg, UNET_KEYS)
    dtype_name = cfg.get("compute_dtype", "float32")
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype_name!r}")
    for key in ("channel_mult", "attn_resolutions", "prob_channels"):
        if key in unet_cfg:
            unet_cfg[key] = tuple(unet_cfg[key])
    unet = SongUNet(
        img_resolution=tuple(cfg["img_resolution"]),
        out_channels=int(cfg["out_channels"]),
        dtype=COMPUTE_DTYPES[dtype_name],
        **unet_cfg,
    )
    if kind == "unet":
        return unet
    if kind == "regression":
        pairs = tuple(tuple(int(i) for i in p) for p in cfg.get("global_residual", ()))
        return RegressionUNet(unet, global_residual=pairs)
    if kind == "ddpm":
        return EpsilonUNet(unet, schedule=str(cfg["schedule"]), num_timesteps=int(cfg["num_timesteps"]))
    return EDMPrecondSR(
        unet,
        sigma_data=float(cfg.get("sigma_data", 0.5)),
        legacy_scale_conditioning=bool(cfg.get("legacy_scale_conditioning", False)),
    )


def example_inputs(config: Any, batch: int = 1) -> tuple[tuple, dict]:
    """Zero inputs of the right shapes: (positional args, keyword args) for init/apply."""
    cfg = _as_dict(config)
    h, w = cfg["img_resolution"]
    img_lr = jnp.zeros((batch, h, w, cfg["cond_channels"]), jnp.float32)
    kwargs = {}
    if _as_dict(cfg.get("unet", {})).get("lead_time_steps", 0):
        kwargs["lead_time_label"] = jnp.zeros((batch,), jnp.int32)
    if cfg["kind"] == "regression":
        return (img_lr,), kwargs
    if cfg["kind"] == "unet":
        return (img_lr, jnp.zeros((batch,), jnp.float32)), kwargs
    x = jnp.zeros((batch, h, w, cfg["out_channels"]), jnp.float32)
    return (x, img_lr, jnp.ones((batch,), jnp.float32)), kwargs


def init_variables(config: Any, key: jax.Array) -> dict:
    """Randomly initialised variables ({"params": ..., maybe "constants": ...})."""
    args, kwargs = example_inputs(config)
    return build_model(config).init(key, *args, **kwargs)


def count_params(config: Any) -> int:
    """Number of trainable parameters, computed from shapes only (no memory used)."""
    shapes = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
