"""Verification of CorrDiff generation outputs against truth (xarray/numpy only, no JAX).

    scores = score_dataset(xr.open_dataset("out.nc"), variables=["t2m"])
    print(format_table(scores))
    write_report(scores, ds, "eval/")   # scores.json, scores.csv, PNG figures

Scores per variable (and level), per time and aggregated: MAE, RMSE, fair CRPS, spread,
spread-skill ratio, p99 absolute error, rank histogram and power spectra for the CorrDiff
ensemble, and the deterministic scores of the regression mean and the bilinear input; over all
times, the share of truth outside the ensemble (ideal 2 / (M + 1)) and each model's fine-scale
power ratio to the truth.
"""

from jax_corrdiff.evaluation.dataset import EvaluationInputError, score_dataset, score_field, target_variables
from jax_corrdiff.evaluation.report import format_table, write_report

__all__ = ["EvaluationInputError", "format_table", "score_dataset", "score_field", "target_variables", "write_report"]
