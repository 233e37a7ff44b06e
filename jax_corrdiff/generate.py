"""Generate CorrDiff ensembles: ``python -m jax_corrdiff.generate --workdir=DIR --input=FILE --output=OUT.nc``.

DIR is a training workdir (DIR/regression/model and DIR/diffusion/model); ``--model=PKG``
instead loads an Earth2Studio CorrDiff package (interop/e2s_package.py), whose sampler
settings, member count and seed are then the defaults the flags override. FILE is either a
coarse file on its own grid (interpolated to the model's grid) or, with ``--coarsen``, a
fine-grid truth file coarsened exactly as in training (its truth is kept for scoring).
Output: CF NetCDF (or Zarr when OUT ends in .zarr), written as it goes; a rerun skips
finished times, and is refused when its settings (seed, sampler, model, input, members) differ
from the file's, unless ``--overwrite`` starts the file anew.

With ``--guidance=dps|ucg`` DIR holds a ZSSD prior (DIR/prior/model) instead, sampled with
posterior guidance toward FILE (``jax_corrdiff.inference.zssd``); with ``--coarsen`` FILE is fine
truth block-averaged by ``--obs_factor``.
"""

import dataclasses

from absl import app, flags

from jax_corrdiff import distributed
from jax_corrdiff.compilation_cache import cache_dir, enable_compilation_cache
from jax_corrdiff.console import exit_on, log_progress_to_stdout
from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.diffusion.guidance import SCHEDULES, GuidanceSchedule
from jax_corrdiff.diffusion.samplers import SOLVERS
from jax_corrdiff.inference import zssd
from jax_corrdiff.inference.generate import (
    SAMPLER_NAMES,
    CorrDiffModel,
    check_options,
    generate,
    make_ddim_sampler,
    make_sampler,
)
from jax_corrdiff.interop.e2s_names import parse_variable_map
from jax_corrdiff.interop.e2s_package import PackageError, load_package

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding regression/ and diffusion/ models.")
_MODEL = flags.DEFINE_string("model", None, "Earth2Studio CorrDiff package directory (instead of --workdir).")
_VARIABLE_MAP = flags.DEFINE_list(
    "variable_map", [], "With --model: E2S_NAME=FILE_VARIABLE overrides of the name mapping (interop/e2s_names.py)."
)
_INPUT = flags.DEFINE_string("input", None, "Coarse input file, or fine truth file with --coarsen.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .nc (NetCDF-4) or .zarr.")
_COARSEN = flags.DEFINE_bool("coarsen", False, "INPUT holds fine-grid truth: coarsen it as in training.")
_MEMBERS = flags.DEFINE_integer("members", 8, "Ensemble members per time.")
_TIMES = flags.DEFINE_list("times", None, "START,END: an inclusive time range (default: all times).")
_TIME = flags.DEFINE_multi_string("time", None, "A time to generate (repeatable), instead of --times.")
_LEAD_TIME = flags.DEFINE_float("lead_time", None, "Forecast inputs: the lead time (hours) to downscale.")
_SAMPLER = flags.DEFINE_enum("sampler", "stochastic", SAMPLER_NAMES, "Sampler preset (ddim: DDPM models).")
_STEPS = flags.DEFINE_integer("steps", 0, "Sampler steps (0 = the preset's).")
_SOLVER = flags.DEFINE_enum(
    "solver", None, SOLVERS, "EDM solver instead of the preset's (dpmpp_2m: 8 evaluations match Heun-35 on the demo)."
)
_SIGMA_MIN = flags.DEFINE_float("sigma_min", 0.0, "Smallest noise level (0 = the preset's).")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", 0.0, "Largest noise level (0 = the preset's).")
_CHURN = flags.DEFINE_float("churn", 0.0, "EDM S_churn (stochasticity; 0 = ODE from the initial noise).")
_S_MIN = flags.DEFINE_float("s_min", 0.0, "Churn only for sigma >= s_min.")
_S_MAX = flags.DEFINE_float("s_max", float("inf"), "Churn only for sigma <= s_max.")
_S_NOISE = flags.DEFINE_float("s_noise", 1.0, "Scale of the churn noise.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM stochasticity (0 = deterministic, 1 = ancestral DDPM).")
_X0_CLIP = flags.DEFINE_float("x0_clip", 0.0, "DDIM: clip the predicted x0 to +-x0_clip (normalized units; 0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Times per compiled call (0 = one per device).")
_MEMBER_BATCH = flags.DEFINE_integer("member_batch_size", 0, "Members vectorised at once (0 = all).")
_TILE_DEVICES = flags.DEFINE_integer(
    "tile_devices", 1, "Devices sharing one image's multi-diffusion tiles (patch-trained models; large domains)."
)
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "",
    "Persistent XLA compilation cache, and in its executables/ the compiled sampling program a later run loads"
    " untraced: a directory, 'off', or '' = JAX_COMPILATION_CACHE_DIR when set, else WORKDIR/compilation_cache.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing output (a rerun otherwise finishes it, with the same settings only)."
)
_GUIDANCE = flags.DEFINE_enum(
    "guidance", None, zssd.GUIDANCE, "ZSSD: sample the prior in WORKDIR/prior with this guidance."
)
_OBS_FACTOR = flags.DEFINE_integer(
    "obs_factor", 8, "ZSSD: block-average factor of --coarsen, and the unified grid (fine cells) of ucg."
)
_SCHEDULE = flags.DEFINE_enum("guidance_schedule", "sda", SCHEDULES, "ZSSD: guidance step (diffusion.guidance).")
_GUIDANCE_SCALE = flags.DEFINE_float("guidance_scale", 1.0, "ZSSD: guidance scale (0 = the unguided prior).")
_SIGMA_Y = flags.DEFINE_float("sigma_y", 0.05, "ZSSD sda: observation noise, normalized units.")
_GAMMA = flags.DEFINE_float("gamma", 1.0, "ZSSD sda: weight of sigma^2 in the likelihood variance.")
_NORMALIZED = flags.DEFINE_bool(
    "guidance_normalized",
    True,
    "ZSSD: divide the guidance loss by lambda_max(A^T W^2 A); false = the paper's vanilla DPS.",
)
flags.mark_flags_as_required(["input", "output"])
flags.mark_flags_as_mutual_exclusive(["workdir", "model"], required=True)


def _load_model():
    """(model, sampler defaults {flag: value} for flags left unset) of --workdir or --model."""
    if _WORKDIR.value:
        return CorrDiffModel.load(_WORKDIR.value), {}
    model, pkg = load_package(_MODEL.value, parse_variable_map(_VARIABLE_MAP.value))
    if _COARSEN.value and pkg.coarsen_factor is None:
        raise app.UsageError(f"--coarsen: package {_MODEL.value} does not record the coarsening it was trained with")
    defaults = dict(
        sampler=pkg.sampler, steps=pkg.steps, sigma_min=pkg.sigma_min, sigma_max=pkg.sigma_max, members=pkg.members
    )
    if pkg.seed is not None:
        defaults["seed"] = pkg.seed
    return model, {name: value for name, value in defaults.items() if not flags.FLAGS[name].present} | {
        "solver": pkg.solver
    }


def _make_sampler(model, defaults: dict):
    """The sampler the flags ask for; a package's settings fill the flags left unset."""
    name = defaults.get("sampler", _SAMPLER.value)
    if name == "ddim":
        return make_ddim_sampler(model, steps=_STEPS.value, eta=_ETA.value, x0_clip=_X0_CLIP.value)
    sampler = make_sampler(
        name,
        steps=defaults.get("steps", _STEPS.value),
        sigma_min=defaults.get("sigma_min", _SIGMA_MIN.value),
        sigma_max=defaults.get("sigma_max", _SIGMA_MAX.value),
        churn=_CHURN.value,
        s_min=_S_MIN.value,
        s_max=_S_MAX.value,
        s_noise=_S_NOISE.value,
    )
    if "solver" in defaults and not _SAMPLER.present:  # the package's Euler / Heun
        sampler = dataclasses.replace(sampler, solver=defaults["solver"])
    if _SOLVER.value:
        sampler = dataclasses.replace(sampler, solver=_SOLVER.value)
    return sampler


def generate_zssd(sampler) -> None:
    model = zssd.PriorModel.load(_WORKDIR.value)
    inputs = zssd.open_inputs(
        model,
        _INPUT.value,
        coarsen=_COARSEN.value,
        obs_factor=_OBS_FACTOR.value,
        period=_TIMES.value,
        times=_TIME.value,
    )
    zssd.generate_guided(
        model,
        inputs,
        _OUTPUT.value,
        sampler,
        guidance=_GUIDANCE.value,
        obs_factor=_OBS_FACTOR.value,
        schedule=GuidanceSchedule(
            _SCHEDULE.value,
            _GUIDANCE_SCALE.value,
            sigma_y=_SIGMA_Y.value,
            gamma=_GAMMA.value,
            normalized=_NORMALIZED.value,
        ),
        members=_MEMBERS.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        member_batch_size=_MEMBER_BATCH.value or None,
    )


@exit_on(DataError, PackageError, FileNotFoundError)
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _TIMES.value and len(_TIMES.value) != 2:
        raise app.UsageError("--times takes START,END")
    try:
        check_options(
            _OUTPUT.value, members=_MEMBERS.value, batch_size=_BATCH.value, member_batch_size=_MEMBER_BATCH.value
        )
    except ValueError as error:
        raise app.UsageError(f"--{error}") from None
    log_progress_to_stdout()
    distributed.initialize()
    # A package directory is not written to: its cache only where --compilation_cache says.
    enable_compilation_cache(cache_dir(_CACHE.value or ("off" if _MODEL.value else ""), _WORKDIR.value))

    if _GUIDANCE.value:
        if not _WORKDIR.value or _SAMPLER.value == "ddim":
            raise app.UsageError("--guidance samples a ZSSD prior: it needs --workdir and an EDM sampler")
        generate_zssd(_make_sampler(None, {}))
        print(f"wrote {_OUTPUT.value}")
        return
    model, defaults = _load_model()
    inputs = InferenceInputs.open(
        model.data_config,
        _INPUT.value,
        coarsen=_COARSEN.value,
        lat=model.lat,
        lon=model.lon,
        period=_TIMES.value,
        times=_TIME.value,
        lead_time=_LEAD_TIME.value,
    )
    sampler = _make_sampler(model, defaults)
    generate(
        model,
        inputs,
        _OUTPUT.value,
        sampler,
        members=defaults.get("members", _MEMBERS.value),
        seed=defaults.get("seed", _SEED.value),
        batch_size=_BATCH.value,
        member_batch_size=_MEMBER_BATCH.value or None,
        tile_devices=_TILE_DEVICES.value,
        overwrite=_OVERWRITE.value,
    )
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
