"""Skill against network evaluations: Euler, Heun and DPM-Solver++(2M) on the demo's validation days.

    python benchmarks/nfe_skill.py --workdir=DIR --out=benchmarks/results/nfe_skill_demo.json

DIR is a trained demo workdir (``launch/demo.sh``, ``configs/demo.py``). Each solver samples
the demo's validation ensemble (the times of ``launch/demo.sh``, the truth coarsened as in
training, 8 members, seed 0) at about 4, 8, 12, 18 and 35 network evaluations per sample:
N steps of Euler or DPM-Solver++(2M) take N evaluations, N of Heun 2N - 1, so Heun runs
(E + 1) // 2 steps for E. Every sampler uses the reference's noise schedule (the "stochastic"
preset: sigma 800 -> 0.002, rho 7, no churn), so only the solver and the step count vary;
the reference is Heun at 18 steps (35 evaluations). The members are scored with
``jax_corrdiff.evaluation`` (fair CRPS, MAE of the ensemble mean) and the script prints, per
solver, the fewest evaluations whose CRPS is within 2% of the reference's.

Writes OUT (JSON), OUT with .png (CRPS and MAE against evaluations) and the generated files
under --scratch (a rerun resumes them).
"""

import dataclasses
import os
import tempfile
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from harness import (  # noqa: E402
    describe_machine,
    hourly_times,  # noqa: E402
    write_results,
)

from jax_corrdiff.compilation_cache import enable_compilation_cache  # noqa: E402
from jax_corrdiff.console import log_progress_to_stdout  # noqa: E402
from jax_corrdiff.data import demo_data_path  # noqa: E402
from jax_corrdiff.data.inference_inputs import InferenceInputs  # noqa: E402
from jax_corrdiff.data.sources import open_dataset  # noqa: E402
from jax_corrdiff.evaluation import score_dataset  # noqa: E402
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained demo workdir (regression/ and diffusion/ models).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/nfe_skill_demo.json", "Results JSON; the plot is OUT.png.")
_SCRATCH = flags.DEFINE_string("scratch", "", "Directory of the generated files ('' = a folder under the temp dir).")
_EVERY = flags.DEFINE_integer("every_hours", 1, "Score every Nth hour of the period (1 = all of launch/demo.sh's).")
_MEMBERS = flags.DEFINE_integer("members", 8, "Ensemble members.")
_BATCH = flags.DEFINE_integer("batch_size", 6, "Times per compiled call (launch/demo.sh's).")
flags.mark_flag_as_required("workdir")

PERIOD = ("2019-03-19T00", "2019-03-24T05")  # launch/demo.sh --times
EVALUATIONS = (4, 8, 12, 18, 35)
SOLVERS = ("heun", "euler", "dpmpp_2m")
REFERENCE = ("heun", 18)  # the reference's 18-step Heun: 35 evaluations
TOLERANCE = 0.02  # "within 2% of the reference CRPS"


def steps_for(solver: str, evaluations: int) -> int:
    """Steps of ``solver`` with at most ``evaluations`` network evaluations (Heun: 2N - 1)."""
    return (evaluations + 1) // 2 if solver == "heun" else evaluations


def sampler_for(solver: str, steps: int):
    return dataclasses.replace(make_sampler("stochastic", steps=steps), solver=solver)


def run_one(model, inputs, solver: str, steps: int, scratch: str) -> dict:
    """Generate the validation ensemble with one sampler and score it (every target variable)."""
    sampler = sampler_for(solver, steps)
    out = os.path.join(scratch, f"{solver}_{steps}.nc")
    start = time.time()
    generate(model, inputs, out, sampler, members=_MEMBERS.value, seed=0, batch_size=_BATCH.value)
    wall_s = time.time() - start
    with open_dataset(out) as ds:
        fields = score_dataset(ds)["fields"]
    scores = {
        name: {
            "crps": field["models"]["corrdiff"]["aggregate"]["crps"],
            "mae": field["models"]["corrdiff"]["aggregate"]["mae"],
            "regression_mae": field["models"]["regression"]["aggregate"]["mae"],
        }
        for name, field in fields.items()
    }
    print(f"{solver:9s} {steps:3d} steps, {sampler.network_evaluations:3d} evaluations: {scores} ({wall_s:.0f} s)")
    return {
        "solver": solver,
        "steps": steps,
        "evaluations": sampler.network_evaluations,
        "sampler": repr(sampler),
        "wall_s": round(wall_s, 1),
        "scores": scores,
    }


def fewest_within(rows: list[dict], field: str, reference_crps: float) -> dict:
    """Per solver, the fewest evaluations whose CRPS of ``field`` is within TOLERANCE of the reference's."""
    fewest = {}
    for solver in SOLVERS:
        ok = [
            r["evaluations"]
            for r in rows
            if r["solver"] == solver and r["scores"][field]["crps"] <= (1 + TOLERANCE) * reference_crps
        ]
        fewest[solver] = min(ok) if ok else None
    return fewest


def plot(rows: list[dict], field: str, reference_crps: float, path: str, title: str) -> None:
    """CRPS and MAE against evaluations, one line per solver; a value above twice the reference
    row's (a diverged sampler) is drawn at that limit as a triangle, so it does not flatten the rest."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    reference = next(r for r in rows if (r["solver"], r["steps"]) == REFERENCE)["scores"][field]
    for ax, score in zip(axes, ("crps", "mae"), strict=True):
        top = 2 * reference[score]
        for solver in SOLVERS:
            mine = sorted((r for r in rows if r["solver"] == solver), key=lambda r: r["evaluations"])
            x = np.array([r["evaluations"] for r in mine])
            y = np.array([r["scores"][field][score] for r in mine])
            line = ax.plot(x, np.minimum(y, top), "o-", label=solver)[0]
            ax.plot(x[y > top], np.full((y > top).sum(), top), "^", color=line.get_color(), ms=10)
        if score == "crps":
            ax.axhline((1 + TOLERANCE) * reference_crps, color="gray", ls="--", label="Heun-35 CRPS + 2%")
        ax.set_xscale("log")
        ticks = sorted({min(r["evaluations"] for r in rows), *EVALUATIONS})
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("network evaluations per sample")
        ax.set_ylabel(f"{score.upper()} of {field}" + (" (ensemble mean)" if score == "mae" else " (fair)"))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    log_progress_to_stdout()
    scratch = _SCRATCH.value or os.path.join(tempfile.gettempdir(), f"nfe_skill_{os.path.basename(_WORKDIR.value)}")
    os.makedirs(scratch, exist_ok=True)
    enable_compilation_cache(os.path.join(scratch, "compilation_cache"))
    model = CorrDiffModel.load(_WORKDIR.value)
    times = hourly_times(PERIOD, _EVERY.value)
    era5 = demo_data_path("era5_t2m_uk_0p25deg.nc")
    inputs = InferenceInputs.open(model.data_config, era5, coarsen=True, lat=model.lat, lon=model.lon, times=times)
    configs = [REFERENCE] + [
        (s, steps_for(s, e)) for s in SOLVERS for e in EVALUATIONS if (s, steps_for(s, e)) != REFERENCE
    ]
    rows = [run_one(model, inputs, solver, steps, scratch) for solver, steps in configs]
    field = next(iter(rows[0]["scores"]))
    reference_crps = rows[0]["scores"][field]["crps"]
    fewest = fewest_within(rows, field, reference_crps)
    for solver, evaluations in fewest.items():
        print(f"{solver}: fewest evaluations with CRPS within 2% of Heun-35 ({reference_crps:.4f}): {evaluations}")
    write_results(
        _OUT.value,
        {
            "machine": describe_machine(),
            "workdir": os.path.abspath(_WORKDIR.value),
            "times": [times[0], times[-1], len(times)],
            "every_hours": _EVERY.value,
            "members": _MEMBERS.value,
            "field": field,
            "reference": {"solver": REFERENCE[0], "steps": REFERENCE[1], "crps": reference_crps},
            "fewest_evaluations_within_2pct": fewest,
            "rows": rows,
        },
    )
    title = f"demo validation ({len(times)} times, {_MEMBERS.value} members): {field}"
    plot(rows, field, reference_crps, os.path.splitext(_OUT.value)[0] + ".png", title)


if __name__ == "__main__":
    app.run(main)
