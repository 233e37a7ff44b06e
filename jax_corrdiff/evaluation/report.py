"""Write the scores of ``score_dataset``: a text table, scores.json, scores.csv and figures."""

from __future__ import annotations

import csv
import json
import math
import os

import xarray as xr

from jax_corrdiff.evaluation import plots
from jax_corrdiff.evaluation.dataset import (
    CALIBRATION_NAMES,
    SCORE_NAMES,
    TIME_DIM,
    EvaluationInputError,
    completed_times,
)

TABLE_COLUMNS = {
    "mae": "MAE",
    "rmse": "RMSE",
    "crps": "CRPS",
    "spread": "spread",
    "spread_skill_ratio": "SSR",
    "p99_abs_error": "p99 abs err",
    "outside_share": "outside",
    "outside_share_ideal": "(ideal)",
    "fine_power_ratio": "fine power",
}
CSV_COLUMNS = ("variable", "level", "model", "units", *SCORE_NAMES, *CALIBRATION_NAMES, "n_points", "n_times")


def table_rows(scores: dict) -> list[dict]:
    """One row per (variable, level, model) with the aggregated scores; None = not applicable."""
    rows = []
    for field in scores["fields"].values():
        for model, result in field["models"].items():
            rows.append(
                {
                    "variable": field["variable"],
                    "level": field["level"],
                    "model": model,
                    "units": field["units"],
                    **result["aggregate"],
                    "n_points": field["n_points"],
                    "n_times": len(scores["times"]),
                }
            )
    return rows


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(scores: dict) -> str:
    """Fixed-width table: rows variable[@level] x model, columns MAE ... p99 abs err, the share
    of truth outside the ensemble with its ideal 2 / (M + 1), and the fine-scale power ratio
    to the truth (top third of resolved wavenumbers); a last line
    says so when the file is partly written (fewer times scored than it lays out)."""
    header = ["variable", "units", "model", *TABLE_COLUMNS.values()]
    lines = []
    for row in table_rows(scores):
        key = row["variable"] if row["level"] is None else f"{row['variable']}@{row['level']:g}"
        lines.append([key, row["units"], row["model"], *(_cell(row[s]) for s in TABLE_COLUMNS)])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    table = [line(header), line(["-" * w for w in widths]), *map(line, lines)]
    scored, in_file = len(scores["times"]), scores["times_in_file"]
    if scored < in_file:
        table.append(
            f"PARTIAL: {scored} of {in_file} times scored; generation has not finished the other "
            f"{in_file - scored} (rerun generate with the same settings to finish the file)"
        )
    return "\n".join(table)


def _json_ready(value):
    """NaN -> None (JSON has no NaN); containers recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(scores: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_json_ready(scores), f, indent=1, allow_nan=False)


def write_csv(scores: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in table_rows(scores):
            writer.writerow(
                {k: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for k, v in row.items()}
            )


def file_stem(key: str) -> str:
    """'t2m' -> 't2m', 't@500' -> 't_500' (no '@' in file names)."""
    return key.replace("@", "_")


def check_time_index(ds: xr.Dataset, time_index: int) -> None:
    """``time_index`` counts the completed time steps (those scored)."""
    n_times = completed_times(ds).sizes[TIME_DIM]
    if not -n_times <= time_index < n_times:
        raise EvaluationInputError(f"time_index {time_index} out of range for {n_times} completed times")


def write_report(scores: dict, ds: xr.Dataset, output_dir: str, time_index: int = 0) -> list[str]:
    """scores.json, scores.csv and per field maps_/spectra_/rank_histogram_<key>.png in
    ``output_dir`` (created); maps at ``time_index`` of the completed times. Returns the paths written."""
    check_time_index(ds, time_index)
    ds = completed_times(ds)
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "scores.json"), os.path.join(output_dir, "scores.csv")]
    write_json(scores, paths[0])
    write_csv(scores, paths[1])
    for key, field in scores["fields"].items():
        stem = os.path.join(output_dir, "{}_" + file_stem(key) + ".png")
        plots.plot_maps(ds, field, time_index, stem.format("maps"))
        plots.plot_spectra(field, scores["times"], stem.format("spectra"))
        plots.plot_rank_histogram(field, scores["times"], stem.format("rank_histogram"))
        paths += [stem.format(kind) for kind in ("maps", "spectra", "rank_histogram")]
    return paths
