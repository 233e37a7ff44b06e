"""Export jax_corrdiff networks as PhysicsNeMo 2.2.2 ``.mdlus`` checkpoints, without torch.

The inverse of :mod:`jax_corrdiff.interop.physicsnemo`: a regression network becomes a
``CorrDiffRegressionUNet``, a diffusion network an ``EDMPrecondSuperResolution``, both
around the SongUNet variant their options need (``SongUNet``, ``SongUNetPosEmbd`` or
``SongUNetPosLtEmbd``).  The archive is the zip PhysicsNeMo 2.2.2 writes (members
``model.pt``, ``args.json``, ``metadata.json``), loadable by
``physicsnemo.Module.from_checkpoint``.

Nothing is written that would load but compute something else: each key name is mapped
back through the importer's own :func:`~jax_corrdiff.interop.physicsnemo.target_path`, and
``args.json`` through its :func:`~jax_corrdiff.interop.physicsnemo_args.model_config_from_args`,
and the export is refused unless both give back exactly this model.  Options PhysicsNeMo's
classes lack (a regression global residual, EDMPrecondSR's conditioning scaling, bare
SongUNets) raise :class:`ExportError`.

GroupNorm: PhysicsNeMo normalises with the unbiased variance in evaluation mode, models
trained here with the biased one.  ``metadata.json`` records ``{"jax_corrdiff":
{"unbiased_groupnorm": false}}``, which the importer honours (the round trip is exact);
PyTorch ignores it, so its outputs differ by that (README, "Exporting").
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np

from jax_corrdiff.interop.mdlus import MdlusArchive
from jax_corrdiff.interop.physicsnemo import LAYER_NAMES, SINGLE_LAYERS, TOP_LEVEL_KEYS, target_path
from jax_corrdiff.interop.physicsnemo_args import EXPORT_METADATA_KEY, model_config_from_args
from jax_corrdiff.interop.torch_save import state_dict_bytes
from jax_corrdiff.models.factory import SHARED_UNET_KEYS

__all__ = ["ExportError", "mdlus_bytes", "physicsnemo_checkpoint", "write_mdlus"]

# Where PhysicsNeMo 2.2.2 defines each class, and the checkpoint version it writes for it.
_CLASSES = {
    "regression": ("CorrDiffRegressionUNet", "physicsnemo.models.diffusion_unets.unet", "0.2.0"),
    "diffusion": ("EDMPrecondSuperResolution", "physicsnemo.diffusion.preconditioners.legacy", "0.1.0"),
}
PHYSICSNEMO_VERSION = "2.2.2"
# Our options that only change speed or memory; PhysicsNeMo runs float32 without remat.
_PERFORMANCE_KEYS = {"remat", "attention_impl"}
_OFF_WHEN_EMPTY = {"lead_time_steps", "lead_time_channels", "prob_channels"}
_MODULE = re.compile(r"^(enc|dec)_l(\d+)_(\w+)$")


class ExportError(ValueError):
    """A model PhysicsNeMo's CorrDiff classes cannot express; the message names the option."""


def _inner_class(unet: dict) -> str:
    if unet.get("lead_time_steps"):
        return "SongUNetPosLtEmbd"
    return "SongUNet" if unet.get("position_grid", "none") == "none" else "SongUNetPosEmbd"


def _args(config: dict) -> dict:
    """``__args__`` of the wrapper class for our model config."""
    unet, inner = config["unet"], _inner_class(config["unet"])
    extra = (unet.get("num_grid_channels", 0) if unet.get("position_grid", "none") != "none" else 0) + unet.get(
        "lead_time_channels", 0
    )
    args = {
        "img_resolution": list(config["img_resolution"]),
        "img_in_channels": config["cond_channels"] + extra,
        "img_out_channels": config["out_channels"],
        "use_fp16": False,
        "model_type": inner,
    }
    if config["kind"] == "diffusion":
        args["sigma_data"] = config.get("sigma_data", 0.5)
    # Our SongUNet options of the same name (models.factory.SHARED_UNET_KEYS), JSON lists for tuples.
    args.update({key: list(v) if isinstance(v := unet[key], tuple) else v for key in SHARED_UNET_KEYS})
    if inner != "SongUNet":
        grid = unet.get("position_grid", "none")
        args["gridtype"] = "sinusoidal" if grid == "none" else grid
        args["N_grid_channels"] = unet.get("num_grid_channels", 0) if grid != "none" else 0
    if inner == "SongUNetPosLtEmbd":
        args.update(
            lead_time_channels=unet["lead_time_channels"],
            lead_time_steps=unet["lead_time_steps"],
            prob_channels=list(unet.get("prob_channels", ())),
        )
    return args


def _refuse_inexpressible(config: dict) -> None:
    kind = config.get("kind")
    if kind not in _CLASSES:
        raise ExportError(f"model kind {kind!r}: only regression and diffusion networks export to PhysicsNeMo")
    if config.get("global_residual"):
        raise ExportError(
            "the regression network has a global residual (model.global_residual); "
            "PhysicsNeMo's CorrDiffRegressionUNet has none"
        )
    multiple = 2 ** (len(config["unet"]["channel_mult"]) - 1)
    if any(side % multiple for side in config["img_resolution"]):
        raise ExportError(
            f"grid {config['img_resolution']} is not a multiple of {multiple}: our SongUNet pads it, "
            "PhysicsNeMo's does not"
        )
    if config.get("legacy_scale_conditioning"):
        raise ExportError("legacy_scale_conditioning (EDMPrecondSR's conditioning scaling) is not exported")


def _physicsnemo_key(path: tuple[str, ...], height: int) -> str:
    """The PhysicsNeMo key of one of our variable paths (below the wrapper's ``unet``)."""
    top = {value: key for key, value in TOP_LEVEL_KEYS.items()}
    if path in top:
        return top[path]
    module, rest = path[1], path[2:]
    param = {"kernel": "weight", "scale": "weight", "bias": "bias"}[rest[-1]]
    if module.startswith("map_layer"):
        return f"{module}.{param}"
    single = {name.format(level=0): block for block, name in SINGLE_LAYERS.items()}
    if module in single:  # the input conv at full resolution, and the decoder's output head
        side = "enc" if single[module] == "conv" else "dec"
        return f"{side}.{height}x{height}_{single[module]}.{param}"
    side, level, block = _MODULE.match(module).groups()
    layer = {ours: theirs for theirs, ours in LAYER_NAMES.items()}.get(rest[0], rest[0])
    size = height >> int(level)
    return f"{side}.{size}x{size}_{block}.{layer}.{param}"


def _from_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Inverse of the importer's layout change: HWIO -> OIHW, (in, out) -> (out, in), channels first."""
    if leaf == "kernel":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    if leaf == "pos_embd":
        return array.transpose(2, 0, 1)
    if leaf == "lt_embd":
        return array.transpose(0, 3, 1, 2)
    if leaf == "prob_scale":
        return array.reshape(1, -1, 1, 1)
    return array


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], np.ndarray]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(_leaves(value, (*prefix, key)))
        else:
            out.append(((*prefix, key), np.asarray(value)))
    return out


def _buffers(config: dict, modules: set[str], height: int) -> dict[str, np.ndarray]:
    """The persistent buffers PhysicsNeMo's state dict holds beyond our variables."""
    buffers = {}
    unet = config["unet"]
    if unet["embedding_type"] == "positional":
        # PositionalEmbedding(endpoint=True): freqs_i = (1/10000)^(i / (n - 1)), n = channels / 2
        half = unet["model_channels"] * unet["channel_mult_noise"] // 2
        buffers["map_noise.freqs"] = (np.float32(1e-4) ** (np.arange(half, dtype=np.float32) / (half - 1))).astype(
            np.float32
        )
    # Down / up blocks resample conv0 and skip with the [1, 1] box filter, f f^T / sum(f)^2.
    box = np.full((1, 1, 2, 2), 0.25, np.float32)
    for module in sorted(modules):
        match = _MODULE.match(module)
        if match and match.group(3) in ("down", "up"):
            size = height >> int(match.group(2))
            for layer in ("conv0", "skip"):
                buffers[f"{match.group(1)}.{size}x{size}_{match.group(3)}.{layer}.resample_filter"] = box
    return buffers


def physicsnemo_checkpoint(config: dict, variables: dict) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(state dict with PhysicsNeMo 2.2.2 key names, args.json, metadata.json) of our network.

    Raises:
        ExportError: the model has an option PhysicsNeMo's classes lack.
    """
    _refuse_inexpressible(config)
    name, module, file_version = _CLASSES[config["kind"]]
    args = {"__name__": name, "__module__": module, "__args__": _args(config)}
    metadata = {
        "physicsnemo_version": PHYSICSNEMO_VERSION,
        "mdlus_file_version": file_version,
        EXPORT_METADATA_KEY: {"unbiased_groupnorm": bool(config["unet"].get("unbiased_groupnorm", False))},
    }
    height = config["img_resolution"][0]
    level_of_height = {height >> level: level for level in range(len(config["unet"]["channel_mult"]))}
    state: dict[str, np.ndarray] = {}
    modules = set()
    for path, value in _leaves(variables):
        inner = (path[0], *path[2:])  # drop the wrapper's "unet"
        key = _physicsnemo_key(inner, height)
        if target_path(key, level_of_height) != inner:  # the importer must read it back to the same place
            raise ExportError(f"variable {'/'.join(path)} has no PhysicsNeMo key (tried {key!r})")
        state["model." + key] = _from_flax_layout(np.asarray(value, np.float32), inner[-1])
        modules.add(inner[1])
    state.update({"model." + k: v for k, v in _buffers(config, modules, height).items()})
    _check_args_round_trip(config, args, metadata)
    return state, args, metadata


def _check_args_round_trip(config: dict, args: dict, metadata: dict) -> None:
    """The importer must build this very model from args.json (performance options aside)."""
    back = model_config_from_args(MdlusArchive({}, args, metadata, "<export>"))
    ours = {k: v for k, v in config.items() if k not in ("compute_dtype", "global_residual")}
    ours["unet"] = {k: v for k, v in config["unet"].items() if k not in _PERFORMANCE_KEYS}
    ours["unet"].setdefault("unbiased_groupnorm", False)
    if config["kind"] == "diffusion":
        ours.setdefault("sigma_data", 0.5)
        ours.setdefault("legacy_scale_conditioning", False)
    if json.loads(json.dumps(_explicit(back))) != json.loads(json.dumps(_explicit(ours))):
        raise ExportError(f"args.json {args['__args__']} would import as {back}, not as this model {ours}")


def _explicit(config: dict) -> dict:
    """The config without options at their "off" value (no lead time, no position grid size)."""
    unet = {k: v for k, v in config["unet"].items() if not (k in _OFF_WHEN_EMPTY and not v)}
    if unet.get("position_grid", "none") == "none":
        unet.pop("num_grid_channels", None)
        unet["position_grid"] = "none"
    return dict(config, unet=unet)


def mdlus_bytes(config: dict, variables: dict) -> bytes:
    """The ``.mdlus`` archive (zip: model.pt, args.json, metadata.json) of our network."""
    state, args, metadata = physicsnemo_checkpoint(config, variables)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for member, data in (
            ("model.pt", state_dict_bytes(state)),
            ("args.json", json.dumps(args).encode()),
            ("metadata.json", json.dumps(metadata).encode()),
        ):
            archive.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def write_mdlus(path: str, config: dict, variables: dict) -> None:
    """Write our network (regression or diffusion) to ``path`` as a PhysicsNeMo ``.mdlus``."""
    data = mdlus_bytes(config, variables)
    with open(path, "wb") as f:
        f.write(data)
