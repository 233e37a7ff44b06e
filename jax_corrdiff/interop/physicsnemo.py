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

``args.json`` comes from the same untrusted file as the weights: its values are type-checked
(:mod:`~jax_corrdiff.interop.physicsnemo_args`) and the layers and key shapes it describes are
compared with the state dict before the model is built, so building costs no more than the
weights warrant.  Every problem raises a ``CheckpointFormatError`` naming the file and field.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.interop.errors import CheckpointLimitError, ReadLimits, UnsupportedCheckpointError, short_repr
from jax_corrdiff.interop.mdlus import MdlusArchive, read_mdlus
from jax_corrdiff.interop.physicsnemo_args import (
    DEFAULTS,
    DIFFUSION_CLASSES,
    REGRESSION_CLASSES,
    UNET_CLASSES,
    expected_module_count,
    expected_modules,
    model_config_from_args,
)
from jax_corrdiff.models.embeddings import sinusoidal_position_grid
from jax_corrdiff.models.factory import build_model, init_variables

MATMUL_PRECISION = "highest"

_BLOCK_KEY = re.compile(r"^(enc|dec)\.(\d+)x\d+_(\w+?)\.(.+)$")
# 2.2.2 nests attention in `attn`; older checkpoints used norm2 / qkv / proj on the block.
LAYER_NAMES = {"attn.norm": "norm2", "attn.qkv": "qkv", "attn.proj": "proj"}
# Unnested state-dict keys, and the single layers of the input conv and output head.
TOP_LEVEL_KEYS = {
    "pos_embd": ("params", "pos_embd"),
    "lt_embd": ("params", "lt_embd"),
    "scalar": ("params", "prob_scale"),
    "map_noise.freqs": ("constants", "map_noise", "freqs"),
}
SINGLE_LAYERS = {"conv": "enc_l{level}_conv", "aux_norm": "out_norm", "aux_conv": "out_conv"}


def target_path(key: str, level_of_height: dict[int, int]) -> tuple[str, ...]:
    """Our variable path (below the UNet) for a PhysicsNeMo UNet state-dict key, ``model.`` prefix removed.

    Raises KeyError or ValueError for a key of no known form.
    """
    if key in TOP_LEVEL_KEYS:
        return TOP_LEVEL_KEYS[key]
    if key.startswith("map_layer"):
        layer, param = key.split(".")
        return ("params", layer, {"weight": "kernel", "bias": "bias"}[param])
    match = _BLOCK_KEY.match(key)
    if not match:
        raise KeyError(key)
    side, height, block, rest = match.groups()
    level = level_of_height[int(height)]
    if block in ("conv", "aux_norm", "aux_conv"):  # single layers: input conv and output head
        module = SINGLE_LAYERS[block].format(level=level)
        return ("params", module, {"weight": "scale" if block == "aux_norm" else "kernel", "bias": "bias"}[rest])
    layer, param = rest.rsplit(".", 1)
    layer = LAYER_NAMES.get(layer, layer)
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


def _map_keys(archive: MdlusArchive, config: dict) -> tuple[dict[tuple[str, ...], str], np.ndarray | None]:
    """{our variable path: state-dict key}, and a stored sinusoidal grid, checking every key's form."""
    unet = config["unet"]
    wrapped = config["kind"] != "unet"
    height = config["img_resolution"][0]
    level_of_height = {height >> lvl: lvl for lvl in range(len(unet["channel_mult"]))}
    paths: dict[tuple[str, ...], str] = {}
    stored_grid = None
    for key, value in archive.state_dict.items():
        inner = key.removeprefix("model.") if wrapped else key
        field = f"state-dict key {short_repr(key)}"
        if inner in ("device_buffer", "zero_emb"):
            continue  # non-persistent in 2.2.2; placeholders in some older files
        if inner.endswith(".resample_filter"):
            if value.size > 16 or not np.allclose(value, 0.25):
                raise UnsupportedCheckpointError(archive.path, "is not the [1,1] box filter", field)
            continue
        if inner == "map_noise.freqs" and unet["embedding_type"] != "fourier":
            continue  # positional frequencies follow from a formula
        if inner == "pos_embd" and unet.get("position_grid") == "sinusoidal":
            stored_grid = value  # older files store the fixed grid
            continue
        try:
            path = target_path(inner, level_of_height)
        except (KeyError, ValueError):
            match = _BLOCK_KEY.match(inner)
            if match and match.group(2).isdigit() and int(match.group(2)) not in level_of_height:
                raise UnsupportedCheckpointError(
                    archive.path,
                    f"is for a level {match.group(2)} pixels high, but args.json (img_resolution "
                    f"{config['img_resolution']}, {len(unet['channel_mult'])} levels) gives levels of "
                    f"{sorted(level_of_height, reverse=True)}",
                    field,
                ) from None
            raise UnsupportedCheckpointError(archive.path, "is not a SongUNet variable", field) from None
        if wrapped:
            path = (path[0], "unet", *path[1:])
        if path in paths:
            raise UnsupportedCheckpointError(archive.path, f"sets the same variable as {paths[path]!r}", field)
        paths[path] = key
    return paths, stored_grid


def _check_before_building(
    archive: MdlusArchive,
    config: dict,
    paths: dict[tuple[str, ...], str],
    stored_grid: np.ndarray | None,
    limits: ReadLimits,
) -> None:
    """Compare args.json with the state dict's layers and key shapes, cheaply.

    Building the model costs time in proportion to its layer count and memory in
    proportion to its grid, both set by args.json alone; checked against the
    weights first, a hostile args.json cannot cost more than the state dict it
    came with.
    """
    mismatch = f"does not match the state dict's shapes ({len(archive.state_dict)} entries)"
    _check_layers(archive, config, paths, mismatch)
    _check_key_shapes(archive, config, paths, mismatch)
    if config["unet"].get("position_grid") == "sinusoidal":
        _check_sinusoidal_grid_cost(archive, config, stored_grid, limits)


def _check_layers(archive: MdlusArchive, config: dict, paths: dict[tuple[str, ...], str], mismatch: str) -> None:
    """The layers args.json describes are those of the state dict (counted first, cheaply)."""
    unet, wrapped = config["unet"], config["kind"] != "unet"
    present = {path[2 if wrapped else 1] for path in paths}
    if expected_module_count(config) > len(archive.state_dict):
        raise UnsupportedCheckpointError(
            archive.path,
            f"args.json describes {expected_module_count(config)} layers (num_blocks={unet['num_blocks']}, "
            f"{len(unet['channel_mult'])} levels), more than the state dict has entries: it {mismatch}",
        )
    expected = expected_modules(config)
    if present != expected:
        raise UnsupportedCheckpointError(
            archive.path,
            f"args.json {mismatch}: layers missing from the state dict {sorted(expected - present)[:8]}, "
            f"layers args.json does not describe {sorted(present - expected)[:8]}",
        )


def _check_key_shapes(archive: MdlusArchive, config: dict, paths: dict[tuple[str, ...], str], mismatch: str) -> None:
    """The first convolution and the learned grid / lead-time embeddings have args.json's shapes."""
    unet, wrapped = config["unet"], config["kind"] != "unet"
    h, w = config["img_resolution"]
    channels = config["cond_channels"] + (config["out_channels"] if wrapped else 0)
    want = {"enc_l0_conv": ("kernel", (unet["model_channels"], channels + _extra_channels(unet), 3, 3))}
    if unet.get("position_grid") == "learnable":
        want["pos_embd"] = ("pos_embd", (unet["num_grid_channels"], h, w))
    if unet.get("lead_time_steps"):
        want["lt_embd"] = ("lt_embd", (unet["lead_time_steps"], unet["lead_time_channels"], h, w))
    prefix = ("params", "unet") if wrapped else ("params",)
    for module, (leaf, shape) in want.items():
        path = (*prefix, module, leaf) if module == "enc_l0_conv" else (*prefix, module)
        key = paths.get(path)
        if key is not None and archive.state_dict[key].shape != shape:
            raise UnsupportedCheckpointError(
                archive.path,
                f"has shape {archive.state_dict[key].shape}, but args.json describes {shape}: args.json {mismatch}",
                f"state-dict key {key!r}",
            )


def _check_sinusoidal_grid_cost(
    archive: MdlusArchive, config: dict, stored_grid: np.ndarray | None, limits: ReadLimits
) -> None:
    """A stored sinusoidal grid has args.json's shape, and computing it fits ``limits``."""
    unet, (h, w) = config["unet"], config["img_resolution"]
    grid_shape = (unet["num_grid_channels"], h, w)
    if stored_grid is not None and stored_grid.shape != grid_shape:
        raise UnsupportedCheckpointError(
            archive.path, f"has shape {stored_grid.shape}, but args.json describes {grid_shape}", "pos_embd"
        )
    # The grid is computed in float64, several channels' worth at once.
    cost = 8 * h * w * (unet["num_grid_channels"] + 4)
    if cost > limits.max_bytes:
        raise CheckpointLimitError(
            archive.path,
            f"img_resolution {config['img_resolution']} with {unet['num_grid_channels']} grid channels "
            f"needs {cost} bytes to compute the position grid, more than max_bytes={limits.max_bytes}",
            "args.json __args__.img_resolution",
        )


def _extra_channels(unet: dict) -> int:
    grid = unet["num_grid_channels"] if unet.get("position_grid", "none") != "none" else 0
    return grid + unet.get("lead_time_channels", 0)


def _check_sinusoidal_grid(value: np.ndarray, config: dict, path: str) -> None:
    """Older files may store the fixed grid; it must be the one this package computes."""
    h, w = config["img_resolution"]
    ours = sinusoidal_position_grid(h, w, config["unet"]["num_grid_channels"]).transpose(2, 0, 1)
    if value.shape != ours.shape or not np.allclose(value, ours, atol=1e-5):
        raise UnsupportedCheckpointError(path, "differs from the standard grid", "stored sinusoidal pos_embd")


def convert_state_dict(archive: MdlusArchive, config: dict, limits: ReadLimits | None = None) -> dict:
    """Map the state dict onto the model's variables, checking every name and shape.

    ``limits.max_bytes`` also bounds the fixed position grid the model computes.
    """
    limits = ReadLimits() if limits is None else limits
    paths, stored_grid = _map_keys(archive, config)
    _check_before_building(archive, config, paths, stored_grid, limits)
    try:
        template = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    except MemoryError:
        raise
    except Exception as exc:  # e.g. widths GroupNorm cannot split, from args.json
        raise UnsupportedCheckpointError(
            archive.path, f"args.json describes a model that cannot be built: {type(exc).__name__}: {exc}"
        ) from exc
    if stored_grid is not None:
        _check_sinusoidal_grid(stored_grid, config, archive.path)

    converted = {
        path: _to_flax_layout(np.asarray(archive.state_dict[key], np.float32), path) for path, key in paths.items()
    }
    expected = {
        tuple(p.key for p in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    missing = sorted("/".join(p) for p in set(expected) - set(converted))
    unexpected = sorted("/".join(p) for p in set(converted) - set(expected))
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            archive.path, f"state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for path, shape in expected.items():
        if converted[path].shape != tuple(shape):
            raise UnsupportedCheckpointError(
                archive.path,
                f"has shape {converted[path].shape}, model expects {tuple(shape)}",
                f"state-dict key {paths[path]!r}",
            )
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


def convert(path: str, *, limits: ReadLimits | None = None) -> tuple[dict, dict, MdlusArchive]:
    """(model config, variables, archive) for a ``.mdlus`` file.

    ``limits`` bounds the memory reading the file may take (default :class:`ReadLimits`\\ ():
    4 GiB of tensor data).  Every problem with the file raises a ``CheckpointFormatError``
    naming it: ``UnsupportedCheckpointError`` for options this package lacks or arguments
    that do not match the weights.
    """
    archive = read_mdlus(path, limits=limits)
    config = model_config_from_args(archive)
    return config, convert_state_dict(archive, config, limits), archive


def load(path: str, *, limits: ReadLimits | None = None) -> PhysicsNemoModel:
    """Load a PhysicsNeMo ``.mdlus`` checkpoint as a callable jax_corrdiff model."""
    config, variables, archive = convert(path, limits=limits)
    return PhysicsNemoModel(build_model(config), variables, config, archive.args["__name__"])


__all__ = [
    "MATMUL_PRECISION",
    "DEFAULTS",
    "DIFFUSION_CLASSES",
    "REGRESSION_CLASSES",
    "UNET_CLASSES",
    "PhysicsNemoModel",
    "UnsupportedCheckpointError",
    "convert",
    "convert_state_dict",
    "load",
    "model_config_from_args",
]
