"""HRRR 3 km over south-west Idaho (shipped with the package): 2 m temperature and 10 m wind.

Paired synthetic: the coarse input is the same three fields area-averaged 8x (24 km, about
a global model's grid) and interpolated back; orography and land-sea mask are static
conditioning. 31 hourly +1 h HRRR forecasts: the first 24 train, the last 7 validate.
u10/v10 are grid-relative, as HRRR stores them.

    python -m jax_corrdiff.train --config=configs/hrrr_idaho.py --workdir=/tmp/hrrr
"""

from jax_corrdiff.config import base_config, set_hrrr_idaho_data, set_hrrr_idaho_stages, shrink_to_smoke


def get_config(variant: str = ""):
    config = base_config()
    set_hrrr_idaho_data(config, ["t2m", "u10", "v10"], ["t2m", "u10", "v10"])

    set_hrrr_idaho_stages(config)

    if variant == "smoke":
        shrink_to_smoke(config, 10, log_every_steps=5)
    elif variant:
        raise ValueError(f"unknown hrrr_idaho variant {variant!r} (known: smoke)")
    return config
