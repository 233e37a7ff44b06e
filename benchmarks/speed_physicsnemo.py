"""jax_corrdiff against PhysicsNeMo, side by side: the same rows as ``speed.py`` on the same shapes.

    python benchmarks/speed_physicsnemo.py [--physicsnemo-python /work/pnemo-venv/bin/python]
        [--grid 64] [--width full] [--dtype float32|bfloat16] [--batch 2]
        [--only regression_step,diffusion_step,...] [--repeats 5] [--rounds 1]
        --out benchmarks/results/vs_physicsnemo_cpu.json

For every row it runs our measurement (a ``speed.py`` worker) and PhysicsNeMo's (this script as
a worker under the PhysicsNeMo environment's Python: torch never enters a jax_corrdiff process),
each in a fresh process after the machine has been idle (``harness.run_worker``), ``--rounds``
times with the order alternating, and prints ours / theirs per round and its median.
PhysicsNeMo 2.2.2 on torch's CPU build is installed as ``tests/fixtures/README.md`` describes; it
is never a package dependency.

PhysicsNeMo's side is what its CorrDiff training and generation run: ``RegressionLoss`` /
``ResidualLoss`` (hr-mean conditioning, frozen regression UNet) with Adam and an EMA copy, in
train mode (dropout 0.13); one sample is the regression forward plus ``stochastic_sampler``
(18-step Heun, sigma_max 800) or ``deterministic_sampler`` (8-step Euler, sigma_max 80). It
runs on the GPU when torch sees one (with cuDNN autotuning, ``cudnn.benchmark``),
else on the CPU with all cores (``torch.set_num_threads``). ``--dtype bfloat16`` is PhysicsNeMo's
``amp-bf16`` recipe: networks built with ``amp_mode=True``, loss and network evaluations under
``torch.autocast`` in bfloat16, float32 parameters and Adam (on CUDA only: PhysicsNeMo's output
dtype check reads CUDA's autocast state); our side then computes in bfloat16 with float32
parameters (``compute_dtype``). The architectures are the fixture script's Taiwan
recipes (``regression_unet_posembd_sin4``, ``edm_posembd_sin4_hrmean``) at our width and grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import speed  # noqa: E402

ROWS = ("regression_step", "diffusion_step", "sample_heun18", "sample_euler8")
FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")


def _torch_device():
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count())
    return torch.device("cpu")


def _autocast(args, device):
    """PhysicsNeMo's mixed precision for ``--dtype bfloat16``, a no-op context for float32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_models(args, device):
    """(regression UNet, EDM denoiser, physicsnemo namespace) at ``args``' grid, width and dtype."""
    sys.path.insert(0, FIXTURES)
    import make_physicsnemo_fixtures as fixtures
    import torch

    pn = fixtures.import_physicsnemo()
    profile = fixtures.profile_config("taiwan")
    height, width = harness.parse_grid(args.grid)
    profile.update(img_resolution=[height, width], model_channels=harness.parse_width(args.width))
    profile["attn_resolutions"] = [height >> (len(profile["channel_mult"]) - 1)]
    recipes = fixtures.model_recipes(profile)
    amp = dict(amp_mode=args.dtype == "bfloat16")
    torch.manual_seed(0)
    regression = pn["CorrDiffRegressionUNet"](**recipes["regression_unet_posembd_sin4"]["kwargs"], **amp)
    diffusion = pn["EDMPrecondSuperResolution"](**recipes["edm_posembd_sin4_hrmean"]["kwargs"], **amp)
    return regression.to(device), diffusion.to(device), pn


def _torch_train_step(args, stage: str, device):
    """A closure running one PhysicsNeMo training step (loss, backward, Adam, EMA)."""
    import copy

    regression, diffusion, _ = _torch_models(args, device)  # first: it makes torchvision importable
    import torch
    from physicsnemo.diffusion.metrics import RegressionLoss, ResidualLoss

    height, width = harness.parse_grid(args.grid)
    img_clean = torch.randn(args.batch, speed.OUT_CHANNELS, height, width, device=device)
    img_lr = torch.randn(args.batch, speed.IN_CHANNELS, height, width, device=device)
    if stage == "regression":
        net, loss_fn = regression, RegressionLoss()
    else:
        regression.eval().requires_grad_(False)
        net, loss_fn = diffusion, ResidualLoss(regression, hr_mean_conditioning=True)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(args, device):
            loss = loss_fn(net, img_clean, img_lr).sum() / args.batch
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1e-3)
        _synchronize(device)

    return step


def _torch_sample(args, solver: str, device):
    """A closure drawing one CorrDiff sample (regression mean + residual) at batch 1."""
    import torch

    regression, diffusion, pn = _torch_models(args, device)
    regression.eval(), diffusion.eval()
    height, width = harness.parse_grid(args.grid)
    img_lr = torch.randn(1, speed.IN_CHANNELS, height, width, device=device)

    @torch.no_grad()
    def sample():
        with _autocast(args, device):
            mean = regression(torch.zeros(1, speed.OUT_CHANNELS, height, width, device=device), img_lr)
            latents = torch.randn(1, speed.OUT_CHANNELS, height, width, device=device)
            if solver == "heun":
                residual = pn["stochastic_sampler"](diffusion, latents, img_lr, mean_hr=mean, num_steps=18)
            else:
                residual = pn["deterministic_sampler"](
                    diffusion, latents, img_lr, mean_hr=mean, num_steps=8, sigma_max=80.0, solver="euler"
                )
        drawn = mean + residual
        _synchronize(device)
        return drawn

    return sample


def torch_worker(args) -> None:
    import torch

    device = _torch_device()
    if args.worker in ("regression_step", "diffusion_step"):
        run = _torch_train_step(args, args.worker.split("_")[0], device)
        batch = args.batch
    else:
        run = _torch_sample(args, "heun" if args.worker == "sample_heun18" else "euler", device)
        batch = 1
    peak_before = harness.start_running_peak()
    timing = harness.timed_repeats(run, args.warmup, args.repeats)
    if device.type == "cuda":
        memory = {"device_peak_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
    else:
        memory = harness.rss_after_running(peak_before)
    harness.emit(
        {
            **timing,
            "samples_per_s": batch / timing["median_s"],
            **memory,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )


RATIO_KEYS = ("median_s", "min_s", "device_peak_bytes", "peak_rss_bytes", "running_peak_rss_bytes")


def _ratio(ours: dict, theirs: dict, key: str) -> float | None:
    if key in ours and key in theirs:
        return ours[key] / theirs[key]
    return None


def measure_row(run_ours, run_theirs, rounds: int) -> dict:
    """``rounds`` pairs of measurements of one row, ours first in even rounds and theirs first in
    odd ones, each pair's ratios (ours / theirs; below 1 = we are faster) and their medians.

    This VM's speed drifts by tens of percent over minutes (one full-width step took 2.2-3.7 s
    across one day's sittings), so a single pair's ratio carries that drift; a ratio per adjacent
    pair, alternating which side runs first, cancels a steady drift and shows the rest as the
    spread of the rounds."""
    ours, theirs = [], []
    for round_index in range(rounds):
        if round_index % 2 == 0:
            ours.append(run_ours())
            theirs.append(run_theirs())
        else:
            theirs.append(run_theirs())
            ours.append(run_ours())
    per_round = {key: [_ratio(a, b, key) for a, b in zip(ours, theirs)] for key in RATIO_KEYS}
    per_round = {key: values for key, values in per_round.items() if None not in values}
    return {
        "ours": ours,
        "physicsnemo": theirs,
        "ours_over_theirs": {key: statistics.median(values) for key, values in per_round.items()},
        "ours_over_theirs_per_round": per_round,
    }


def compare(args) -> dict:
    """Every row: ``measure_row`` with ``args.rounds`` rounds of ours and theirs, each in a fresh
    process after an idle machine."""
    shape = ["--grid", args.grid, "--width", args.width, "--dtype", args.dtype, "--batch", str(args.batch)]
    ours_args = speed.parse_args(shape)
    ours_args.repeats, ours_args.warmup = args.repeats, args.warmup
    theirs_command = [args.physicsnemo_python, os.path.abspath(__file__), *shape]
    theirs_command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    rows = {}
    for row in args.only.split(","):
        print(f"measuring {row} ...", flush=True)
        rows[row] = measure_row(
            lambda row=row: harness.run_worker(speed._worker_command(ours_args, row), args.timeout),
            lambda row=row: harness.run_worker([*theirs_command, "--worker", row], args.timeout),
            args.rounds,
        )
        per_round = rows[row]["ours_over_theirs_per_round"].get("median_s", [])
        print(
            f"{row:16s} ours {[run.get('median_s') for run in rows[row]['ours']]} s  physicsnemo "
            f"{[run.get('median_s') for run in rows[row]['physicsnemo']]} s  ratio per round {per_round}, "
            f"median {rows[row]['ours_over_theirs'].get('median_s')}",
            flush=True,
        )
        print(json.dumps(rows[row]), flush=True)  # the whole row, in case a later one never ends
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--physicsnemo-python", default=os.environ.get("PHYSICSNEMO_PYTHON", "/work/pnemo-venv/bin/python")
    )
    parser.add_argument("--grid", default="64")
    parser.add_argument("--width", default="full")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {ROWS}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs per row, alternating which goes first")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    harness.check_choices(parser, "--only", args.only, ROWS)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return torch_worker(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    settings = {k: getattr(args, k) for k in ("grid", "width", "dtype", "batch", "repeats", "warmup", "rounds")}
    results = {"machine": harness.describe_machine(), "started": started, "settings": settings, "rows": compare(args)}
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
