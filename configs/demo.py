"""The embedded demo: ERA5 0.25 deg 2 m temperature over the UK, shipped with the package.

Paired synthetic protocol: the coarse input is the same field area-averaged 8x (2 deg) and
interpolated back; orography and land fraction are static conditioning. Trains regression
then diffusion on a 2-core CPU in about 10-15 minutes.

    python -m jax_corrdiff.train --config=configs/demo.py --workdir=/tmp/demo
    python -m jax_corrdiff.train --config=configs/demo.py:smoke --workdir=/tmp/smoke   # < 2 min
"""

from jax_corrdiff.config import base_config, set_stages, shrink_to_smoke
from jax_corrdiff.data import demo_data_path


def get_config(variant: str = ""):
    config = base_config()
    data = config.data
    data.target_paths = [demo_data_path("era5_t2m_uk_0p25deg.nc")]
    data.target_variables = ["t2m"]
    data.input_variables = ["t2m"]
    data.coarsen_factor = 8
    data.static_path = demo_data_path("static_era5_uk_0p25deg.nc")
    data.static_variables = ["orog", "land_frac"]
    data.train_period = ["2019-03-01T00", "2019-03-18T23"]
    data.valid_period = ["2019-03-19T00", "2019-03-24T05"]

    # 33 x 49 grid: three levels (pad to a multiple of 4), attention at the coarsest.
    set_stages(
        config,
        unet=dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.0),
        training=dict(
            batch_size=8,
            lr=1e-3,
            lr_rampup_samples=800,
            ema_halflife_samples=400,
            log_every_steps=25,
            eval_every_steps=200,
            checkpoint_every_steps=200,
            eval_batches=4,
        ),
    )
    config.regression.training.total_samples = 8 * 400
    config.diffusion.training.total_samples = 8 * 800

    if variant == "smoke":
        shrink_to_smoke(
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
    elif variant:
        raise ValueError(f"unknown demo variant {variant!r} (known: smoke)")
    return config
