"""HRRR 3 km over south-west Idaho (shipped with the package): 2 m temperature and 10 m wind.

Paired synthetic: the coarse input is the same three fields area-averaged 8x (24 km, about
a global model's grid) and interpolated back; orography and land-sea mask are static
conditioning. 31 hourly +1 h HRRR forecasts: the first 24 train, the last 7 validate.
u10/v10 are grid-relative, as HRRR stores them.

    python -m jax_corrdiff.train --config=configs/hrrr_idaho.py --workdir=/tmp/hrrr
"""

from jax_corrdiff.config import base_config, set_hrrr_idaho_data, set_stages, shrink_to_smoke


def get_config(variant: str = ""):
    config = base_config()
    set_hrrr_idaho_data(config, ["t2m", "u10", "v10"], ["t2m", "u10", "v10"])

    # 78 x 41 grid: three levels (padded to 80 x 44), attention at the coarsest (78 >> 2 = 19).
    set_stages(
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

    if variant == "smoke":
        shrink_to_smoke(config, 10, log_every_steps=5)
    elif variant:
        raise ValueError(f"unknown hrrr_idaho variant {variant!r} (known: smoke)")
    return config
