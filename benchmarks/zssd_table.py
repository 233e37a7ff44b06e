"""The ZSSD table on the shipped ERA5 UK data: bilinear, DPS and UCG at several scale factors.

One prior (``configs/zssd_era5_uk.py``) downscales the validation days' truth block-averaged by
each factor; every row is scored against the truth with ``jax_corrdiff.evaluation``:

    python benchmarks/zssd_table.py --workdir=/tmp/zssd --output=/tmp/zssd_table \\
        [--factors=4,6,8,10] [--period=2019-03-19T00,2019-03-24T05] [--members=8] [--steps=18]

Writes OUTPUT/{dps,ucg}_x{K}.nc, OUTPUT/table.json and prints a Markdown table (MAE, RMSE,
CRPS, p99 absolute error in K; the ensemble mean's errors for the guided rows).
"""

import json
import os

from absl import app, flags

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.sources import open_dataset
from jax_corrdiff.diffusion.guidance import GuidanceSchedule
from jax_corrdiff.evaluation import score_dataset
from jax_corrdiff.inference.generate import make_sampler
from jax_corrdiff.inference.zssd import GUIDANCE, PriorModel, generate_guided, open_inputs

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding prior/model.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the generated files and table.json.", required=True)
_FACTORS = flags.DEFINE_list("factors", ["4", "6", "8", "10"], "Scale factors.")
_PERIOD = flags.DEFINE_list("period", ["2019-03-19T00", "2019-03-24T05"], "START,END of the scored times.")
_MEMBERS = flags.DEFINE_integer("members", 8, "Ensemble members.")
_STEPS = flags.DEFINE_integer("steps", 18, "Heun steps.")
_SCALE = flags.DEFINE_float("guidance_scale", 1.0, "sda guidance scale.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Times per compiled call (0 = one per device).")

COLUMNS = ("mae", "rmse", "crps", "p99_abs_error")


def table_rows(scores: dict, factor: int, guidance: str) -> list[dict]:
    models = scores["fields"]["t2m"]["models"]
    rows = [{"factor": factor, "method": guidance.upper(), **{c: models["corrdiff"]["aggregate"][c] for c in COLUMNS}}]
    if guidance == GUIDANCE[0]:
        rows.insert(
            0, {"factor": factor, "method": "bilinear", **{c: models["bilinear"]["aggregate"][c] for c in COLUMNS}}
        )
    return rows


def main(argv):
    del argv
    os.makedirs(_OUTPUT.value, exist_ok=True)
    model = PriorModel.load(_WORKDIR.value)
    sampler = make_sampler("stochastic", steps=_STEPS.value, sigma_max=80.0)
    schedule = GuidanceSchedule("sda", _SCALE.value, sigma_y=0.05, gamma=1.0)
    rows = []
    for factor in (int(f) for f in _FACTORS.value):
        inputs = open_inputs(
            model, demo_data_path("era5_t2m_uk_0p25deg.nc"), coarsen=True, obs_factor=factor, period=_PERIOD.value
        )
        for guidance in GUIDANCE:
            out = os.path.join(_OUTPUT.value, f"{guidance}_x{factor}.nc")
            generate_guided(
                model,
                inputs,
                out,
                sampler,
                guidance=guidance,
                obs_factor=factor,
                schedule=schedule,
                members=_MEMBERS.value,
                seed=0,
                batch_size=_BATCH.value,
            )
            with open_dataset(out) as ds:
                rows += table_rows(score_dataset(ds, ["t2m"]), factor, guidance)
    with open(os.path.join(_OUTPUT.value, "table.json"), "w") as f:
        json.dump({"sampler": repr(sampler), "schedule": repr(schedule), "rows": rows}, f, indent=1)
    print("| factor | method | " + " | ".join(COLUMNS) + " |\n|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        print(f"| x{r['factor']} | {r['method']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    app.run(main)
