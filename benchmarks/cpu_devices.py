"""A CPU training step on one JAX device against the same step with its batch split over one
device per core (``jax_corrdiff.cpu_devices``, what ``python -m jax_corrdiff.train`` chooses for
networks under 128 channels).

    python benchmarks/cpu_devices.py [--grid 64] [--width 32|full] [--batch 2]
        [--stages regression,diffusion] [--repeats 5] --out benchmarks/results/cpu_devices_cpu.json

Both programs of a stage are compiled in one process, whose CPU backend is split into one device
per core (as many as divide the batch), and timed in turn, one call of each per repeat after
warm-up, so a machine whose speed drifts slows both alike. Each row gives the median and min
seconds of both, ``split_over_one`` (the ratio of medians), each side's first loss (the same
batch and initial state: they agree to float rounding) and XLA's memory plan per device (the
split holds a replica of the training state on every device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import speed  # noqa: E402


def measure_stage(args, stage: str, split: int) -> dict:
    import jax
    import jax.numpy as jnp

    sides = {"one_device": 1, "split": split}
    programs, losses, memory = {}, {}, {}
    for side, devices in sides.items():
        step, state, batch, frozen = speed._train_step(args, stage, devices)
        compiled = step.lower(state, batch, frozen).compile()
        memory[side] = speed._compiled_stats(compiled)
        # The state is donated: each side steps its own copy.
        programs[side] = [compiled, jax.tree_util.tree_map(jnp.copy, state), batch, frozen]

    def call(side):
        compiled, state, batch, frozen = programs[side]
        programs[side][1], metrics = compiled(state, batch, frozen)
        losses.setdefault(side, float(metrics["loss"]))

    load = harness.wait_for_idle()
    timing = harness.alternate({side: lambda s=side: call(s) for side in sides}, args.warmup, args.repeats)
    ratio = timing["split"]["median_s"] / timing["one_device"]["median_s"]
    return {**timing, "split_over_one": ratio, "devices": sides, "first_loss": losses, "memory": memory, "load": load}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="64")
    parser.add_argument("--width", default="32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stages", default="regression,diffusion")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.stages.split(",")) - {"regression", "diffusion"})
    if unknown:
        parser.error(f"--stages: unknown {unknown}")
    harness.parse_width(args.width)
    # speed.py's model and training-step builders read these.
    args.dtype, args.remat = "float32", "none"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from jax_corrdiff.cpu_devices import per_core_devices, usable_cores

    split = per_core_devices([args.batch], usable_cores())
    if split == 1:
        raise SystemExit(f"batch {args.batch} on {usable_cores()} cores: nothing to split")
    import jax

    jax.config.update("jax_num_cpu_devices", split)
    results = {"machine": harness.describe_machine(), "settings": vars(args)}
    with jax.default_matmul_precision("highest"):
        for stage in args.stages.split(","):
            results[f"{stage}_step"] = measure_stage(args, stage, split)
            print(stage, json.dumps(results[f"{stage}_step"]), flush=True)
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
