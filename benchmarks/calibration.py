"""Ensemble calibration of a trained demo workdir: sampler settings against spread-skill, rank
histogram, CRPS and the fine-scale spectrum, plus the residual diagnostic.

    python benchmarks/calibration.py --workdir=/tmp/demo --output=benchmarks/results/calibration_demo.json \\
        [--settings=demo,stochastic,...] [--members=8,16] [--time_stride=1] [--files=DIR]

Each setting (``SETTINGS``: a sampler preset of ``jax_corrdiff.generate`` and its overrides)
generates the validation period (``--period``, every ``--time_stride``-th hour) from the
coarsened truth into FILES/<setting>_m<M>_stride<N>.nc (an existing file is finished, not redone), and
``jax_corrdiff.evaluation.score_dataset`` scores it. The JSON (rewritten after every row; rows of
other workdirs and settings already in it are kept) holds each row's CorrDiff scores, the
regression and bilinear baselines and the generation time, and per workdir the residual
variances of ``jax_corrdiff.training.residuals`` on the training and validation periods.
"""

import json
import os
import time

from absl import app, flags
from harness import hourly_times

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.sources import open_dataset
from jax_corrdiff.evaluation import score_dataset
from jax_corrdiff.evaluation.report import write_json
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.training.residuals import residual_variances

# name -> (preset, overrides of jax_corrdiff.inference.generate.make_sampler): the generate flags
# --sampler, --steps, --sigma_min, --sigma_max, --churn, --s_min, --s_max, --s_noise.
SETTINGS = {
    "demo": ("deterministic", {}),  # launch/demo.sh before this study: Euler, 8 steps, sigma 80
    "stochastic": ("stochastic", {}),  # the reference's Heun, 18 steps, sigma 800
    "euler16": ("deterministic", {"steps": 16}),
    # gamma = min(churn / steps, sqrt(2) - 1): with 8 steps any churn >= 3.3 is the maximum.
    "euler_churn2": ("deterministic", {"churn": 2.0}),
    "euler_churn10": ("deterministic", {"churn": 10.0}),
    "euler_churn40": ("deterministic", {"churn": 40.0}),
    "euler16_churn40": ("deterministic", {"steps": 16, "churn": 40.0}),
    "euler_snoise1.1_churn40": ("deterministic", {"churn": 40.0, "s_noise": 1.1}),
    "euler_snoise1.3_churn40": ("deterministic", {"churn": 40.0, "s_noise": 1.3}),
    "euler_snoise1.5_churn40": ("deterministic", {"churn": 40.0, "s_noise": 1.5}),
    "euler_snoise1.7_churn40": ("deterministic", {"churn": 40.0, "s_noise": 1.7}),
    "euler_sigmamax800": ("deterministic", {"sigma_max": 800.0}),
    "heun_churn40": ("stochastic", {"churn": 40.0}),
    "heun_churn40_snoise1.1": ("stochastic", {"churn": 40.0, "s_noise": 1.1}),
    "heun_churn40_snoise1.2": ("stochastic", {"churn": 40.0, "s_noise": 1.2}),
    # no churn below sigma 0.1 (the last three of the 18 levels): the finest scales are not inflated
    "heun_churn40_snoise1.2_smin0.1": ("stochastic", {"churn": 40.0, "s_noise": 1.2, "s_min": 0.1}),
    "heun32": ("stochastic", {"steps": 32}),
}
SCORES = ("mae", "rmse", "crps", "spread", "spread_skill_ratio", "outside_share", "outside_share_ideal")
SCORES += ("fine_power_ratio", "p99_abs_error")

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (regression/ and diffusion/ models).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON.", required=True)
_FILES = flags.DEFINE_string("files", None, "Directory for the generated files (default: WORKDIR/calibration).")
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), f"Settings to run, of {list(SETTINGS)}.")
_MEMBERS = flags.DEFINE_list("members", ["8"], "Ensemble sizes.")
_PERIOD = flags.DEFINE_list("period", ["2019-03-19T00", "2019-03-24T05"], "START,END of the validation times.")
_STRIDE = flags.DEFINE_integer("time_stride", 1, "Use every N-th hour of the period.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 6, "Times per compiled call.")
_RESIDUALS = flags.DEFINE_bool("residuals", True, "Also the residual variances (training vs validation).")


def run_setting(model: CorrDiffModel, inputs: InferenceInputs, name: str, members: int, files: str) -> dict:
    """Generate (or finish) FILES/<name>_m<members>.nc and score it; one JSON row."""
    preset, overrides = SETTINGS[name]
    sampler = make_sampler(preset, **overrides)
    path = os.path.join(files, f"{name}_m{members}_stride{_STRIDE.value}.nc")
    start = time.perf_counter()
    generate(model, inputs, path, sampler, members=members, seed=_SEED.value, batch_size=_BATCH.value)
    seconds = time.perf_counter() - start
    with open_dataset(path) as ds:
        field = score_dataset(ds)["fields"]["t2m"]
    models = {m: {s: r["aggregate"].get(s) for s in SCORES} for m, r in field["models"].items()}
    return {
        "setting": name,
        "preset": preset,
        "overrides": overrides,
        "members": members,
        "network_evaluations": sampler.network_evaluations,
        "generate_seconds": round(seconds, 1),
        "times": len(inputs),
        "corrdiff": models.pop("corrdiff"),
        "baselines": models,
        "rank_histogram": field["rank_histogram"],
    }


def print_row(row: dict) -> None:
    c = row["corrdiff"]
    print(
        f"{row['setting']:>24} M={row['members']:<3} SSR {c['spread_skill_ratio']:.3f}  outside "
        f"{c['outside_share']:.3f} ({c['outside_share_ideal']:.3f})  CRPS {c['crps']:.4f}  MAE {c['mae']:.4f}  "
        f"fine power {c['fine_power_ratio']:.3f}  [{row['generate_seconds']:.0f} s]",
        flush=True,
    )


def main(argv):
    del argv
    unknown = sorted(set(_SETTINGS.value) - set(SETTINGS))
    if unknown:
        raise app.UsageError(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    files = _FILES.value or os.path.join(_WORKDIR.value, "calibration")
    os.makedirs(files, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    model = CorrDiffModel.load(_WORKDIR.value)
    times = hourly_times(_PERIOD.value, _STRIDE.value)
    inputs = InferenceInputs.open(
        model.data_config,
        demo_data_path("era5_t2m_uk_0p25deg.nc"),
        coarsen=True,
        lat=model.lat,
        lon=model.lon,
        times=times,
    )
    workdir = os.path.abspath(_WORKDIR.value)
    results = {"period": _PERIOD.value, "rows": [], "residual_variance": {}}
    if os.path.exists(_OUTPUT.value):  # rows of earlier runs (other settings, workdirs) are kept
        with open(_OUTPUT.value) as f:
            results = {**results, **json.load(f), "period": _PERIOD.value}
    if _RESIDUALS.value:
        results["residual_variance"][workdir] = residual_variances(workdir)
        print("residual variance (normalized):", results["residual_variance"][workdir], flush=True)
    rows = {(r["workdir"], r["setting"], r["members"], r["time_stride"]): r for r in results["rows"]}
    for members in map(int, _MEMBERS.value):
        for name in _SETTINGS.value:
            row = run_setting(model, inputs, name, members, files)
            row = {"workdir": workdir, **row, "time_stride": _STRIDE.value}
            rows[(workdir, name, members, _STRIDE.value)] = row
            results["rows"] = list(rows.values())
            write_json(results, _OUTPUT.value)
            print_row(row)


if __name__ == "__main__":
    app.run(main)
