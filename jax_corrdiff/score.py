"""Score a generation output: ``python -m jax_corrdiff.score --prediction=OUT.nc --output=DIR``.

Prints the aggregated table and writes DIR/scores.json, DIR/scores.csv and PNG figures
(see ``jax_corrdiff.evaluation``). The file must hold ``*_truth`` variables, i.e. come from
a generation run on coarsened truth.
"""

import os

import xarray as xr
from absl import app, flags

from jax_corrdiff.console import exit_on
from jax_corrdiff.data.sources import open_dataset
from jax_corrdiff.evaluation import EvaluationInputError, format_table, score_dataset, write_report
from jax_corrdiff.evaluation.precipitation import format_precipitation_table, score_precipitation
from jax_corrdiff.evaluation.precipitation_plots import plot_intensity_distribution, plot_precipitation_maps
from jax_corrdiff.evaluation.report import check_time_index, write_json

_PREDICTION = flags.DEFINE_string("prediction", None, "Generation output (NetCDF file or Zarr store).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for scores.json, scores.csv and figures.", required=True)
_VARIABLES = flags.DEFINE_list("variables", None, "Variables to score (default: all with *_truth).")
_TIME_INDEX = flags.DEFINE_integer("time_index", 0, "Index of the time shown in the maps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random tie breaking in the rank histograms.")
_PRECIPITATION = flags.DEFINE_list(
    "precipitation", [], "Precipitation variables: also CSI/ETS/bias/FSS/intensity scores (DIR/precipitation.json)."
)


def open_prediction(path: str) -> xr.Dataset:
    if not os.path.exists(path):
        raise EvaluationInputError(f"prediction file {path!r} does not exist")
    return open_dataset(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on(EvaluationInputError, FileNotFoundError), open_prediction(_PREDICTION.value) as ds:
        check_time_index(ds, _TIME_INDEX.value)
        scores = score_dataset(ds, _VARIABLES.value, seed=_SEED.value)
        print(format_table(scores))
        write_report(scores, ds, _OUTPUT.value, time_index=_TIME_INDEX.value)
        rain = {name: score_precipitation(ds, name) for name in _PRECIPITATION.value}
    for name, results in rain.items():
        print(f"\n{name}:\n{format_precipitation_table(results)}")
    if rain:
        write_json(rain, os.path.join(_OUTPUT.value, "precipitation.json"))
        with open_prediction(_PREDICTION.value) as ds:
            for name in rain:
                stem = os.path.join(_OUTPUT.value, "{}_" + name + ".png")
                plot_precipitation_maps(ds, name, _TIME_INDEX.value, stem.format("rain_maps"))
                plot_intensity_distribution(ds, name, stem.format("intensity"))
    print(f"wrote {_OUTPUT.value}/scores.json, scores.csv and figures")


if __name__ == "__main__":
    app.run(main)
