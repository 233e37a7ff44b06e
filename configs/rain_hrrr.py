"""HRRR 3 km precipitation rate over south-west Idaho from coarse atmospheric inputs (shipped data).

The precipitation DDPM's setting: the fine precipitation rate is predicted from coarse
temperature, humidity and wind (area-averaged 8x, 24 km), not from coarse precipitation, with
orography and land-sea mask static. As no coarse precipitation is an input, the residual is
taken to a regression mean (diffusion.mean = "regression") and sampled by a DDPM. ``prate`` is
log1p-transformed and clamped at 0.

Caveat of the data: the shipped HRRR window is a dry July period, so ``prate`` is zero everywhere
(data/README); this config exercises the pipeline, it cannot learn rain from these 31 hours.

    python -m jax_corrdiff.train --config=configs/rain_hrrr.py --workdir=/tmp/rain_hrrr
"""

from jax_corrdiff.config import base_config, set_hrrr_idaho_data, set_hrrr_idaho_stages, shrink_to_smoke


def get_config(variant: str = ""):
    config = base_config()
    set_hrrr_idaho_data(config, ["prate"], ["t2m", "q2m", "u10", "v10"])
    data = config.data
    data.transforms = {"prate": {"kind": "log1p", "scale": 0.1, "min": 0.0}}
    config.diffusion.parameterization = "ddpm"
    config.diffusion.mean = "regression"

    set_hrrr_idaho_stages(config)
    if variant == "smoke":
        shrink_to_smoke(config, 10, log_every_steps=5)
    elif variant:
        raise ValueError(f"unknown rain_hrrr variant {variant!r} (known: smoke)")
    return config
