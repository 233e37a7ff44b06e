"""ZSSD on the shipped ERA5 data: a diffusion prior of 0.25 deg UK 2 m temperature.

The prior (``config.stage = "prior"``) models the fine field alone, conditioned on orography,
land fraction and cyclic time (hour of day, day of year); it never sees a coarse input, so one
prior downscales observations at any scale factor by guided sampling:

    python -m jax_corrdiff.train --config=configs/zssd_era5_uk.py --workdir=/tmp/zssd
    python -m jax_corrdiff.train --config=configs/zssd_era5_uk.py:smoke --workdir=/tmp/zssd_smoke  # < 2 min
    python -m jax_corrdiff.generate --workdir=/tmp/zssd --guidance=ucg --obs_factor=8 \\
        --input=jax_corrdiff/data_files/era5_t2m_uk_0p25deg.nc --coarsen --output=zssd.nc

The data section is the demo's (its coarse input, 8x area-averaged, is prepared but the prior
skips it), so the same prepared store and statistics serve CorrDiff and ZSSD.
"""

from jax_corrdiff.config import base_config, set_uk_demo_data, shrink_uk_demo_to_smoke


def get_config(variant: str = ""):
    config = base_config()
    config.stage = "prior"
    set_uk_demo_data(config)

    # 33 x 49 grid: three levels (pad to a multiple of 4), attention at the coarsest.
    config.prior.model.unet.update(
        model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.0
    )
    config.prior.training.update(
        total_samples=8 * 1500,
        batch_size=8,
        lr=1e-3,
        lr_rampup_samples=800,
        ema_halflife_samples=400,
        log_every_steps=25,
        eval_every_steps=250,
        checkpoint_every_steps=250,
        eval_batches=4,
    )

    if variant == "smoke":
        shrink_uk_demo_to_smoke(config)
    elif variant:
        raise ValueError(f"unknown zssd_era5_uk variant {variant!r} (known: smoke)")
    return config
