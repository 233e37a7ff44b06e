"""Write a small synthetic dataset with the exact file layout a config expects, and print it.

    python -m jax_corrdiff.make_synthetic --schema=china3km --output=DIR \
        [--height=64 --width=96 --init_times=2024-07-01T00,2024-07-01T12 --lead_times=0,6,12]
    python -m jax_corrdiff.make_synthetic --schema=cwb --output=DIR [--height=32 --width=32 --times=24]

``china3km``: DIR/target.nc (0.03 deg targets), DIR/forecast.nc (0.25 deg forecasts laid out
(init_time, lead_time, [level,] lat, lon)), DIR/static.nc (orog, lsm); see configs/china3km.py.
``cwb``: DIR/cwb.zarr in PhysicsNeMo's CWB (Taiwan) Zarr layout; see configs/taiwan.py.
"""

import os

import pandas as pd
from absl import app, flags

from jax_corrdiff.data.sources import open_dataset
from jax_corrdiff.data.synthetic import describe_files, write_china3km_dataset, write_cwb_zarr

_SCHEMA = flags.DEFINE_enum("schema", None, ["china3km", "cwb"], "Which layout to write.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_HEIGHT = flags.DEFINE_integer("height", None, "Grid points in y (china3km: 64, cwb: 32).")
_WIDTH = flags.DEFINE_integer("width", None, "Grid points in x (china3km: 96, cwb: 32).")
_INIT_TIMES = flags.DEFINE_list(
    "init_times", None, "china3km: forecast init times (default: 4, 12 h apart from 2024-07-01T00)."
)
_LEAD_TIMES = flags.DEFINE_list("lead_times", ["0", "6", "12"], "china3km: lead times in hours.")
_TIMES = flags.DEFINE_integer("times", 24, "cwb: hourly time steps from 2020-01-01T00.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
flags.mark_flags_as_required(["schema", "output"])


def main(argv):
    del argv
    out = _OUTPUT.value
    if _SCHEMA.value == "china3km":
        paths = write_china3km_dataset(
            out,
            height=_HEIGHT.value or 64,
            width=_WIDTH.value or 96,
            init_times=None if _INIT_TIMES.value is None else pd.DatetimeIndex(_INIT_TIMES.value),
            lead_times=[float(h) for h in _LEAD_TIMES.value],
            seed=_SEED.value,
        )
        print(describe_files(paths))
        leads = ", ".join(_LEAD_TIMES.value)
        print(
            f"use with configs/china3km.py: --config.data.target_paths=\"['{paths['target']}']\" "
            f"--config.data.input_paths=\"['{paths['forecast']}']\" --config.data.static_path={paths['static']} "
            f'--config.data.lead_times="[{leads}]"'
        )
    else:
        os.makedirs(out, exist_ok=True)
        path = write_cwb_zarr(
            os.path.join(out, "cwb.zarr"),
            height=_HEIGHT.value or 32,
            width=_WIDTH.value or 32,
            times=pd.date_range("2020-01-01T00", periods=_TIMES.value, freq="h"),
            seed=_SEED.value,
        )
        with open_dataset(path) as ds:
            print(f"cwb: {path}\n{ds}")
        print(f"use with configs/taiwan.py: --config.data.target_paths=\"['{path}']\"")


if __name__ == "__main__":
    app.run(main)
