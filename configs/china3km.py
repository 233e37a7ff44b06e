"""China 3 km CorrDiff (Sun et al., arXiv 2512.05377; reference.md sections 5 and 7).

25 km global FORECASTS (CMA-GFS, or an SFNO-based AI model) at several lead times in, a
CMA-MESO-like 0.03 deg analysis out, over 10-60N, 70-145E: about 1670 x 2500 (lat x lon)
points. Targets: t2m, u10, v10, tp (hourly precipitation; the paper also downscales radar
composite reflectivity -- add e.g. "cr" to ``target_variables`` when the target files carry
it) and t, u, v, q, z on 1000, 925, 850, 700, 500, 200 hPa (34 channels); inputs: the same
34 variables from the forecast file; static: orography and land-sea mask.

Files (``python -m jax_corrdiff.make_synthetic --schema=china3km --output=DIR`` writes small
ones with exactly this layout):
  data.target_paths  NetCDF/Zarr (glob ok) with ``time`` = valid time, regular 0.03 deg
                     lat/lon, surface (time, lat, lon) and upper-air (time, level, lat, lon)
                     variables, ``level`` in hPa.
  data.input_paths   forecasts laid out (init_time, lead_time, [level,] lat, lon) on a regular
                     0.25 deg grid covering the domain (``time``/``forecast_reference_time``
                     and ``step``/``prediction_timedelta`` are accepted too); every lead time
                     of ``data.lead_times`` must be present.
  data.static_path   orog, lsm on the target grid.
The default paths below are placeholders: set them on the command line, e.g.

    python -m jax_corrdiff.train --config=configs/china3km.py --workdir=DIR \
        --config.data.target_paths="['/data/cma_meso_3km/*.nc']" \
        --config.data.input_paths="['/data/cma_gfs_25km/*.nc']" \
        --config.data.static_path=/data/cma_meso_3km/static.nc

Each training sample is one (init time, lead time) whose valid time init + lead is a target
time; the train/valid periods select samples by VALID time. Both UNets are lead-time aware
(a learned per-lead embedding, ``lead_time_label`` = index into ``data.lead_times``), the
regression adds its output to the interpolated forecast for every target that is also an
input (global residual), and the diffusion model trains on random 448 x 448 patches with a
learnable 100-channel position grid (PhysicsNeMo's patched diffusion: ``gridtype=learnable``,
``N_grid_channels=100``), sampling by overlapping tiles (4 px overlap, 2 px border).

Variant ``smoke``: the synthetic 64 x 96 dataset ``china3km_smoke``
(``jax_corrdiff.data.synthetic.SYNTHETIC_DATASETS``), written by preparation under
WORKDIR/prepared/synthetic (loading the config writes nothing), tiny widths, 32 x 32 patches,
a few steps:

    python -m jax_corrdiff.train --config=configs/china3km.py:smoke --workdir=/tmp/c3k_smoke
"""

from jax_corrdiff.config import base_config, shrink_to_smoke
from jax_corrdiff.data.synthetic import (
    CHINA3KM_LEVELS,
    CHINA3KM_STATIC,
    CHINA3KM_SURFACE,
    CHINA3KM_UPPER,
    SYNTHETIC_DATASETS,
)

SURFACE = list(CHINA3KM_SURFACE)  # t2m, u10, v10, tp   (+ radar composite reflectivity when available)
UPPER = [f"{v}@{level}" for v in CHINA3KM_UPPER for level in CHINA3KM_LEVELS]
LEAD_TIMES = [0, 6, 12, 18, 24, 30, 36, 42, 48]  # hours
SMOKE_DATASET = "china3km_smoke"


def get_config(variant: str = ""):
    config = base_config()
    data = config.data
    data.target_paths = ["/path/to/china_3km/target_*.nc"]  # placeholder
    data.input_paths = ["/path/to/global_25km_forecast/*.nc"]  # placeholder
    data.static_path = "/path/to/china_3km/static.nc"  # placeholder
    data.target_variables = SURFACE + UPPER
    data.input_variables = SURFACE + UPPER
    data.static_variables = list(CHINA3KM_STATIC)
    data.lead_times = list(LEAD_TIMES)
    data.train_period = ["2020-01-01T00", "2022-12-31T23"]  # valid times
    data.valid_period = ["2023-01-01T00", "2023-12-31T23"]

    config.regression.model.global_residual = True
    for stage in (config.regression, config.diffusion):
        stage.model.unet.lead_time_channels = 4  # one embedding per lead time of data.lead_times
        # A GPU config: bf16 compute with float32 parameters, Adam state and loss, as the
        # reference trains under bf16 autocast (base_config's float32 is the CPU default).
        stage.model.compute_dtype = "bfloat16"
    # The regression UNet trains on the whole 1670 x 2500 domain: compiled for an H100 at batch 1
    # per GPU, XLA's plan for its step is 76.2 GB, all of the 76.4 GB JAX takes of the GPU
    # (launch/xla_flags.sh). Keeping only its blocks' matmul and convolution outputs for the
    # backward pass and recomputing the rest brings it to 61.1 GB (benchmarks/gpu_aot_compile.py
    # --model china3km; benchmarks/README.md, *Compiled for a GPU without one*). What this costs
    # per step is unmeasured; on a GPU with more memory, "none".
    config.regression.model.unet.remat = "dots"
    # Widths are the reference's (SongUNet 128 x [1,2,2,2,2], 4 blocks, attention at 28 =
    # 448 >> 4, dropout 0.13; base_config). Patched diffusion as in PhysicsNeMo: a learnable
    # position grid of 100 channels over the whole grid, cropped per patch (at 1670 x 2500
    # that is 417 M grid parameters -- reduce num_grid_channels if memory is short).
    diffusion = config.diffusion
    diffusion.model.unet.position_grid = "learnable"
    diffusion.model.unet.num_grid_channels = 100
    # Random 448 x 448 patches per image (num_patches is our choice, not checked against the reference's configs).
    diffusion.patch.height = diffusion.patch.width = 448
    diffusion.patch.num_patches = 16
    diffusion.patch.overlap = 4  # reference: 4 px overlap (0 gave NaNs), 2 px reflect-padded border
    diffusion.patch.boundary = 2
    # The regression means computed once per sample (training.regression_means) take 1670 x 2500
    # x 34 float32 = 541 MiB a sample, as much again as the prepared targets; the step then
    # skips the whole-domain regression forward it would run for its 16 patches.
    # diffusion.precompute_mean = False where the disk cannot hold them.

    if variant == "smoke":
        data.synthetic_dataset = SMOKE_DATASET  # its files replace the placeholder paths
        data.lead_times = list(SYNTHETIC_DATASETS[SMOKE_DATASET]["lead_times"])
        data.train_period = ["2024-07-01T00", "2024-07-02T11"]  # 15 samples (valid time)
        data.valid_period = ["2024-07-02T12", "2024-07-03T23"]  # 9 samples
        shrink_to_smoke(
            config,
            8,
            unet=dict(channel_mult=[1, 2], dropout=0.0),
            lr=1e-3,
            lr_rampup_samples=16,
            ema_halflife_samples=16,
            log_every_steps=2,
            eval_every_steps=4,
            checkpoint_every_steps=4,
            eval_batches=1,
        )
        diffusion.model.unet.num_grid_channels = 4
        for stage in (config.regression, config.diffusion):
            stage.model.compute_dtype = "float32"  # the smoke run is for CPUs
        config.regression.model.unet.remat = "none"
        diffusion.patch.height = diffusion.patch.width = 32
        diffusion.patch.num_patches = 2
    elif variant:
        raise ValueError(f"unknown china3km variant {variant!r} (known: smoke)")
    return config
