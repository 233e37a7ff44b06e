"""Our exported CorrDiff package run by NVIDIA's Earth2Studio, against our own generation from it.

    python benchmarks/earth2studio_check.py [--workdir DIR] [--members 16]
        [--earth2studio-python /work/pnemo-venv/bin/python] --out benchmarks/results/earth2studio_check.json

Needs torch, PhysicsNeMo 2.2.2 and Earth2Studio 0.19.0 in a second environment
(tests/fixtures/README.md); never CI, and torch never enters a jax_corrdiff process. Without
``--workdir`` it trains the demo smoke model on the demo data cropped to 32 x 48 (PhysicsNeMo's
UNet does not pad) with latitudes reversed to run south to north (Earth2Studio 0.19 refuses
decreasing 1-D latitudes). Then: export the package (``write_package``); make one coarse input
on the input grid Earth2Studio builds from the package (the truth block-averaged by the
training factor, bilinearly interpolated, constant beyond the outermost coarse cells); generate
``--members`` members and the regression mean with Earth2Studio's
``CorrDiff.load_model(Package(DIR))`` and with our ``generate`` from the same package, both
with 18 Heun steps. The regression means should agree to float32
round-off plus interpolation edge effects; the members come from different noise generators, so
the ensembles can only agree statistically: their means to within sampling noise
(sqrt(2 / M) x spread) and their spreads to within a few times 1 / sqrt(2 (M - 1)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")
TIME = "2019-03-22T00"


def _earth2studio(args, *worker_args) -> dict:
    """Run this script as an Earth2Studio worker and return its result (no idle wait: nothing is timed)."""
    command = [args.earth2studio_python, os.path.abspath(__file__), "--worker", *worker_args]
    result = harness.run_command(command, timeout=3600)
    if "error" in result:
        raise SystemExit(f"Earth2Studio worker failed: {json.dumps(result, indent=1)}")
    return result


def _load_e2s(package: str):
    sys.path.insert(0, FIXTURES)
    import make_physicsnemo_fixtures as fixtures

    fixtures.torchvision_workaround()
    from earth2studio.models.auto import Package
    from earth2studio.models.dx.corrdiff import CorrDiff

    return CorrDiff.load_model(Package(package), device="cpu")


def worker(job: str, package: str, arrays: str, members: int) -> None:
    """``grid``: Earth2Studio's input grid for the package; ``run``: its regression mean and members."""
    from collections import OrderedDict

    import torch

    model = _load_e2s(package)
    if model.lat_output_grid.ndim == 1:
        # Earth2Studio 0.19 validates a regular 1-D output grid (and refuses a rectilinear 2-D
        # one), then its regular-grid interpolation unpacks the output grid as 2-D and fails:
        # hand that interpolation the meshgrid it expects. The package itself stays as written.
        lat, lon = torch.meshgrid(model.lat_output_grid, model.lon_output_grid, indexing="ij")
        model.lat_output_grid, model.lon_output_grid = lat, lon
    if job == "grid":
        return harness.emit({"lat": model.lat_input_numpy.tolist(), "lon": model.lon_input_numpy.tolist()})
    x = torch.as_tensor(np.load(arrays)["coarse"])[None]  # (batch, variable, lat, lon)
    coords = OrderedDict(batch=np.zeros(1), **{k: v for k, v in model.input_coords().items() if k != "batch"})
    outputs = {}
    for mode, samples in (("regression", 1), ("both", members)):
        model.inference_mode, model.number_of_samples, model.seed = mode, samples, 0
        with torch.no_grad():
            outputs[mode] = model(x, coords)[0][0].numpy()  # (sample, variable, lat, lon)
    np.savez(arrays.replace(".npz", "_e2s.npz"), regression=outputs["regression"][0], members=outputs["both"])
    harness.emit({"saved": arrays.replace(".npz", "_e2s.npz")})


def train_south_to_north_smoke(root: str) -> str:
    """The demo smoke model on the demo data cropped to 32 x 48 and flipped south to north."""
    import xarray as xr

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "configs"))
    import demo

    from jax_corrdiff.config import set_stages
    from jax_corrdiff.data import demo_data_path
    from jax_corrdiff.training.loop import train_and_evaluate

    for name in ("era5_t2m_uk_0p25deg.nc", "static_era5_uk_0p25deg.nc"):
        with xr.open_dataset(demo_data_path(name)) as ds:
            ds.isel(lat=slice(31, None, -1), lon=slice(0, 48)).load().to_netcdf(os.path.join(root, name))
    config = set_stages(demo.get_config("smoke"), training=dict(total_samples=4 * 40, eval_batches=1))
    config.data.target_paths = [os.path.join(root, "era5_t2m_uk_0p25deg.nc")]
    config.data.static_path = os.path.join(root, "static_era5_uk_0p25deg.nc")
    workdir = os.path.join(root, "workdir")
    train_and_evaluate(config, workdir)
    return workdir


def coarse_input(truth_path: str, factor: int, grid: dict, path: str) -> np.ndarray:
    """The truth at TIME block-averaged by the training factor, interpolated onto ``grid``; a
    NetCDF file of it at ``path`` for our generate, and the (variable, lat, lon) array."""
    import xarray as xr

    from jax_corrdiff.data.regrid import block_average

    with xr.open_dataset(truth_path) as ds:
        fine = ds["t2m"].sel(time=TIME).load()
    coarse = block_average(fine.values[None, ..., None], factor)[0, ..., 0]
    lat = fine["lat"].values[: coarse.shape[0] * factor].reshape(-1, factor).mean(1)
    lon = fine["lon"].values[: coarse.shape[1] * factor].reshape(-1, factor).mean(1)
    field = xr.DataArray(coarse, coords={"lat": lat, "lon": lon}, dims=("lat", "lon"))
    on_grid = field.interp(lat=grid["lat"], lon=grid["lon"])  # NaN outside the coarse cell centres
    on_grid = on_grid.bfill("lat").ffill("lat").bfill("lon").ffill("lon")  # constant beyond them
    ds = on_grid.expand_dims(time=[np.datetime64(TIME, "ns")]).to_dataset(name="t2m")
    ds["t2m"].attrs["units"] = "K"
    ds.to_netcdf(path)
    return on_grid.values[None].astype(np.float32)


def compare(ours, theirs: dict, truth_std: float) -> dict:
    """Figures in kelvin: regression means, ensemble means and spreads, against sampling noise."""
    mean_ours, members_ours = ours["t2m_regression"].values[0], ours["t2m"].values[0]
    mean_theirs, members_theirs = theirs["regression"][0], theirs["members"][:, 0]
    m = members_ours.shape[0]
    spread = float(np.sqrt(0.5 * (members_ours.var(0, ddof=1).mean() + members_theirs.var(0, ddof=1).mean())))
    return {
        "members": m,
        "truth_std_k": truth_std,
        "regression_max_abs_diff_k": float(np.abs(mean_ours - mean_theirs).max()),
        "regression_rms_diff_k": float(np.sqrt(np.mean((mean_ours - mean_theirs) ** 2))),
        "regression_interior_max_abs_diff_k": float(np.abs(mean_ours - mean_theirs)[2:-2, 2:-2].max()),
        "ensemble_mean_rms_diff_k": float(np.sqrt(np.mean((members_ours.mean(0) - members_theirs.mean(0)) ** 2))),
        "expected_ensemble_mean_rms_diff_k": spread * float(np.sqrt(2.0 / m)),
        "spread_ours_k": float(np.sqrt(members_ours.var(0, ddof=1).mean())),
        "spread_earth2studio_k": float(np.sqrt(members_theirs.var(0, ddof=1).mean())),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="trained workdir (default: train the south-to-north demo smoke model)")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument(
        "--earth2studio-python", default=os.environ.get("PHYSICSNEMO_PYTHON", "/work/pnemo-venv/bin/python")
    )
    parser.add_argument("--out")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job, package, arrays, members = args.worker
        return worker(job, package, arrays, int(members))
    import xarray as xr

    from jax_corrdiff.data.inference_inputs import InferenceInputs
    from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
    from jax_corrdiff.interop.e2s_package import load_package, write_package

    root = tempfile.mkdtemp(prefix="e2s_check_")
    workdir = args.workdir or train_south_to_north_smoke(root)
    source = CorrDiffModel.load(workdir).data_config
    truth_path, factor = source["target_paths"][0], int(source["coarsen_factor"])
    package = os.path.join(root, "package")
    write_package(workdir, package)
    model, _ = load_package(package)
    grid = _earth2studio(args, "grid", package, "-", str(args.members))
    arrays, coarse_file = os.path.join(root, "inputs.npz"), os.path.join(root, "coarse.nc")
    np.savez(arrays, coarse=coarse_input(truth_path, factor, grid, coarse_file))
    theirs = np.load(_earth2studio(args, "run", package, arrays, str(args.members))["saved"])
    inputs = InferenceInputs.open(model.data_config, coarse_file, coarsen=False, lat=model.lat, lon=model.lon)
    output = os.path.join(root, "ours.nc")
    generate(model, inputs, output, make_sampler("stochastic"), members=args.members, seed=0, num_devices=1)
    with xr.open_dataset(output) as ours, xr.open_dataset(truth_path) as truth:
        figures = compare(ours.load(), theirs, float(truth["t2m"].std()))
    print(json.dumps(figures, indent=1))
    if args.out:
        harness.write_results(args.out, {"machine": harness.describe_machine(), "workdir": workdir, **figures})


if __name__ == "__main__":
    main()
