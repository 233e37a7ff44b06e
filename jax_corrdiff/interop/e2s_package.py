"""Earth2Studio CorrDiff packages: read one into a ``CorrDiffModel``, write one from a workdir.

The layout is that of Earth2Studio's generic ``earth2studio.models.dx.CorrDiff.load_model``:

    regression.mdlus        CorrDiffRegressionUNet (PhysicsNeMo)
    diffusion.mdlus         EDMPrecondSuperResolution
    metadata.json           input_variables, output_variables (required); invariant_variables,
                            number_of_samples, number_of_steps, solver, sampler_type,
                            inference_mode, hr_mean_conditioning, seed, sigma_min, sigma_max, ...
    stats.json              {"input" | "output" | "invariants": {variable: {"mean", "std"}}}
    output_latlon_grid.nc   lat, lon: 1-D (a regular grid) or 2-D
    invariants.nc           the invariant variables on the output grid, physical units

Earth2Studio conditions the regression on [normalized inputs | normalized invariants] and the
diffusion on [regression mean | those] when ``hr_mean_conditioning`` -- the layout our
``ConditioningLayout`` describes -- so a package loads into the same ``CorrDiffModel`` a
training workdir does.  Earth2Studio's names become the coarse file's variable names through
:mod:`~jax_corrdiff.interop.e2s_names`.  Every missing or malformed piece raises
:class:`PackageError` naming the file and key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import numpy as np
import xarray as xr

from jax_corrdiff.data.grids import read_static
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.sources import FieldSpec
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.inference.generate import CorrDiffModel
from jax_corrdiff.interop import physicsnemo
from jax_corrdiff.interop.e2s_names import e2s_variable, file_variable
from jax_corrdiff.interop.errors import CheckpointFormatError
from jax_corrdiff.interop.physicsnemo_export import write_mdlus
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.factory import build_model

REGRESSION, DIFFUSION = "regression.mdlus", "diffusion.mdlus"
METADATA, STATS = "metadata.json", "stats.json"
OUTPUT_GRID, INVARIANTS = "output_latlon_grid.nc", "invariants.nc"
INFERENCE_MODES = ("regression", "diffusion", "both")
# Our exporter's own metadata.json entry (Earth2Studio ignores it): the training coarsen factor.
EXPORT_KEY = "jax_corrdiff"


class PackageError(ValueError):
    """A package file is missing or malformed; ``path`` and ``key`` name the culprit."""

    def __init__(self, path: str, key: str | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if key is None else f"{path}: key {key!r}: {reason}")
        self.path, self.key, self.reason = path, key, reason


@dataclasses.dataclass(frozen=True)
class PackageDefaults:
    """The package's own generation settings (metadata.json), which generate's flags override."""

    sampler: str  # a SAMPLER_PRESETS name: "stochastic" (Heun) or "deterministic"
    solver: str
    steps: int
    sigma_min: float
    sigma_max: float
    members: int
    seed: int | None
    coarsen_factor: int | None  # set by our exporter: --coarsen works as for the workdir


# metadata.json keys: (type, default); Earth2Studio's defaults.
_METADATA_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "invariant_variables": (list, None),
    "number_of_samples": (int, 1),
    "number_of_steps": (int, 18),
    "solver": (str, "euler"),
    "sampler_type": (str, "stochastic"),
    "inference_mode": (str, "both"),
    "hr_mean_conditioning": (bool, True),
    "seed": ((int, type(None)), None),
    "sigma_min": ((int, float), 0.002),
    "sigma_max": ((int, float), 800.0),
}


def _json_file(path: str) -> dict:
    if not os.path.exists(path):
        raise PackageError(path, None, "missing")
    try:
        with open(path) as f:
            value = json.load(f)
    except (ValueError, RecursionError) as exc:
        raise PackageError(path, None, f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise PackageError(path, None, f"holds a {type(value).__name__}, not an object")
    return value


def _names(path: str, meta: dict, key: str, required: bool) -> list[str]:
    value = meta.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PackageError(path, key, f"must be a non-empty list of variable names, got {value!r}")
    if len(set(value)) != len(value):
        raise PackageError(path, key, f"repeats a variable: {value}")
    return value


def read_metadata(package: str) -> dict:
    """metadata.json with Earth2Studio's defaults filled in, every value type-checked."""
    path = os.path.join(package, METADATA)
    meta = _json_file(path)
    out = {"input_variables": _names(path, meta, "input_variables", True)}
    out["output_variables"] = _names(path, meta, "output_variables", True)
    for key, (kind, default) in _METADATA_KEYS.items():
        value = meta.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PackageError(path, key, f"has the wrong type: {value!r}")
        out[key] = value
    out["invariant_variables"] = _names(path, meta, "invariant_variables", False)
    ours = meta.get(EXPORT_KEY, {})
    factor = ours.get("coarsen_factor") if isinstance(ours, dict) else None
    if factor is not None and (type(factor) is not int or factor < 1):
        raise PackageError(path, f"{EXPORT_KEY}.coarsen_factor", f"must be a positive int, got {factor!r}")
    out["coarsen_factor"] = factor
    for key, allowed in (
        ("inference_mode", INFERENCE_MODES),
        ("sampler_type", ("stochastic", "deterministic")),
        ("solver", ("euler", "heun")),
    ):
        if out[key] not in allowed:
            raise PackageError(path, key, f"{out[key]!r} is not one of {allowed}")
    for key in ("number_of_samples", "number_of_steps"):
        if out[key] < 1:
            raise PackageError(path, key, f"must be at least 1, got {out[key]}")
    if out["inference_mode"] == "diffusion" and out["hr_mean_conditioning"]:
        raise PackageError(
            path, "inference_mode", "'diffusion' alone cannot condition on the regression mean (hr_mean_conditioning)"
        )
    return out


def _stats(package: str, group: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(package, STATS)
    stats = _json_file(path)
    means, stds = [], []
    for name in names:
        entry = stats.get(group, {}).get(name) if isinstance(stats.get(group), dict) else None
        for stat, out in (("mean", means), ("std", stds)):
            value = entry.get(stat) if isinstance(entry, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise PackageError(path, f"{group}.{name}.{stat}", f"must be a finite number, got {value!r}")
            if stat == "std" and value <= 0:
                raise PackageError(path, f"{group}.{name}.std", f"must be positive, got {value}")
            out.append(value)
    return np.asarray(means, np.float32), np.asarray(stds, np.float32)


def read_output_grid(package: str) -> tuple[np.ndarray, np.ndarray]:
    """2-D (lat, lon) of output_latlon_grid.nc (1-D lat and lon are a regular grid)."""
    path = os.path.join(package, OUTPUT_GRID)
    if not os.path.exists(path):
        raise PackageError(path, None, "missing")
    with xr.open_dataset(path) as ds:
        for key in ("lat", "lon"):
            if key not in ds.variables:
                raise PackageError(path, key, f"missing (variables: {sorted(map(str, ds.variables))})")
        lat, lon = np.asarray(ds["lat"].values, np.float64), np.asarray(ds["lon"].values, np.float64)
    if lat.ndim == 1 and lon.ndim == 1:
        lat, lon = np.meshgrid(lat, lon, indexing="ij")
    if lat.ndim != 2 or lat.shape != lon.shape:
        raise PackageError(path, "lat", f"lat {lat.shape} and lon {lon.shape} are not one 1-D or 2-D grid")
    return lat, lon


def _network(package: str, member: str, kind: str) -> tuple[dict, Any]:
    path = os.path.join(package, member)
    if not os.path.exists(path):
        raise PackageError(path, None, "missing")
    try:
        config, variables, _ = physicsnemo.convert(path)
    except CheckpointFormatError as exc:
        raise PackageError(path, exc.field, exc.reason) from exc
    if config["kind"] != kind:
        raise PackageError(path, "args.json __name__", f"holds a {config['kind']} network, not the {kind} one")
    return config, variables


def _check_shapes(package: str, member: str, config: dict, grid: tuple[int, int], cond: int, out: int) -> None:
    path = os.path.join(package, member)
    if tuple(config["img_resolution"]) != grid:
        raise PackageError(
            path, "args.json __args__.img_resolution", f"{config['img_resolution']} differs from the output grid {grid}"
        )
    if config["cond_channels"] != cond:
        raise PackageError(
            path,
            "args.json __args__.img_in_channels",
            f"conditions on {config['cond_channels']} channels, but metadata.json and stats.json give {cond}",
        )
    if config["out_channels"] != out:
        raise PackageError(path, "args.json __args__.img_out_channels", f"{config['out_channels']} != {out} outputs")
    if config["unet"].get("lead_time_steps"):
        raise PackageError(path, "args.json __args__.model_type", "lead-time models are not CorrDiff packages")


def _data_config(package: str, inputs: list[str], outputs: list[str], invariants: list[str], factor: int) -> dict:
    """A data config for ``InferenceInputs``: coarse files hold ``inputs``; the static fields
    are invariants.nc.  A package names no target files: its grid file stands in, which holds
    no target variables (only ``variable_attrs`` reads it)."""
    return dict(
        format="variables",
        target_paths=[os.path.join(package, OUTPUT_GRID)],
        target_variables=outputs,
        input_paths=[],
        input_variables=inputs,
        coarsen_factor=factor,
        static_path=os.path.join(package, INVARIANTS) if invariants else "",
        static_variables=invariants,
        train_period=["", ""],
        valid_period=["", ""],
        nan_policy="error",
        nan_fill_value=0.0,
    )


def load_package(package: str, variable_map: dict[str, str] | None = None) -> tuple[CorrDiffModel, PackageDefaults]:
    """The model of an Earth2Studio CorrDiff package, and its generation settings.

    ``variable_map`` ({Earth2Studio name: file variable}) overrides the default name mapping
    of :mod:`~jax_corrdiff.interop.e2s_names` for the inputs and outputs.
    """
    package = os.path.abspath(package)
    meta = read_metadata(package)
    inputs = [file_variable(v, variable_map) for v in meta["input_variables"]]
    outputs = [file_variable(v, variable_map) for v in meta["output_variables"]]
    invariants = meta["invariant_variables"]
    for group, names in (("input", inputs), ("output", outputs)):
        if len({str(FieldSpec.parse(n)) for n in names}) != len(names):
            raise PackageError(os.path.join(package, METADATA), f"{group}_variables", f"map to repeated names {names}")
    if invariants and not os.path.exists(os.path.join(package, INVARIANTS)):
        raise PackageError(os.path.join(package, INVARIANTS), None, f"missing, but metadata.json lists {invariants}")
    normalizer = Normalizer(
        outputs,
        *_stats(package, "output", meta["output_variables"]),
        inputs,
        *_stats(package, "input", meta["input_variables"]),
        invariants,
        *_stats(package, "invariants", invariants),
    )
    lat, lon = read_output_grid(package)
    reg_config, reg_vars = _network(package, REGRESSION, "regression")
    diff_config, diff_vars = _network(package, DIFFUSION, "diffusion")
    layout = ConditioningLayout(outputs, inputs, invariants, regression_mean=meta["hr_mean_conditioning"])
    n_img_lr = len(layout.img_lr_channels)
    _check_shapes(package, REGRESSION, reg_config, lat.shape, n_img_lr, len(outputs))
    _check_shapes(package, DIFFUSION, diff_config, lat.shape, layout.cond_channels, len(outputs))
    model = CorrDiffModel(
        build_model(reg_config),
        reg_vars,
        build_model(diff_config),
        diff_vars,
        layout,
        physicsnemo.MATMUL_PRECISION,
        normalizer,
        _data_config(package, inputs, outputs, invariants, meta["coarsen_factor"] or 1),
        lat,
        lon,
        package,
        inference_mode=meta["inference_mode"],
    )
    return model, _defaults(meta)


def _defaults(meta: dict) -> PackageDefaults:
    sampler = meta["sampler_type"]
    return PackageDefaults(
        sampler=sampler,
        # PhysicsNeMo's stochastic_sampler is Heun whatever `solver` says.
        solver=meta["solver"] if sampler == "deterministic" else "heun",
        steps=meta["number_of_steps"],
        sigma_min=float(meta["sigma_min"]),
        sigma_max=float(meta["sigma_max"]),
        members=meta["number_of_samples"],
        seed=meta["seed"],
        coarsen_factor=meta["coarsen_factor"],
    )


def _regular_axes(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The 1-D latitude and longitude axes of a regular 2-D grid (rows of one latitude,
    columns of one longitude), or None for a curvilinear grid."""
    if np.all(lat == lat[:, :1]) and np.all(lon == lon[:1, :]):
        return lat[:, 0], lon[0]
    return None


def _grid_dataset(lat: np.ndarray, lon: np.ndarray, fields: dict[str, np.ndarray] | None = None) -> xr.Dataset:
    """lat/lon as 1-D coordinates when the grid is regular, else 2-D (y, x) variables;
    ``fields`` (H, W) on it."""
    axes = _regular_axes(lat, lon)
    if axes is not None:
        coords = {"lat": ("lat", axes[0]), "lon": ("lon", axes[1])}
        dims = ("lat", "lon")
    else:
        coords = {"lat": (("y", "x"), lat), "lon": (("y", "x"), lon)}
        dims = ("y", "x")
    data = {name: (dims, np.asarray(value, np.float32)) for name, value in (fields or {}).items()}
    ds = xr.Dataset(data, coords=coords)
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude")
    return ds


def _refuse_for_package(workdir: str, reg: Any, diff: Any) -> None:
    """Models Earth2Studio's generic CorrDiff wrapper would run differently."""
    layout = diff.conditioning
    if layout.patch is not None:
        raise ValueError(
            f"{workdir}: the diffusion model is patch-trained (multi-diffusion); Earth2Studio's CorrDiff "
            "samples the whole image at once, so it would compute something else"
        )
    if layout.lead_time_steps or diff.source["data"].get("lead_times"):
        raise ValueError(f"{workdir}: lead-time (forecast-input) models do not fit Earth2Studio's CorrDiff")
    if reg.conditioning is not None and reg.conditioning.img_lr_channels != layout.img_lr_channels:
        raise ValueError(f"{workdir}: the regression and diffusion models are conditioned on different channels")


# Earth2Studio's default input: ERA5's 0.25 degree grid (the reference's coarse input).
ERA5_RESOLUTION = 0.25


def _input_resolution(lat: np.ndarray, lon: np.ndarray, coarsen_factor: int) -> float:
    """``latlon_res``: the regular lat/lon input grid Earth2Studio builds around the output grid
    (and without which it refuses a package that has no input_latlon_grid.nc).

    A 1-D output grid was trained on its own cells coarsened ``coarsen_factor`` times, so the
    input resolution is that; a curvilinear output grid takes ERA5's 0.25 degree grid.
    Earth2Studio 0.19 also requires 1-D latitudes to increase (south to north); a package of a
    model trained north to south loads here but not there, so say so.
    """
    axes = _regular_axes(lat, lon)
    if axes is None:
        return ERA5_RESOLUTION
    lat = axes[0]
    if lat[0] > lat[-1]:
        warnings.warn(
            "the model's latitudes run north to south: Earth2Studio 0.19 refuses such a package "
            "(its 1-D grids must increase); jax_corrdiff.generate --model reads it",
            stacklevel=3,
        )
    return float(abs(lat[1] - lat[0]) * coarsen_factor)


def write_package(workdir: str, output: str) -> None:
    """Write the Earth2Studio package of training workdir ``workdir`` to directory ``output``.

    Raises ValueError (``ExportError`` for the networks) for a model the package cannot
    express, FileExistsError if ``output`` holds files.
    """
    reg, diff = (load_model(os.path.join(workdir, stage, "model")) for stage in ("regression", "diffusion"))
    _refuse_for_package(workdir, reg, diff)
    if os.path.isdir(output) and os.listdir(output):
        raise FileExistsError(f"{output} is not empty; choose a new package directory")
    os.makedirs(output, exist_ok=True)
    write_mdlus(os.path.join(output, REGRESSION), reg.config, reg.variables)
    write_mdlus(os.path.join(output, DIFFUSION), diff.config, diff.variables)
    norm, data, (lat, lon) = Normalizer.from_dict(diff.source["normalization"]), diff.source["data"], diff.grid
    names = {group: [e2s_variable(c) for c in getattr(norm, f"{group}_channels")] for group in ("input", "target")}
    metadata = {
        "input_variables": names["input"],
        "output_variables": names["target"],
        "invariant_variables": list(norm.static_channels),
        "number_of_samples": 1,
        "number_of_steps": 18,  # the reference's stochastic sampler (Heun, sigma 800 -> 0.002)
        "solver": "heun",
        "sampler_type": "stochastic",
        "inference_mode": "both",
        "hr_mean_conditioning": diff.conditioning.regression_mean,
        "sigma_min": 0.002,
        "sigma_max": 800.0,
        "latlon_res": _input_resolution(lat, lon, int(data["coarsen_factor"])),
        EXPORT_KEY: {"coarsen_factor": int(data["coarsen_factor"]), "workdir": os.path.abspath(workdir)},
    }
    stats = {
        key: {
            name: {"mean": float(m), "std": float(s)}
            for name, m, s in zip(
                names.get(group, norm.static_channels), getattr(norm, f"{group}_mean"), getattr(norm, f"{group}_std")
            )
        }
        for key, group in (("input", "input"), ("output", "target"), ("invariants", "static"))
    }
    for name, value in (("metadata.json", metadata), ("stats.json", stats)):
        with open(os.path.join(output, name), "w") as f:
            json.dump(value, f, indent=2)
    _grid_dataset(lat, lon).to_netcdf(os.path.join(output, OUTPUT_GRID))
    if norm.static_channels:
        static = read_static(data, lat, lon, "the model's grid")[0]
        fields = {name: static[..., i] for i, name in enumerate(norm.static_channels)}
        _grid_dataset(lat, lon, fields).to_netcdf(os.path.join(output, INVARIANTS))
