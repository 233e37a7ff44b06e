"""Where a CorrDiff training step spends its time: single convolutions, ours against PyTorch's.

    python benchmarks/conv_kernels.py [--width full|32] [--physicsnemo-python /work/pnemo-venv/bin/python]
        [--repeats 7] --out benchmarks/results/conv_kernels_cpu.json

A full-width Taiwan training step is almost all convolution (a profile of the 64 x 64, batch 2
regression step puts about 85% of its time in XLA's convolution and matmul kernels), so this
measures the convolutions of the Taiwan UNet one at a time (batch 2, float32, NHWC for XLA,
NCHW for torch): forward, forward + input gradient, forward + kernel gradient, with the FLOP
rate of each (2 * B * H * W * C_in * C_out * k^2 per pass; a gradient row counts its
forward and its backward pass). For the 1x1 convolutions it also
measures them written as a channel matmul, which is how ``models.layers.PointwiseConv`` runs
them. XLA compiles them as a one-device training step would (``compiler_options.
training_step_options(1)``: Eigen's convolutions on x86 CPUs with AVX2). ``--width 32`` takes
the 32-channel network's 3 x 3 shapes instead, each with the number of times one 64 x 64
regression step runs its forward (``per_step``, counted in the step's compiled module; the
backward runs as many input gradients): summed, the step's time in these convolutions' forward
and input gradient passes on either side. Each side runs in its own process after the machine
has been idle (``harness``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# (height, C_in, C_out, kernel) of the Taiwan UNet's convolutions at a 64 x 64 grid, batch 2
SHAPES = [
    (64, 128, 128, 3),
    (64, 256, 128, 3),
    (64, 256, 256, 3),
    (32, 512, 256, 3),
    (16, 256, 256, 3),
    (64, 256, 128, 1),
    (64, 384, 128, 1),
    (32, 512, 256, 1),
]
# (height, C_in, C_out, kernel): forward convolutions per 64 x 64 regression step of the
# 32-channel network (channel multipliers [1, 2, 2, 2, 2]; the up convolutions, 2 x 2 on the
# coarse grid, and the 20 -> 32 and 32 -> 4 end convolutions left out).
SHAPES_32 = {
    (64, 32, 32, 3): 13,
    (64, 64, 32, 3): 4,
    (64, 96, 32, 3): 1,
    (32, 64, 64, 3): 13,
    (32, 128, 64, 3): 4,
    (16, 64, 64, 3): 16,
    (16, 128, 64, 3): 5,
    (8, 64, 64, 3): 16,
    (4, 64, 64, 3): 19,
}
BATCH = 2


def _flops(height: int, c_in: int, c_out: int, kernel: int) -> float:
    return 2.0 * BATCH * height * height * c_in * c_out * kernel * kernel


def _jax_passes(height, c_in, c_out, kernel, as_dot: bool) -> dict:
    """Jitted forward, forward + input gradient and forward + kernel gradient, with inputs."""
    import jax
    import jax.numpy as jnp

    from jax_corrdiff.compiler_options import training_step_options

    def conv(x, w):
        if as_dot:
            return jnp.einsum("bhwi,io->bhwo", x, w[0, 0])
        padding = [(kernel // 2, kernel // 2)] * 2
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (BATCH, height, height, c_in))
    w = jax.random.normal(keys[1], (kernel, kernel, c_in, c_out)) / (kernel * kernel * c_in) ** 0.5

    def loss(x, w):
        return jnp.sum(conv(x, w) ** 2)

    options = training_step_options(1)
    passes = {
        "forward": jax.jit(conv, compiler_options=options),
        "input_grad": jax.jit(jax.grad(loss, argnums=0), compiler_options=options),
        "kernel_grad": jax.jit(jax.grad(loss, argnums=1), compiler_options=options),
    }
    return {name: (lambda f=f: jax.block_until_ready(f(x, w))) for name, f in passes.items()}


def _torch_passes(height, c_in, c_out, kernel) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(BATCH, c_in, height, height)

    def forward():
        with torch.no_grad():
            conv(x)

    def gradient(wrt_input: bool):
        x.requires_grad_(wrt_input)
        conv.weight.requires_grad_(not wrt_input)
        conv(x).square().sum().backward()

    return {"forward": forward, "input_grad": lambda: gradient(True), "kernel_grad": lambda: gradient(False)}


def worker(args) -> None:
    rows = []
    for shape in SHAPES if args.width == "full" else SHAPES_32:
        forms = ["torch"] if args.worker == "torch" else ["xla"] + (["dot"] if shape[3] == 1 else [])
        for form in forms:
            passes = _torch_passes(*shape) if form == "torch" else _jax_passes(*shape, as_dot=form == "dot")
            row = {"shape": shape, "form": form, **({"per_step": SHAPES_32[shape]} if args.width == "32" else {})}
            for name, run in passes.items():
                seconds = harness.timed_repeats(run, 2, args.repeats)["median_s"]
                row[name] = {
                    "median_s": seconds,
                    "gflops": (1 if name == "forward" else 2) * _flops(*shape) / seconds / 1e9,
                }
            rows.append(row)
    harness.emit({"rows": rows})


def _per_step_seconds(rows: list) -> dict:
    """Seconds one 64 x 64 regression step spends in these convolutions: each shape's forward
    + input gradient pass times the number of its convolutions in the step. (Not split into
    the two: a program of one small convolution alone waits for the sleeping thread pool, so
    its forward row overstates what the same convolution takes inside a step.)"""
    return {"forward_and_input_gradient": sum(row["per_step"] * row["input_grad"]["median_s"] for row in rows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--physicsnemo-python", default=os.environ.get("PHYSICSNEMO_PYTHON"))
    parser.add_argument("--width", choices=("full", "32"), default="full")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = [os.path.abspath(__file__), "--width", args.width, "--repeats", str(args.repeats), "--worker"]
    sides = {"jax": harness.run_worker([sys.executable, *command, "jax"], 1800)}
    if args.physicsnemo_python:
        sides["torch"] = harness.run_worker([args.physicsnemo_python, *command, "torch"], 1800)
    for side in sides.values():
        for row in side.get("rows", []):
            rates = "  ".join(f"{name} {row[name]['gflops']:5.0f}" for name in ("forward", "input_grad", "kernel_grad"))
            print(f"{row['form']:5s} {str(row['shape']):22s} GFLOP/s: {rates}")
        if args.width == "32" and side.get("rows"):
            side["per_step_s"] = _per_step_seconds(side["rows"])
            print(f"per 64 x 64 regression step: {side['per_step_s']}")
    results = {
        "machine": harness.describe_machine(),
        "started": started,
        "batch": BATCH,
        "width": args.width,
        "sides": sides,
    }
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
