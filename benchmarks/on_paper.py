"""CorrDiff at GPU scale on paper: FLOPs and bytes of one sample from XLA's cost analysis.

    python benchmarks/on_paper.py [--grids 448,1056x1792] [--dtype bfloat16]
        --out benchmarks/results/on_paper.json

For each grid it compiles (never runs) one forward of the full-width Taiwan regression UNet and
of the EDM diffusion UNet, and counts one sample as CorrDiff generates it: one regression
evaluation plus the 18-step Heun sampler's 35 diffusion evaluations. The implied time on an
H100 SXM is the larger of compute at 50% of its dense bf16 peak and memory traffic at its HBM
bandwidth (a roofline bound, not a measurement); NVIDIA's hosted CorrDiff service takes 10.31 s
per 1056 x 1792 sample at 18 steps on an H100 (Earth2 NIM documentation). XLA:CPU's bytes are
those of CPU fusion, an upper bound for a GPU's fused kernels. Run ``speed.py`` on a GPU (the
one command in ``launch/gpu_benchmark.sh``) to replace these figures by measurements.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import speed  # noqa: E402

H100 = {"device": "H100 SXM", "bf16_dense_flops_per_s": 989.4e12, "hbm_bytes_per_s": 3.35e12}
USABLE_SHARE_OF_PEAK = 0.5
HOSTED_SERVICE_S = {"1056x1792": 10.31}  # NVIDIA's CorrDiff NIM, H100, 18 steps
HEUN18_DIFFUSION_EVALUATIONS = 35


def sample_cost(grid: str, dtype: str) -> dict:
    """FLOPs and bytes of one regression + 35-evaluation diffusion sample at ``grid``."""
    configs = speed.model_configs(speed.parse_args(["--grid", grid, "--dtype", dtype]))
    regression, diffusion = speed.forward_cost(configs["regression"]), speed.forward_cost(configs["diffusion"])
    total = {
        key: regression[key] + HEUN18_DIFFUSION_EVALUATIONS * diffusion[key] for key in ("flops", "bytes_accessed")
    }
    compute_s = total["flops"] / (USABLE_SHARE_OF_PEAK * H100["bf16_dense_flops_per_s"])
    memory_s = total["bytes_accessed"] / H100["hbm_bytes_per_s"]
    result = {
        "regression_forward": regression,
        "diffusion_forward": diffusion,
        "sample_flops": total["flops"],
        "sample_bytes": total["bytes_accessed"],
        "implied_h100_compute_s": compute_s,
        "implied_h100_memory_s": memory_s,
        "implied_h100_s": max(compute_s, memory_s),
    }
    if grid in HOSTED_SERVICE_S:
        result["hosted_service_s"] = HOSTED_SERVICE_S[grid]
        result["speedup_over_hosted_service"] = HOSTED_SERVICE_S[grid] / result["implied_h100_s"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="448,1056x1792")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    results = {
        "machine": harness.describe_machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": args.dtype,
        "assumed": {**H100, "usable_share_of_peak": USABLE_SHARE_OF_PEAK},
        "grids": {},
    }
    for grid in args.grids.split(","):
        cost = results["grids"][grid] = sample_cost(grid, args.dtype)
        print(
            f"{grid:10s} {cost['sample_flops'] / 1e12:7.1f} TFLOP  {cost['sample_bytes'] / 1e9:8.1f} GB  "
            f"H100 at 50% peak: {cost['implied_h100_s']:.3f} s",
            flush=True,
        )
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
