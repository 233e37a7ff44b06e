"""The embedded demo: ERA5 0.25 deg 2 m temperature over the UK, shipped with the package.

Paired synthetic protocol: the coarse input is the same field area-averaged 8x (2 deg) and
interpolated back; orography and land fraction are static conditioning. Trains regression
then diffusion on a 2-core CPU in about 10-15 minutes.

    python -m jax_corrdiff.train --config=configs/demo.py --workdir=/tmp/demo
    python -m jax_corrdiff.train --config=configs/demo.py:smoke --workdir=/tmp/smoke   # < 2 min
"""

from jax_corrdiff.config import base_config
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
    for stage in (config.regression, config.diffusion):
        unet = stage.model.unet
        unet.model_channels = 32
        unet.channel_mult = [1, 2, 2]
        unet.num_blocks = 2
        unet.attn_resolutions = [8]
        unet.dropout = 0.0
        training = stage.training
        training.batch_size = 8
        training.lr = 1e-3
        training.lr_rampup_samples = 800
        training.ema_halflife_samples = 400
        training.log_every_steps = 25
        training.eval_every_steps = 200
        training.checkpoint_every_steps = 200
        training.eval_batches = 4
    config.regression.training.total_samples = 8 * 400
    config.diffusion.training.total_samples = 8 * 800

    if variant == "smoke":
        for stage in (config.regression, config.diffusion):
            unet = stage.model.unet
            unet.model_channels = 8
            unet.channel_mult = [1, 2]
            unet.num_blocks = 1
            unet.attn_resolutions = []
            training = stage.training
            training.batch_size = 4
            training.lr_rampup_samples = 40
            training.ema_halflife_samples = 40
            training.log_every_steps = 10
            training.eval_every_steps = 30
            training.checkpoint_every_steps = 30
            training.eval_batches = 2
            training.total_samples = 4 * 60
    elif variant:
        raise ValueError(f"unknown demo variant {variant!r} (known: smoke)")
    return config
