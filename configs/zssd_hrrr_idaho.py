"""ZSSD on the shipped HRRR 3 km south-west Idaho data: a diffusion prior of 2 m temperature.

The prior models the 3 km field alone, conditioned on orography, land-sea mask and cyclic time,
so one prior downscales block averages at any factor the 78 x 41 grid allows (x10: 8 x 5 coarse
cells, x20: 4 x 3, partial blocks at the edges):

    python -m jax_corrdiff.train --config=configs/zssd_hrrr_idaho.py --workdir=/tmp/zssd_hrrr
    python benchmarks/zssd_table.py --workdir=/tmp/zssd_hrrr --output=/tmp/zssd_hrrr_table \\
        --input=jax_corrdiff/data_files/hrrr_3km_idaho_rme_sfc.nc --factors=10,20 \\
        --period=2018-07-23T01,2018-07-23T07 --time_stride=1 --ucg_scales=1 --vanilla_dps_scales=1

The shipped record is 31 hours (24 train, 7 validate): a thin prior, and too short for BCSD's
per-hour climatology, which the table then leaves out.
"""

from jax_corrdiff.config import base_config, set_hrrr_idaho_data, set_hrrr_idaho_stages, shrink_to_smoke


def get_config(variant: str = ""):
    config = base_config()
    config.stage = "prior"
    set_hrrr_idaho_data(config, ["t2m"], ["t2m"])
    set_hrrr_idaho_stages(config)
    config.prior.training.total_samples = 4 * 1000

    if variant == "smoke":
        shrink_to_smoke(config, 10, log_every_steps=5)
    elif variant:
        raise ValueError(f"unknown zssd_hrrr_idaho variant {variant!r} (known: smoke)")
    return config
