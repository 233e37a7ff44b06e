"""XLA:CPU's two convolution paths side by side: YNNPACK (XLA's default) against Eigen
(``compiler_options.EIGEN_CONVOLUTIONS``, which every program without weight gradients uses, and
training steps on one device of an x86 CPU).

    python benchmarks/conv_library.py [--grid 64] [--width 32|full] [--repeats 5] [--profile]
        [--only convolutions,sample_heun18,forward_input_grad,regression_step,diffusion_step]
        --out benchmarks/results/conv_library_cpu.json

Each program is compiled both ways in one process and the two are timed in turn, one call of
each per repeat after warm-up, so a machine whose speed drifts slows both alike. Rows:

- ``convolutions``: one 3 x 3 convolution forward at the UNet's channel counts (C -> C at the
  full grid and 2C -> 2C at half of it, batch 2), GFLOP/s;
- ``sample_heun18``: generation's program (``speed.sample_program``), with the outputs' largest
  difference;
- ``forward_input_grad``: one diffusion-network evaluation and the gradient of its squared
  output with respect to its input, as posterior guidance evaluates it;
- ``regression_step``, ``diffusion_step``: the training step on this process's devices (one
  unless ``JAX_NUM_CPU_DEVICES`` says otherwise), with each side's loss.

``--profile`` adds a ``jax.profiler`` trace of the regression step with XLA's defaults: how long
0, 1 or 2 of XLA's worker threads were running a kernel during one step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import speed  # noqa: E402

SIDES = ("ynnpack", "eigen")


def _compile_both(lowered) -> dict:
    """``lowered`` compiled with XLA's defaults (YNNPACK) and with Eigen's convolutions, whatever
    options its ``jax.jit`` chose (those of ``compile`` replace them)."""
    from jax_corrdiff.compiler_options import EIGEN_CONVOLUTIONS, YNNPACK_CONVOLUTIONS

    options = {"ynnpack": YNNPACK_CONVOLUTIONS, "eigen": EIGEN_CONVOLUTIONS}
    return {side: lowered.compile(compiler_options=options[side]) for side in SIDES}


def _alternate(calls: dict, warmup: int, repeats: int) -> dict:
    result = harness.alternate(calls, warmup, repeats)
    result["eigen_over_ynnpack"] = result["eigen"]["median_s"] / result["ynnpack"]["median_s"]
    return result


def _timed_program(fn, inputs, args) -> tuple[dict, dict]:
    """(timings, each side's outputs) of ``fn(*inputs)`` compiled both ways."""
    import jax

    compiled = _compile_both(jax.jit(fn).lower(*inputs))
    outputs = {side: jax.block_until_ready(compiled[side](*inputs)) for side in SIDES}
    calls = {side: lambda c=compiled[side]: jax.block_until_ready(c(*inputs)) for side in SIDES}
    return _alternate(calls, args.warmup, args.repeats), outputs


def _largest_difference(outputs: dict) -> float:
    import jax
    import numpy as np

    pairs = zip(jax.tree_util.tree_leaves(outputs["ynnpack"]), jax.tree_util.tree_leaves(outputs["eigen"]))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)


def measure_convolutions(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    height, _ = harness.parse_grid(args.grid)
    channels = harness.parse_width(args.width)
    rows = {}
    for size, c in ((height, channels), (height // 2, 2 * channels)):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, size, size, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c, c)), jnp.float32)

        def convolve(x, kernel):
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        timing, _ = _timed_program(convolve, (x, kernel), args)
        flops = 2 * 2 * size * size * c * c * 9
        for side in SIDES:
            timing[side]["gflop_per_s"] = flops / timing[side]["min_s"] / 1e9
        rows[f"{size}x{size}, {c} -> {c}"] = timing
    return rows


def measure_sample(args) -> dict:
    sample, inputs, _, _ = speed.sample_program(args, "heun")
    timing, outputs = _timed_program(sample, inputs, args)
    return {**timing, "largest_difference": _largest_difference(outputs)}


def measure_forward_input_grad(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_corrdiff.models.factory import build_model, example_inputs, init_variables

    config = speed.model_configs(args)["diffusion"]
    model = build_model(config)
    variables = init_variables(config, jax.random.key(2))
    example_args, kwargs = example_inputs(config)

    def evaluate(variables, x, *rest):
        def squared(x):
            return jnp.sum(model.apply(variables, x, *rest, **kwargs) ** 2)

        return jax.value_and_grad(squared)(x)

    timing, outputs = _timed_program(evaluate, (variables, *example_args), args)
    return {**timing, "largest_difference": _largest_difference(outputs)}


def measure_train_step(args, stage: str) -> dict:
    import jax
    import jax.numpy as jnp

    step, state, batch, frozen = speed._train_step(args, stage)
    compiled = _compile_both(step.lower(state, batch, frozen))
    # The state is donated: each side steps its own copy.
    states = {side: jax.tree_util.tree_map(jnp.copy, state) for side in SIDES}
    losses = {}

    def call(side):
        states[side], metrics = compiled[side](states[side], batch, frozen)
        losses[side] = float(metrics["loss"])

    timing = _alternate({side: lambda s=side: call(s) for side in SIDES}, args.warmup, args.repeats)
    return {**timing, "loss": losses}


def profile_regression_step(args) -> dict:
    """Time during one default-compiled regression step at which 0, 1 or 2 of XLA's worker
    threads were inside a kernel, from a ``jax.profiler`` trace."""
    step, state, batch, frozen = speed._train_step(args, "regression")
    compiled = step.lower(state, batch, frozen).compile()
    call = speed.stepping(compiled, state, batch, frozen)
    for _ in range(2):
        call()
    events, window = harness.trace_calls(call)
    return {"step_ms": (window[1] - window[0]) / 1e3, "ms_with_workers_busy": harness.worker_occupancy(events, window)}


MEASUREMENTS = {
    "convolutions": measure_convolutions,
    "sample_heun18": measure_sample,
    "forward_input_grad": measure_forward_input_grad,
    "regression_step": lambda args: measure_train_step(args, "regression"),
    "diffusion_step": lambda args: measure_train_step(args, "diffusion"),
}
ROWS = tuple(MEASUREMENTS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, grid="64", width="32", dtype="float32", batch=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {ROWS}")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    harness.check_choices(parser, "--only", args.only, ROWS)
    return args


def main(argv=None) -> None:
    import jax

    args = parse_args(argv)
    results = {"machine": harness.describe_machine(), "load": harness.wait_for_idle(), "settings": vars(args)}
    rows = {name: MEASUREMENTS[name] for name in args.only.split(",")}
    if args.profile:
        rows["regression_step_profile"] = profile_regression_step
    with jax.default_matmul_precision("highest"):
        for name, measure in rows.items():
            results[name] = measure(args)
            print(name, json.dumps(results[name]), flush=True)
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
