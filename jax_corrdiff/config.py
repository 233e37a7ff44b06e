"""The run configuration: one ConfigDict with every field, defaults from the CorrDiff paper.

Files in ``configs/`` start from ``base_config()`` and override (``set_stages`` gives both
stages the same widths and schedule; ``shrink_to_smoke`` makes a minutes-long variant);
``--config.a.b=v`` on the command line overrides further, and a key that does not exist is an
error. Fields that default to "unset" use ``placeholder`` so they can still be set from the
command line. Config files are loaded by path and cannot import each other: shared helpers
live here, with the data blocks of the shipped files (``set_uk_demo_data`` for the demo and
ZSSD, ``set_hrrr_idaho_data`` for the HRRR configs).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from jax_corrdiff.data import demo_data_path

STAGES = ("regression", "diffusion", "all", "prior")


def _unet(**overrides) -> ml_collections.ConfigDict:
    """SongUNet widths; defaults are the Taiwan CorrDiff model (reference.md section 2)."""
    unet = dict(
        model_channels=128,
        channel_mult=[1, 2, 2, 2, 2],
        channel_mult_emb=4,
        channel_mult_noise=1,
        num_blocks=4,
        attn_resolutions=[28],
        dropout=0.13,
        position_grid="sinusoidal",
        num_grid_channels=4,
        # Channels of the learned per-lead-time embedding (0 = none). With forecast inputs
        # (data.lead_times) the number of lead times it embeds comes from the data.
        lead_time_channels=0,
        # Backward-pass rematerialisation of each UNet block: none | dots | full (less
        # activation memory for more compute; figures in benchmarks/results).
        remat="none",
        # Attention kernel: unset = XLA's choice, "xla", or "cudnn" (fused, NVIDIA GPUs, bf16).
        attention_impl=config_dict.placeholder(str),
    )
    unet.update(overrides)
    return ml_collections.ConfigDict(unet)


def _training(**overrides) -> ml_collections.ConfigDict:
    training = dict(
        total_samples=30_000_000,  # length in samples seen, as the reference counts it
        batch_size=512,  # global batch: split over all devices
        grad_accumulation=1,  # micro-batches per step (same global batch, less memory)
        lr=2e-4,
        lr_rampup_samples=10_000_000,  # linear warm-up
        lr_decay=1.0,  # lr *= lr_decay every lr_decay_samples (closed form, no in-place drift)
        lr_decay_samples=8_000_000,
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        grad_clip_norm=0.0,  # 0 = no clipping
        ema_halflife_samples=500_000,  # paper-era CorrDiff: EMA half-life 500 k images
        ema_rampup_ratio=0.05,  # half-life <= ratio * samples seen early in training
        log_every_steps=50,
        eval_every_steps=500,
        eval_batches=4,
        checkpoint_every_steps=500,
        keep_checkpoints=3,
    )
    training.update(overrides)
    return ml_collections.ConfigDict(training)


def _data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            format="variables",
            target_paths=[],
            target_variables=[],
            input_paths=[],
            input_variables=[],
            coarsen_factor=8,
            static_path="",
            static_variables=[],
            train_period=["", ""],
            valid_period=["", ""],
            nan_policy="error",
            nan_fill_value=0.0,
            # Forecast inputs: lead times (hours) of input files laid out (init_time, lead_time, ...);
            # empty = analysis inputs with a plain time axis.
            lead_times=[],
            # A name of data.synthetic.SYNTHETIC_DATASETS: preparation writes it under
            # WORKDIR/prepared and takes the paths from it (smoke runs, tests); "" = real files.
            synthetic_dataset="",
            # Per-channel transforms before normalization, {channel: {"kind": "none" | "log1p" |
            # "asinh", "scale": eps, "min": ..., "max": ...}} (data.transforms); {} = none.
            transforms={},
            worker_count=0,
        )
    )


def _diffusion() -> ml_collections.ConfigDict:
    diffusion = ml_collections.ConfigDict()
    diffusion.model = ml_collections.ConfigDict(
        dict(
            unet=_unet(embedding_type="positional"),
            compute_dtype="float32",
            sigma_data=0.5,
            hr_mean_conditioning=True,  # condition on the regression mean (before the coarse input)
        )
    )
    diffusion.loss = ml_collections.ConfigDict(dict(p_mean=0.0, p_std=1.2))
    # "edm" (CorrDiff: EDM denoiser, sigma ~ log-normal) or "ddpm" (discrete-time epsilon
    # prediction with a beta schedule of num_timesteps steps; sampled by DDIM, diffusion.ddpm).
    diffusion.parameterization = "edm"
    diffusion.ddpm = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000))
    # The residual's mean: "regression" (the trained regression UNet, CorrDiff) or
    # "interpolation" (the interpolated coarse input of each target; no regression stage).
    diffusion.mean = "regression"
    # The regression mean of each sample computed once before training and read with the
    # sample (training.regression_means: a target-sized float32 array per sample on disk),
    # rather than recomputed by a regression forward in every step.
    diffusion.precompute_mean = True
    # Patch-based diffusion for domains too large for one device (China 3 km CorrDiff):
    # training on num_patches random height x width crops per image, sampling by
    # multi-diffusion over tiles of that size overlapping by `overlap` pixels, with a
    # reflect-padded border of `boundary` pixels. height = width = 0: whole images.
    diffusion.patch = ml_collections.ConfigDict(dict(height=0, width=0, num_patches=1, overlap=4, boundary=2))
    diffusion.training = _training(total_samples=100_000_000)
    # Regression model directory the diffusion stage conditions on; unset = this
    # workdir's regression stage.
    diffusion.regression_model = config_dict.placeholder(str)
    # Cross-fitting (training.cross_fit): folds = K >= 2 also trains K regression fold models,
    # fold k without the training blocks b (block_hours long) with b mod K = k, and the
    # diffusion stage learns each sample's residual to the fold model that did not see it.
    diffusion.cross_fit = ml_collections.ConfigDict(dict(folds=0, block_hours=24.0))
    return diffusion


def _prior() -> ml_collections.ConfigDict:
    """The ZSSD prior: an EDM diffusion model of the fine field alone, conditioned on the static
    fields and cyclic time (no coarse input, no regression mean); whole images."""
    prior = ml_collections.ConfigDict()
    prior.model = ml_collections.ConfigDict(
        dict(unet=_unet(embedding_type="positional"), compute_dtype="float32", sigma_data=0.5)
    )
    # EDM's log-normal sigma (Karras et al. 2022, Table 1): the prior models the full field, not
    # CorrDiff's small residual, so the EDM default p_mean = -1.2 applies.
    prior.loss = ml_collections.ConfigDict(dict(p_mean=-1.2, p_std=1.2))
    prior.training = _training(total_samples=100_000_000)
    return prior


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run, at the Taiwan CorrDiff defaults; the data section is left empty."""
    config = ml_collections.ConfigDict()
    config.stage = "all"
    config.seed = 0
    config.num_devices = 0  # 0 = every device of every process
    # JAX devices a single CPU training process splits its cores into (jax_corrdiff.cpu_devices):
    # 0 = one per core for networks under 128 channels (as many as divide the batches), else 1.
    config.cpu_devices = 0
    # jax.default_matmul_precision of training, saved with the models and used by generation:
    # "highest" keeps float32 matmuls/convs exact on GPUs (XLA defaults to TF32 there).
    config.matmul_precision = "highest"
    # Persistent XLA compilation cache (jax_corrdiff.compilation_cache) and, in its executables/,
    # the compiled training steps a restart loads without tracing (jax_corrdiff.executable_cache):
    # "" = JAX_COMPILATION_CACHE_DIR when set, else WORKDIR/compilation_cache; a path; or "off".
    config.compilation_cache_dir = ""
    config.data = _data()
    config.regression = ml_collections.ConfigDict()
    config.regression.model = ml_collections.ConfigDict(
        # global_residual: outputs that are also inputs (same name) are predicted as a
        # correction added to the interpolated coarse field (China 3 km CorrDiff).
        dict(unet=_unet(embedding_type="zero"), compute_dtype="float32", global_residual=False)
    )
    config.regression.training = _training()
    config.diffusion = _diffusion()
    config.prior = _prior()
    config.lock()  # every field is here: setting one that is not raises, in files as on the command line
    return config


# Training fields that divide or count steps: 0 or less is meaningless (a ZeroDivisionError or
# nothing trained), so they are refused before any data is read.
_POSITIVE_TRAINING_KEYS = (
    "batch_size",
    "grad_accumulation",
    "log_every_steps",
    "eval_every_steps",
    "eval_batches",
    "checkpoint_every_steps",
)


def check_training_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages ``config.stage`` trains, after checking their training numbers; raises ValueError
    naming the key (``regression.training.batch_size`` ...) whose value cannot work."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage must be one of {STAGES}, got {config.stage!r}")
    stages = ("regression", "diffusion") if config.stage == "all" else (config.stage,)
    if config.diffusion.mean == "interpolation":  # the residual is to the coarse input: no regression stage
        stages = tuple(s for s in stages if s != "regression")
    for stage in stages:
        training = config[stage].training
        for key in _POSITIVE_TRAINING_KEYS:
            if int(training[key]) <= 0:
                raise ValueError(f"{stage}.training.{key} must be > 0, got {training[key]!r}")
        if int(training.total_samples) < int(training.batch_size):
            raise ValueError(
                f"{stage}.training.total_samples={training.total_samples} is smaller than one batch "
                f"({stage}.training.batch_size={training.batch_size}): not one step would train"
            )
    return stages


# SongUNet widths of every smoke variant: a few thousand parameters per stage, no attention.
SMOKE_UNET = dict(model_channels=8, num_blocks=1, attn_resolutions=[])


def set_stages(config: ml_collections.ConfigDict, *, unet: dict | None = None, training: dict | None = None):
    """Give every stage (regression, diffusion and the ZSSD prior) the same ``unet`` and
    ``training`` overrides."""
    for stage in (config.regression, config.diffusion, config.prior):
        stage.model.unet.update(unet or {})
        stage.training.update(training or {})
    return config


def shrink_to_smoke(
    config: ml_collections.ConfigDict, steps: int, *, batch_size: int = 4, unet: dict | None = None, **training
):
    """Every stage at ``SMOKE_UNET`` widths (updated by ``unet``), ``steps`` steps of
    ``batch_size``, and the ``training`` overrides: a run of minutes on a CPU."""
    return set_stages(
        config,
        unet={**SMOKE_UNET, **(unet or {})},
        training={"batch_size": batch_size, "total_samples": batch_size * steps, **training},
    )


def set_uk_demo_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The shipped ERA5 0.25 deg UK 2 m temperature (data_files/README.md) as ``config.data``:
    the input is the target area-averaged 8x (2 deg), orography and land fraction are static;
    1-18 March 2019 train, 19-24 March validate. The demo's and ZSSD's, so one prepared store
    and its statistics serve both."""
    data = config.data
    data.target_paths = [demo_data_path("era5_t2m_uk_0p25deg.nc")]
    data.target_variables = ["t2m"]
    data.input_variables = ["t2m"]
    data.coarsen_factor = 8
    data.static_path = demo_data_path("static_era5_uk_0p25deg.nc")
    data.static_variables = ["orog", "land_frac"]
    data.train_period = ["2019-03-01T00", "2019-03-18T23"]
    data.valid_period = ["2019-03-19T00", "2019-03-24T05"]
    return config


def shrink_uk_demo_to_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The UK demo's smoke variant (demo and ZSSD): 60 steps on two levels, schedules to match."""
    return shrink_to_smoke(
        config,
        60,
        unet=dict(channel_mult=[1, 2]),
        lr_rampup_samples=40,
        ema_halflife_samples=40,
        log_every_steps=10,
        eval_every_steps=30,
        checkpoint_every_steps=30,
        eval_batches=2,
    )


def set_hrrr_idaho_data(
    config: ml_collections.ConfigDict, target_variables: list[str], input_variables: list[str]
) -> ml_collections.ConfigDict:
    """The shipped HRRR 3 km south-west Idaho surface fields (data_files/README.md) as
    ``config.data``: inputs area-averaged 8x (24 km), orography and land-sea mask static; 31
    hourly +1 h forecasts, the first 24 train and the last 7 validate."""
    data = config.data
    data.target_paths = [demo_data_path("hrrr_3km_idaho_rme_sfc.nc")]
    data.target_variables = list(target_variables)
    data.input_variables = list(input_variables)
    data.coarsen_factor = 8
    data.static_path = demo_data_path("static_hrrr_3km_idaho_rme.nc")
    data.static_variables = ["orog", "lsm"]
    data.train_period = ["2018-07-22T01", "2018-07-23T00"]
    data.valid_period = ["2018-07-23T01", "2018-07-23T07"]
    return config


def set_hrrr_idaho_stages(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every stage's widths and schedule on the 78 x 41 HRRR Idaho grid: three levels (padded
    to 80 x 44), attention at the coarsest (78 >> 2 = 19), 400 steps of 4."""
    return set_stages(
        config,
        unet=dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[19], dropout=0.0),
        training=dict(
            batch_size=4,
            lr=5e-4,
            lr_rampup_samples=400,
            ema_halflife_samples=200,
            log_every_steps=25,
            eval_every_steps=100,
            checkpoint_every_steps=100,
            eval_batches=2,
            total_samples=4 * 400,
        ),
    )
