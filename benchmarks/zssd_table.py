"""The ZSSD table: bilinear, BCSD, DPS, UCG and vanilla DPS at several scale factors, and CorrDiff
at the factor it was trained for, on a prior's data (by default the shipped ERA5 UK data).

One prior (``configs/zssd_era5_uk.py``; ``configs/zssd_hrrr_idaho.py`` with ``--input`` its HRRR
file) downscales the validation period's truth block-averaged by each factor; every row is scored
against the truth with ``jax_corrdiff.evaluation``:

    python benchmarks/zssd_table.py --workdir=/tmp/zssd --output=/tmp/zssd_table \\
        [--factors=4,6,8,10] [--dps_scales=1] [--ucg_scales=3] [--vanilla_dps_scales=1] \\
        [--period=2019-03-19T00,2019-03-24T05] \\
        [--time_stride=7] \\
        [--members=4] [--steps=8] [--corrdiff_workdir=/tmp/demo] [--input=FINE_TRUTH.nc]

Writes OUTPUT/{dps,ucg,vanilla_dps}_x{K}_s{scale}.nc, OUTPUT/corrdiff_x{K}.nc (an existing file
is finished, not redone), OUTPUT/table.json (rewritten after every file) and prints a Markdown
table: the ensemble mean's MAE, RMSE and p99 absolute error, CRPS (fair, of the ensemble; the
error itself for a single field) and the fine-scale power ratio (top third of wavenumbers, 1 =
the truth's), in K.
"""

import json
import os
import time

from absl import app, flags
from harness import hourly_times

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.sources import open_dataset
from jax_corrdiff.diffusion.guidance import GuidanceSchedule
from jax_corrdiff.evaluation import score_dataset
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.inference.zssd import PriorModel, generate_guided, open_inputs

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding prior/model.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the generated files and table.json.", required=True)
_FACTORS = flags.DEFINE_list("factors", ["4", "6", "8", "10"], "Scale factors.")
# (file label, table label, guidance, loss divided by lambda_max) -> its scales flag
_SCALES = {
    ("dps", "DPS", "dps", True): flags.DEFINE_list(
        "dps_scales", ["1"], "sda guidance scales of DPS (block-average operator, loss normalised by lambda_max)."
    ),
    ("ucg", "UCG", "ucg", True): flags.DEFINE_list(
        "ucg_scales", ["3"], "sda guidance scales of unified coordinate guidance."
    ),
    ("vanilla_dps", "vanilla DPS", "dps", False): flags.DEFINE_list(
        "vanilla_dps_scales", [], "sda guidance scales of the paper's vanilla DPS (loss not normalised)."
    ),
}
_PERIOD = flags.DEFINE_list("period", ["2019-03-19T00", "2019-03-24T05"], "START,END of the scored times.")
_STRIDE = flags.DEFINE_integer("time_stride", 7, "Score every N-th hour of the period (7: every hour of day).")
_MEMBERS = flags.DEFINE_integer("members", 4, "Ensemble members.")
_STEPS = flags.DEFINE_integer("steps", 8, "Heun steps (from sigma 80).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Times per compiled call (0 = one per device).")
_CORRDIFF = flags.DEFINE_string("corrdiff_workdir", None, "A trained CorrDiff workdir on the same data (its factor).")
_INPUT = flags.DEFINE_string(
    "input", demo_data_path("era5_t2m_uk_0p25deg.nc"), "The fine truth (the prior's data), block-averaged per factor."
)

COLUMNS = ("mae", "rmse", "crps", "p99_abs_error", "fine_power_ratio")


def row(scores: dict, model: str, factor: int, method: str, seconds: float | None = None) -> dict:
    aggregate = scores["fields"]["t2m"]["models"][model]["aggregate"]
    return {"factor": factor, "method": method, **{c: aggregate[c] for c in COLUMNS}, "seconds": seconds}


def scored(path: str) -> dict:
    with open_dataset(path) as ds:
        return score_dataset(ds, ["t2m"])


def corrdiff_row(times: list[str]) -> dict:
    """CorrDiff (regression + EDM residual) trained for one factor, on the same times, with the
    sampler calibrated for the demo model before cross-fitting (Heun, 18 steps, churn 40, S_noise
    1.1), with which the table's CorrDiff row was measured."""
    sampler = make_sampler("stochastic", churn=40.0, s_noise=1.1)
    model = CorrDiffModel.load(_CORRDIFF.value)
    factor = int(model.data_config["coarsen_factor"])
    inputs = InferenceInputs.open(
        model.data_config, _INPUT.value, coarsen=True, lat=model.lat, lon=model.lon, times=times
    )
    out = os.path.join(_OUTPUT.value, f"corrdiff_x{factor}.nc")
    start = time.perf_counter()
    generate(model, inputs, out, sampler, members=_MEMBERS.value, seed=0, batch_size=_BATCH.value)
    return row(scored(out), "corrdiff", factor, "CorrDiff", time.perf_counter() - start)


def main(argv):
    del argv
    os.makedirs(_OUTPUT.value, exist_ok=True)
    model = PriorModel.load(_WORKDIR.value)
    sampler = make_sampler("stochastic", steps=_STEPS.value, sigma_max=80.0)
    times = hourly_times(_PERIOD.value, _STRIDE.value)
    settings = {"sampler": repr(sampler), "members": _MEMBERS.value, "times": times}
    rows = [corrdiff_row(times)] if _CORRDIFF.value else []
    for factor in (int(f) for f in _FACTORS.value):
        inputs = open_inputs(model, _INPUT.value, coarsen=True, obs_factor=factor, times=times)
        for (name, label, guidance, normalized), scales in _SCALES.items():
            for scale in (float(s) for s in scales.value):
                out = os.path.join(_OUTPUT.value, f"{name}_x{factor}_s{scale:g}.nc")
                start = time.perf_counter()
                generate_guided(
                    model,
                    inputs,
                    out,
                    sampler,
                    guidance=guidance,
                    obs_factor=factor,
                    schedule=GuidanceSchedule("sda", scale, sigma_y=0.05, gamma=1.0, normalized=normalized),
                    members=_MEMBERS.value,
                    seed=0,
                    batch_size=_BATCH.value,
                )
                scores = scored(out)
                if not any(r["factor"] == factor and r["method"] == "bilinear" for r in rows):
                    baselines = {"bilinear": "bilinear", "bcsd": "BCSD"}  # no BCSD for a short record
                    models = scores["fields"]["t2m"]["models"]
                    rows += [row(scores, key, factor, label) for key, label in baselines.items() if key in models]
                method = f"{label} (scale {scale:g})"
                rows.append(row(scores, "corrdiff", factor, method, time.perf_counter() - start))
                with open(os.path.join(_OUTPUT.value, "table.json"), "w") as f:
                    json.dump({**settings, "schedule": "sda, sigma_y 0.05, gamma 1", "rows": rows}, f, indent=1)
    print("| factor | method | " + " | ".join(COLUMNS) + " |\n|---|---|" + "---|" * len(COLUMNS))
    for r in sorted(rows, key=lambda r: r["factor"]):
        print(f"| x{r['factor']} | {r['method']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    app.run(main)
