"""MRMS radar precipitation rate at 0.01 deg (about 1 km) over Florida's east coast and the Atlantic.

The DDPM residual-to-interpolation model: the coarse input is the rain rate area-averaged 25x
(0.25 deg, about ERA5's grid; the last block row/column is partial on the 512-point window) and
interpolated back; a DDPM (cosine schedule, 1000 steps) learns the fine field minus that
interpolation, with no regression stage. Rain is log1p(x / 0.1 mm/h)-transformed before
normalization (heavy tail, zero-inflated) and clamped to [0, 300] mm/h on output, so samples are
never negative. Land fraction is static. 512 x 512 grid: diffusion trains on random 128 x 128
patches and samples by multi-diffusion. 27 two-minute frames: the first 21 train, the last 6
(00:42 to 00:52 UTC) validate and are the held-back frames scored.

    python -m jax_corrdiff.train --config=configs/rain_mrms.py --workdir=/tmp/rain
    python -m jax_corrdiff.train --config=configs/rain_mrms.py:corrdiff --workdir=/tmp/rain_corrdiff
    python -m jax_corrdiff.train --config=configs/rain_mrms.py:greatlakes --workdir=/tmp/rain_gl

Variants, words joined by "_" in any order: smoke (< 2 minutes), corrdiff (regression + EDM
residual, the CorrDiff comparison), greatlakes (the second shared window, stratiform rain over
the Great Lakes, instead of the convective Florida coast). One prepared store holds one grid, so
a model trains on one window; the two windows are two models.
"""

from jax_corrdiff.config import base_config, set_stages, shrink_to_smoke

DATA_DIR = "/work/shared/data"
VARIANT_WORDS = ("smoke", "corrdiff", "greatlakes")


def get_config(variant: str = ""):
    words = set(variant.split("_")) - {""}
    if words - set(VARIANT_WORDS):
        raise ValueError(f"unknown rain_mrms variant {variant!r} (words: {', '.join(VARIANT_WORDS)}, joined by '_')")
    window = "greatlakes" if "greatlakes" in words else "southeast"
    config = base_config()
    data = config.data
    data.target_paths = [f"{DATA_DIR}/mrms_preciprate_{window}_0p01deg.nc"]
    data.target_variables = ["precip_rate"]
    data.input_variables = ["precip_rate"]
    data.coarsen_factor = 25
    data.static_path = f"{DATA_DIR}/static_mrms_{window}_0p01deg.nc"
    data.static_variables = ["land_frac"]
    data.train_period = ["2019-06-10T00:00", "2019-06-10T00:40"]
    data.valid_period = ["2019-06-10T00:42", "2019-06-10T00:52"]
    data.transforms = {"precip_rate": {"kind": "log1p", "scale": 0.1, "min": 0.0, "max": 300.0}}

    if "corrdiff" in words:
        config.regression.model.global_residual = True
    else:
        config.diffusion.parameterization = "ddpm"
        config.diffusion.mean = "interpolation"
    config.diffusion.patch.update(dict(height=128, width=128, num_patches=4, overlap=16, boundary=8))
    set_stages(
        config,
        unet=dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0.0),
        training=dict(
            batch_size=2,
            lr=1e-3,
            lr_rampup_samples=40,
            ema_halflife_samples=40,
            log_every_steps=10,
            eval_every_steps=100,
            checkpoint_every_steps=100,
            eval_batches=1,
            total_samples=2 * 150,
        ),
    )
    # The regression sees the whole 512 x 512 window: five levels put 32 x 32 = 1024 tokens in
    # SongUNet's bottleneck attention (three levels: 16384 tokens, a 10 GB training step).
    config.regression.model.unet.channel_mult = [1, 2, 2, 2, 2]
    config.regression.training.total_samples = 2 * 60
    if "smoke" in words:
        shrink_to_smoke(config, 4, batch_size=2, log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4)
    return config
