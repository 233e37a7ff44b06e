"""HRRR 3 km over south-west Idaho (shipped with the package): 2 m temperature and 10 m wind.

Paired synthetic: the coarse input is the same three fields area-averaged 8x (24 km, about
a global model's grid) and interpolated back; orography and land-sea mask are static
conditioning. 31 hourly +1 h HRRR forecasts: the first 24 train, the last 7 validate.
u10/v10 are grid-relative, as HRRR stores them.

    python -m jax_corrdiff.train --config=configs/hrrr_idaho.py --workdir=/tmp/hrrr
"""

from jax_corrdiff.config import base_config
from jax_corrdiff.data import demo_data_path


def get_config(variant: str = ""):
    config = base_config()
    data = config.data
    data.target_paths = [demo_data_path("hrrr_3km_idaho_rme_sfc.nc")]
    data.target_variables = ["t2m", "u10", "v10"]
    data.input_variables = ["t2m", "u10", "v10"]
    data.coarsen_factor = 8
    data.static_path = demo_data_path("static_hrrr_3km_idaho_rme.nc")
    data.static_variables = ["orog", "lsm"]
    data.train_period = ["2018-07-22T01", "2018-07-23T00"]
    data.valid_period = ["2018-07-23T01", "2018-07-23T07"]

    # 78 x 41 grid: three levels (padded to 80 x 44), attention at the coarsest (78 >> 2 = 19).
    for stage in (config.regression, config.diffusion):
        unet = stage.model.unet
        unet.model_channels = 32
        unet.channel_mult = [1, 2, 2]
        unet.num_blocks = 2
        unet.attn_resolutions = [19]
        unet.dropout = 0.0
        training = stage.training
        training.batch_size = 4
        training.lr = 5e-4
        training.lr_rampup_samples = 400
        training.ema_halflife_samples = 200
        training.log_every_steps = 25
        training.eval_every_steps = 100
        training.checkpoint_every_steps = 100
        training.eval_batches = 2
        training.total_samples = 4 * 400

    if variant == "smoke":
        for stage in (config.regression, config.diffusion):
            stage.model.unet.model_channels = 8
            stage.model.unet.num_blocks = 1
            stage.model.unet.attn_resolutions = []
            stage.training.total_samples = 4 * 10
            stage.training.log_every_steps = 5
    elif variant:
        raise ValueError(f"unknown hrrr_idaho variant {variant!r} (known: smoke)")
    return config
