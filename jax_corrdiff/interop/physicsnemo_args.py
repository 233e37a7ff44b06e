"""PhysicsNeMo constructor arguments (``args.json``) as a jax_corrdiff model config.

``args.json`` comes from the same untrusted file as the weights, so every value
read here is type- and range-checked first: a string, a float where an int
belongs, ``Infinity`` or a negative width would otherwise surface as a bare
``TypeError``, ``OverflowError`` or ``ZeroDivisionError`` deep inside model
construction.  :func:`expected_modules` lists the layers the config describes
so that the caller can compare them with the state dict before building
anything (``num_blocks: 100000`` must not trace 100000 blocks first).
"""

from __future__ import annotations

from typing import Any

from jax_corrdiff.interop.errors import CheckpointFormatError, UnsupportedCheckpointError, short_repr
from jax_corrdiff.interop.mdlus import MdlusArchive

# The metadata.json entry that jax_corrdiff's exporter adds (see physicsnemo_export).
EXPORT_METADATA_KEY = "jax_corrdiff"
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
# Far above any real width, count or grid side, and small enough that products
# of a few of them stay cheap Python ints.
_MAX_INT = 1 << 24
_MAX_LIST = 64


class _Args:
    """Typed access to ``args.json``'s ``__args__``; errors name the field."""

    def __init__(self, values: dict, path: str) -> None:
        self.values, self.path = values, path

    def bad(self, key: str, reason: str) -> CheckpointFormatError:
        return CheckpointFormatError(self.path, reason, f"args.json __args__.{key}")

    def int(self, key: str, low: int = 0) -> int:
        value = self.values.get(key)
        if type(value) is not int or not low <= value <= _MAX_INT:
            raise self.bad(key, f"must be an int in [{low}, {_MAX_INT}], got {short_repr(value)}")
        return value

    def ints(self, key: str, low: int = 0, length: tuple[int, int] = (0, _MAX_LIST)) -> list[int]:
        value = self.values.get(key)
        if (
            not isinstance(value, list)
            or not length[0] <= len(value) <= length[1]
            or not all(type(v) is int and low <= v <= _MAX_INT for v in value)
        ):
            raise self.bad(
                key,
                f"must be a list of {length[0]} to {length[1]} ints in [{low}, {_MAX_INT}], got {short_repr(value)}",
            )
        return value

    def resolution(self, key: str) -> list[int]:
        if type(self.values.get(key)) is int:  # PhysicsNeMo accepts one int for a square grid
            side = self.int(key, 1)
            return [side, side]
        return self.ints(key, 1, (2, 2))

    def number(self, key: str, low: float, high: float) -> float:
        value = self.values.get(key)
        if type(value) not in (int, float) or not low <= value <= high:
            raise self.bad(key, f"must be a number in [{low}, {high}], got {short_repr(value)}")
        return float(value)

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.values.get(key)
        if value not in options or type(value) is not str:
            raise UnsupportedCheckpointError(
                self.path, f"{short_repr(value)} is not supported (one of {options})", f"args.json __args__.{key}"
            )
        return value


def _unet_config(class_name: str, given: dict, path: str) -> tuple[dict, int]:
    """Our SongUNet options from PhysicsNeMo arguments; also the grid + lead-time channel count."""
    args = _Args(dict(DEFAULTS[class_name], **given), path)
    for key, value in _REQUIRED.items():
        if args.values.get(key) != value:
            raise UnsupportedCheckpointError(
                path,
                f"{short_repr(args.values.get(key))} is not supported (need {value!r})",
                f"args.json __args__.{key}",
            )
    known = set(_REQUIRED) | _PERFORMANCE_ONLY | set(DEFAULTS[class_name]) | {"img_resolution"}
    unknown = sorted(set(args.values) - known - {"in_channels", "out_channels"})
    if unknown:
        raise UnsupportedCheckpointError(path, f"unknown {class_name} argument(s) {short_repr(unknown)}")
    embedding = args.choice("embedding_type", ("positional", "fourier", "zero"))
    unet: dict[str, Any] = dict(
        model_channels=args.int("model_channels", 1),
        channel_mult=args.ints("channel_mult", 1, (1, 16)),
        channel_mult_emb=args.int("channel_mult_emb", 1),
        channel_mult_noise=args.int("channel_mult_noise", 1),
        num_blocks=args.int("num_blocks"),
        attn_resolutions=args.ints("attn_resolutions"),
        dropout=args.number("dropout", 0.0, 1.0),
        embedding_type=embedding,
    )
    n_grid = 0
    if class_name == "SongUNet" or not args.int("N_grid_channels"):
        unet["position_grid"] = "none"
    else:
        unet["position_grid"] = args.choice("gridtype", ("sinusoidal", "learnable"))
        unet["num_grid_channels"] = n_grid = args.int("N_grid_channels")
    extra = n_grid
    if class_name == "SongUNetPosLtEmbd":
        unet.update(
            lead_time_steps=args.int("lead_time_steps", 1),
            lead_time_channels=args.int("lead_time_channels", 1),
            prob_channels=args.ints("prob_channels"),
        )
        extra += unet["lead_time_channels"]
    return unet, extra


def _diffusion_kind(name: str, given: dict, args: _Args) -> dict:
    """Kind and EDM settings of a diffusion wrapper class."""
    # Only the deprecated EDMPrecondSR scales its conditioning input.
    legacy = given.get("scale_cond_input", True) if name == "EDMPrecondSR" else False
    if type(legacy) is not bool:
        raise args.bad("scale_cond_input", f"must be a bool, got {short_repr(legacy)}")
    sigma_data = args.number("sigma_data", 1e-30, 1e30) if "sigma_data" in given else 0.5
    return dict(kind="diffusion", sigma_data=sigma_data, legacy_scale_conditioning=legacy)


def model_config_from_args(archive: MdlusArchive) -> dict:
    """Translate ``args.json`` into a jax_corrdiff model config."""
    name, given = archive.args.get("__name__"), archive.args.get("__args__", {})
    if not isinstance(given, dict):
        raise CheckpointFormatError(archive.path, f"must be an object, got {short_repr(given)}", "args.json __args__")
    args = _Args(given, archive.path)
    if name in UNET_CLASSES:
        unet, extra = _unet_config(name, given, archive.path)
        config = dict(
            kind="unet",
            img_resolution=args.resolution("img_resolution"),
            out_channels=args.int("out_channels", 1),
            cond_channels=args.int("in_channels", 1) - extra,
            unet=unet,
        )
        in_key = "in_channels"
    elif name in REGRESSION_CLASSES + DIFFUSION_CLASSES:
        inner = given.get("model_type", "SongUNetPosEmbd")
        if inner not in UNET_CLASSES:
            raise UnsupportedCheckpointError(archive.path, f"model_type {short_repr(inner)} is not supported")
        unet, extra = _unet_config(inner, {k: v for k, v in given.items() if k not in _WRAPPER_ARGS}, archive.path)
        config = dict(
            img_resolution=args.resolution("img_resolution"),
            out_channels=args.int("img_out_channels", 1),
            cond_channels=args.int("img_in_channels") - extra,
            unet=unet,
        )
        in_key = "img_in_channels"
        kind = dict(kind="regression") if name in REGRESSION_CLASSES else _diffusion_kind(name, given, args)
        config = dict(**kind, **config)
    else:
        raise UnsupportedCheckpointError(
            archive.path,
            f"class {short_repr(name)} is not supported; expected one of "
            f"{UNET_CLASSES + REGRESSION_CLASSES + DIFFUSION_CLASSES}",
        )
    if config["cond_channels"] < 0:
        raise args.bad(in_key, f"{given[in_key]} input channels cannot hold the {extra} grid / lead-time channels")
    bad_prob = [c for c in unet.get("prob_channels", ()) if c >= config["out_channels"]]
    if bad_prob:
        raise args.bad("prob_channels", f"{bad_prob} are not output channels (there are {config['out_channels']})")
    unet["unbiased_groupnorm"] = _unbiased_groupnorm(archive)
    return config


def _unbiased_groupnorm(archive: MdlusArchive) -> bool:
    """PhysicsNeMo's evaluation-mode GroupNorm divides by N - 1; a model trained here (biased
    variance) says so in its ``metadata.json``, so that it imports as it was trained."""
    ours = archive.metadata.get(EXPORT_METADATA_KEY, {})
    value = ours.get("unbiased_groupnorm", True) if isinstance(ours, dict) else None
    if type(value) is not bool:
        raise CheckpointFormatError(
            archive.path, f"must be a bool, got {short_repr(value)}", f"metadata.json {EXPORT_METADATA_KEY}"
        )
    return value


def _extra_modules(unet: dict) -> set[str]:
    names = set()
    if unet["embedding_type"] != "zero":
        names.update({"map_layer0", "map_layer1"})
    if unet["embedding_type"] == "fourier":
        names.add("map_noise")
    if unet.get("position_grid") == "learnable":
        names.add("pos_embd")
    if unet.get("lead_time_steps"):
        names.add("lt_embd")
    if unet.get("prob_channels"):
        names.add("prob_scale")
    return names


def expected_module_count(config: dict) -> int:
    """len(expected_modules(config)), computed without listing them."""
    unet = config["unet"]
    levels, blocks = len(unet["channel_mult"]), unet["num_blocks"]
    # conv, out_norm, out_conv; encoder and decoder blocks; downs and ups; in0 and in1
    return 3 + levels * (2 * blocks + 1) + 2 * (levels - 1) + 2 + len(_extra_modules(unet))


def expected_modules(config: dict) -> set[str]:
    """The top-level layer names of the SongUNet a config builds (see models/songunet.py)."""
    unet = config["unet"]
    levels, blocks = len(unet["channel_mult"]), unet["num_blocks"]
    names = {"enc_l0_conv", "out_norm", "out_conv"} | _extra_modules(unet)
    for level in range(levels):
        names.update(f"enc_l{level}_block{i}" for i in range(blocks))
        names.update(f"dec_l{level}_block{i}" for i in range(blocks + 1))
        names.update({f"dec_l{level}_in0", f"dec_l{level}_in1"} if level == levels - 1 else {f"dec_l{level}_up"})
        if level:
            names.add(f"enc_l{level}_down")
    return names
