"""The reference's Taiwan CorrDiff setting (Mardani et al. 2023; reference.md sections 1-4).

12 ERA5 channels (already interpolated to the 2 km grid) in, 4 CWA WRF channels out, 448 x
448, read from PhysicsNeMo's CWB Zarr layout (``data.format = "cwb"``;
``jax_corrdiff.data.write_cwb_zarr`` writes a small store with the same schema). Widths and
hyperparameters are the paper's: SongUNet 128 x [1,2,2,2,2], 4 blocks, attention at 28 x 28,
dropout 0.13; Adam 2e-4; regression 30 M samples, diffusion 100 M, global batch 512.

    python -m jax_corrdiff.train --config=configs/taiwan.py --workdir=DIR \
        --config.data.target_paths="['/data/cwb/2018_2022.zarr']"
"""

from jax_corrdiff.config import base_config
from jax_corrdiff.data import TAIWAN_CWB_VARIABLES, TAIWAN_ERA5_VARIABLES


def get_config(variant: str = ""):
    if variant:
        raise ValueError(f"unknown taiwan variant {variant!r}")
    config = base_config()
    data = config.data
    data.format = "cwb"
    data.target_paths = ["cwb.zarr"]
    data.target_variables = list(TAIWAN_CWB_VARIABLES)
    data.input_variables = list(TAIWAN_ERA5_VARIABLES)
    data.train_period = ["2018-01-01T00", "2020-12-31T23"]  # the reference trains on all but 2021
    data.valid_period = ["2021-01-01T00", "2021-12-31T23"]
    # base_config() already holds the Taiwan widths, optimiser and sample counts. A GPU config:
    # bf16 compute with float32 parameters, Adam state and loss, as the reference trains under
    # bf16 autocast (base_config's float32 is the CPU default).
    for stage in (config.regression, config.diffusion):
        stage.model.compute_dtype = "bfloat16"
    return config
