"""Import PhysicsNeMo CorrDiff checkpoints (``.mdlus``) as jax_corrdiff models, without torch.

Supported classes: SongUNet, SongUNetPosEmbd, SongUNetPosLtEmbd, CorrDiffRegressionUNet
(and its deprecated alias UNet), EDMPrecondSuperResolution and the deprecated EDMPrecondSR
(whose ``scale_cond_input`` maps to our ``legacy_scale_conditioning``).

Imported models set ``unbiased_groupnorm``: PhysicsNeMo normalises with the unbiased
variance in evaluation mode, and matching its inference outputs needs the same. They run at
``MATMUL_PRECISION``: full float32, as PhysicsNeMo's CorrDiff (TF32 off), which is what the
parity figures are measured at.

    model = load("corrdiff_diffusion.mdlus")
    out = model(x, img_lr, sigma)      # NCHW float32 NumPy in and out, as torch's forward
"""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.interop.mdlus import MdlusArchive, read_mdlus
from jax_corrdiff.models.embeddings import sinusoidal_position_grid
from jax_corrdiff.models.factory import SHARED_UNET_KEYS, build_model, init_variables

MATMUL_PRECISION = "highest"
UNET_CLASSES = ("SongUNet", "SongUNetPosEmbd", "SongUNetPosLtEmbd")
REGRESSION_CLASSES = ("CorrDiffRegressionUNet", "UNet")
DIFFUSION_CLASSES = ("EDMPrecondSuperResolution", "EDMPrecondSR")

# Constructor defaults of PhysicsNeMo 2.2.2's UNets. Wrappers record only the keyword
# arguments they were given, so the inner class's defaults fill the rest.
_SONGUNET_DEFAULTS = dict(
    label_dim=0,
    augment_dim=0,
    model_channels=128,
    channel_mult=[1, 2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.10,
    label_dropout=0.0,
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
    checkpoint_level=0,
    additive_pos_embed=False,
    bottleneck_attention=True,
    use_apex_gn=False,
    act="silu",
    profile_mode=False,
    amp_mode=False,
)
_POSEMBD_DEFAULTS = dict(
    _SONGUNET_DEFAULTS,
    channel_mult=[1, 2, 2, 2, 2],
    attn_resolutions=[28],
    dropout=0.13,
    gridtype="sinusoidal",
    N_grid_channels=4,
    lead_time_mode=False,
    lead_time_channels=None,
    lead_time_steps=9,
    prob_channels=[],
)
DEFAULTS = {
    "SongUNet": _SONGUNET_DEFAULTS,
    "SongUNetPosEmbd": _POSEMBD_DEFAULTS,
    "SongUNetPosLtEmbd": _POSEMBD_DEFAULTS,
}

# Options that must hold their default for the model to be representable here, and
# options that only change speed or memory in PyTorch.
_REQUIRED = dict(
    label_dim=0,
    augment_dim=0,
    label_dropout=0.0,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=[1, 1],
    additive_pos_embed=False,
    bottleneck_attention=True,
    act="silu",
)
_PERFORMANCE_ONLY = {"checkpoint_level", "use_apex_gn", "profile_mode", "amp_mode", "use_fp16", "lead_time_mode"}
_WRAPPER_ARGS = {
    "img_resolution",
    "img_channels",
    "img_in_channels",
    "img_out_channels",
    "model_type",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "scale_cond_input",
    "use_fp16",
}


class UnsupportedCheckpointError(ValueError):
    """The checkpoint uses an option or class this package does not implement."""


def _unet_config(class_name: str, given: dict, path: str) -> tuple[dict, int]:
    """Our SongUNet options from PhysicsNeMo arguments; also the grid + lead-time channel count."""
    args = dict(DEFAULTS[class_name], **given)
    for key, value in _REQUIRED.items():
        found = args.pop(key)
        if found != value:
            raise UnsupportedCheckpointError(f"{path}: {key}={found!r} is not supported (need {value!r})")
    for key in _PERFORMANCE_ONLY:
        args.pop(key, None)
    gridtype, n_grid = args.pop("gridtype", None), args.pop("N_grid_channels", 0)
    lt_channels, lt_steps = args.pop("lead_time_channels", None), args.pop("lead_time_steps", 0)
    prob_channels = args.pop("prob_channels", [])
    unet = {k: args.pop(k) for k in SHARED_UNET_KEYS}
    for key in ("img_resolution", "in_channels", "out_channels"):
        args.pop(key, None)
    if args:
        raise UnsupportedCheckpointError(f"{path}: unknown {class_name} argument(s) {sorted(args)}")
    if class_name == "SongUNet" or not n_grid:
        n_grid = 0
        unet["position_grid"] = "none"
    elif gridtype in ("sinusoidal", "learnable"):
        unet["position_grid"] = gridtype
        unet["num_grid_channels"] = int(n_grid)
    else:
        raise UnsupportedCheckpointError(f"{path}: gridtype {gridtype!r} is not supported (sinusoidal, learnable)")
    extra = n_grid
    if class_name == "SongUNetPosLtEmbd":
        unet.update(
            lead_time_steps=int(lt_steps), lead_time_channels=int(lt_channels), prob_channels=list(prob_channels)
        )
        extra += int(lt_channels)
    unet["unbiased_groupnorm"] = True
    return unet, extra


def model_config_from_args(archive: MdlusArchive) -> dict:
    """Translate ``args.json`` into a jax_corrdiff model config."""
    name, given = archive.args.get("__name__"), dict(archive.args.get("__args__", {}))
    if name in UNET_CLASSES:
        unet, extra = _unet_config(name, given, archive.path)
        return dict(
            kind="unet",
            img_resolution=list(given["img_resolution"]),
            out_channels=given["out_channels"],
            cond_channels=given["in_channels"] - extra,
            unet=unet,
        )
    if name in REGRESSION_CLASSES + DIFFUSION_CLASSES:
        inner = given.get("model_type", "SongUNetPosEmbd")
        if inner not in UNET_CLASSES:
            raise UnsupportedCheckpointError(f"{archive.path}: model_type {inner!r} is not supported")
        unet, extra = _unet_config(inner, {k: v for k, v in given.items() if k not in _WRAPPER_ARGS}, archive.path)
        config = dict(
            img_resolution=list(given["img_resolution"]),
            out_channels=given["img_out_channels"],
            cond_channels=given["img_in_channels"] - extra,
            unet=unet,
        )
        if name in REGRESSION_CLASSES:
            return dict(kind="regression", **config)
        legacy = bool(given.get("scale_cond_input", True)) if name == "EDMPrecondSR" else False
        return dict(
            kind="diffusion", sigma_data=float(given.get("sigma_data", 0.5)), legacy_scale_conditioning=legacy, **config
        )
    raise UnsupportedCheckpointError(
        f"{archive.path}: class {name!r} is not supported; expected one of "
        f"{UNET_CLASSES + REGRESSION_CLASSES + DIFFUSION_CLASSES}"
    )


_BLOCK_KEY = re.compile(r"^(enc|dec)\.(\d+)x\d+_(\w+?)\.(.+)$")
# 2.2.2 nests attention in `attn`; older checkpoints used norm2 / qkv / proj on the block.
_LAYER_NAMES = {"attn.norm": "norm2", "attn.qkv": "qkv", "attn.proj": "proj"}


def _target_path(key: str, level_of_height: dict[int, int]) -> tuple[str, ...] | None:
    """Our variable path for a PhysicsNeMo UNet state-dict key (``model.`` prefix removed)."""
    if key.endswith(".resample_filter") or key == "map_noise.freqs":
        return None  # fixed filters / formula-derived positional frequencies: checked elsewhere
    if key in ("pos_embd", "lt_embd"):
        return ("params", key)
    if key == "scalar":
        return ("params", "prob_scale")
    if key.startswith("map_layer"):
        layer, param = key.split(".")
        return ("params", layer, "kernel" if param == "weight" else "bias")
    match = _BLOCK_KEY.match(key)
    if not match:
        raise UnsupportedCheckpointError(f"unexpected state-dict key {key!r}")
    side, height, block, rest = match.groups()
    level = level_of_height[int(height)]
    if block in ("conv", "aux_norm", "aux_conv"):  # single layers: input conv and output head
        module = {"conv": f"enc_l{level}_conv", "aux_norm": "out_norm", "aux_conv": "out_conv"}[block]
        return ("params", module, {"weight": "scale" if block == "aux_norm" else "kernel", "bias": "bias"}[rest])
    layer, param = rest.rsplit(".", 1)
    layer = _LAYER_NAMES.get(layer, layer)
    name = {"weight": "scale" if layer.startswith("norm") else "kernel", "bias": "bias"}[param]
    return ("params", f"{side}_l{level}_{block}", layer, name)


def _to_flax_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """OIHW conv kernels -> HWIO, (out, in) linear -> (in, out), channel-first embeddings -> last."""
    leaf = path[-1]
    if leaf == "kernel":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    if leaf == "pos_embd":
        return array.transpose(1, 2, 0)
    if leaf == "lt_embd":
        return array.transpose(0, 2, 3, 1)
    if leaf == "prob_scale":
        return array.reshape(-1)
    return array


def _check_sinusoidal_grid(value: np.ndarray, config: dict, path: str) -> None:
    """Older files may store the fixed grid; it must be the one this package computes."""
    h, w = config["img_resolution"]
    ours = sinusoidal_position_grid(h, w, config["unet"]["num_grid_channels"]).transpose(2, 0, 1)
    if value.shape != ours.shape or not np.allclose(value, ours, atol=1e-5):
        raise UnsupportedCheckpointError(f"{path}: stored sinusoidal pos_embd differs from the standard grid")


def _check_against(template, converted: dict, path: str) -> None:
    """Every variable of the model's ``template`` converted, with its shape, and nothing else."""
    expected = {
        tuple(p.key for p in keys): leaf.shape for keys, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    missing = sorted("/".join(p) for p in set(expected) - set(converted))
    unexpected = sorted("/".join(p) for p in set(converted) - set(expected))
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"{path}: state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for keys, shape in expected.items():
        if converted[keys].shape != tuple(shape):
            raise UnsupportedCheckpointError(
                f"{path}: {'/'.join(keys)} has shape {converted[keys].shape}, model expects {tuple(shape)}"
            )


def convert_state_dict(archive: MdlusArchive, config: dict) -> dict:
    """Map the state dict onto freshly built variables, checking every name and shape."""
    template = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    wrapped = config["kind"] != "unet"
    levels = len(config["unet"].get("channel_mult", ()))
    height = config["img_resolution"][0]
    level_of_height = {height >> lvl: lvl for lvl in range(levels)}
    embedding = config["unet"].get("embedding_type", "positional")

    converted: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in archive.state_dict.items():
        inner = key.removeprefix("model.") if wrapped else key
        if inner in ("device_buffer", "zero_emb"):
            continue  # non-persistent in 2.2.2; placeholders in some older files
        if inner.endswith(".resample_filter") and not np.allclose(value, 0.25):
            raise UnsupportedCheckpointError(f"{archive.path}: {key} is not the [1,1] box filter")
        if inner == "map_noise.freqs":
            if embedding == "fourier":
                converted[("constants", "map_noise", "freqs")] = value.astype(np.float32)
            continue
        if inner == "pos_embd" and config["unet"].get("position_grid") == "sinusoidal":
            _check_sinusoidal_grid(value, config, archive.path)
            continue
        path = _target_path(inner, level_of_height)
        if path is None:
            continue
        if wrapped:
            path = (path[0], "unet", *path[1:])
        converted[path] = _to_flax_layout(np.asarray(value, np.float32), path)

    _check_against(template, converted, archive.path)
    variables: dict = {}
    for path, value in converted.items():
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return variables


@dataclasses.dataclass(frozen=True)
class PhysicsNemoModel:
    """An imported model, callable like the PyTorch module's ``forward`` (NCHW NumPy arrays)."""

    module: Any
    variables: dict
    config: dict
    class_name: str

    @cached_property
    def _apply(self):
        return jax.jit(lambda v, args, kw: self.module.apply(v, *args, **kw))

    def __call__(self, *args, **kwargs) -> np.ndarray:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "force_fp32"}
        kind = self.config["kind"]
        if kind == "diffusion":
            x, img_lr, sigma = args[:3]
            call_args = (_nhwc(x), _nhwc(img_lr), jnp.asarray(sigma, jnp.float32).reshape(-1))
        elif kind == "regression":
            x, img_lr = args[:2]
            call_args = (_nhwc(img_lr),)
            kwargs["latent"] = _nhwc(x)
        else:
            x, noise_labels = args[:2]
            if len(args) > 3 and args[3] is not None:  # SongUNetPosLtEmbd: (x, noise, class, lead_time)
                kwargs["lead_time_label"] = args[3]
            call_args = (_nhwc(x), jnp.asarray(noise_labels, jnp.float32).reshape(-1))
        if "lead_time_label" in kwargs:
            kwargs["lead_time_label"] = jnp.asarray(np.asarray(kwargs["lead_time_label"]).astype(np.int32)).reshape(-1)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            out = self._apply(self.variables, call_args, kwargs)
        return np.asarray(out).transpose(0, 3, 1, 2)


def _nhwc(array) -> jax.Array:
    return jnp.asarray(np.asarray(array, np.float32).transpose(0, 2, 3, 1))


def convert(path: str) -> tuple[dict, dict, MdlusArchive]:
    """(model config, variables, archive) for a ``.mdlus`` file."""
    archive = read_mdlus(path)
    config = model_config_from_args(archive)
    return config, convert_state_dict(archive, config), archive


def load(path: str) -> PhysicsNemoModel:
    """Load a PhysicsNeMo ``.mdlus`` checkpoint as a callable jax_corrdiff model."""
    config, variables, archive = convert(path)
    return PhysicsNemoModel(build_model(config), variables, config, archive.args["__name__"])


__all__ = [
    "MATMUL_PRECISION",
    "PhysicsNemoModel",
    "UnsupportedCheckpointError",
    "convert",
    "load",
    "model_config_from_args",
]
