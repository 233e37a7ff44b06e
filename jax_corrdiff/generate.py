"""Generate CorrDiff ensembles: ``python -m jax_corrdiff.generate --workdir=DIR --input=FILE --output=OUT.nc``.

DIR is a training workdir (DIR/regression/model and DIR/diffusion/model). FILE is either a
coarse file on its own grid (interpolated to the model's grid) or, with ``--coarsen``, a
fine-grid truth file coarsened exactly as in training (its truth is kept for scoring).
Output: CF NetCDF (or Zarr when OUT ends in .zarr), written as it goes; a rerun skips
finished times.

With ``--guidance=dps|ucg`` DIR holds a ZSSD prior (DIR/prior/model) instead, sampled with
posterior guidance toward FILE (``jax_corrdiff.inference.zssd``); with ``--coarsen`` FILE is fine
truth block-averaged by ``--obs_factor``.
"""

from absl import app, flags

from jax_corrdiff import distributed
from jax_corrdiff.compilation_cache import cache_dir, enable_compilation_cache
from jax_corrdiff.console import log_progress_to_stdout
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.diffusion.guidance import SCHEDULES, GuidanceSchedule
from jax_corrdiff.inference import zssd
from jax_corrdiff.inference.generate import SAMPLER_PRESETS, CorrDiffModel, generate, make_sampler

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding regression/ and diffusion/ models.")
_INPUT = flags.DEFINE_string("input", None, "Coarse input file, or fine truth file with --coarsen.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .nc (NetCDF-4) or .zarr.")
_COARSEN = flags.DEFINE_bool("coarsen", False, "INPUT holds fine-grid truth: coarsen it as in training.")
_MEMBERS = flags.DEFINE_integer("members", 8, "Ensemble members per time.")
_TIMES = flags.DEFINE_list("times", None, "START,END: an inclusive time range (default: all times).")
_TIME = flags.DEFINE_multi_string("time", None, "A time to generate (repeatable), instead of --times.")
_LEAD_TIME = flags.DEFINE_float("lead_time", None, "Forecast inputs: the lead time (hours) to downscale.")
_SAMPLER = flags.DEFINE_enum("sampler", "stochastic", sorted(SAMPLER_PRESETS), "Sampler preset.")
_STEPS = flags.DEFINE_integer("steps", 0, "Sampler steps (0 = the preset's).")
_SIGMA_MIN = flags.DEFINE_float("sigma_min", 0.0, "Smallest noise level (0 = the preset's).")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", 0.0, "Largest noise level (0 = the preset's).")
_CHURN = flags.DEFINE_float("churn", 0.0, "EDM S_churn (stochasticity; 0 = ODE from the initial noise).")
_S_MIN = flags.DEFINE_float("s_min", 0.0, "Churn only for sigma >= s_min.")
_S_MAX = flags.DEFINE_float("s_max", float("inf"), "Churn only for sigma <= s_max.")
_S_NOISE = flags.DEFINE_float("s_noise", 1.0, "Scale of the churn noise.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Times per compiled call (0 = one per device).")
_MEMBER_BATCH = flags.DEFINE_integer("member_batch_size", 0, "Members vectorised at once (0 = all).")
_TILE_DEVICES = flags.DEFINE_integer(
    "tile_devices", 1, "Devices sharing one image's multi-diffusion tiles (patch-trained models; large domains)."
)
_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache: a directory, '' = WORKDIR/compilation_cache, or 'off'."
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
flags.mark_flags_as_required(["workdir", "input", "output"])


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
        schedule=GuidanceSchedule(_SCHEDULE.value, _GUIDANCE_SCALE.value, sigma_y=_SIGMA_Y.value, gamma=_GAMMA.value),
        members=_MEMBERS.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        member_batch_size=_MEMBER_BATCH.value or None,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _TIMES.value and len(_TIMES.value) != 2:
        raise app.UsageError("--times takes START,END")
    log_progress_to_stdout()
    distributed.initialize()
    enable_compilation_cache(cache_dir(_CACHE.value, _WORKDIR.value))

    sampler = make_sampler(
        _SAMPLER.value,
        steps=_STEPS.value,
        sigma_min=_SIGMA_MIN.value,
        sigma_max=_SIGMA_MAX.value,
        churn=_CHURN.value,
        s_min=_S_MIN.value,
        s_max=_S_MAX.value,
        s_noise=_S_NOISE.value,
    )
    if _GUIDANCE.value:
        generate_zssd(sampler)
        print(f"wrote {_OUTPUT.value}")
        return
    model = CorrDiffModel.load(_WORKDIR.value)
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
    generate(
        model,
        inputs,
        _OUTPUT.value,
        sampler,
        members=_MEMBERS.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        member_batch_size=_MEMBER_BATCH.value or None,
        tile_devices=_TILE_DEVICES.value,
    )
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
