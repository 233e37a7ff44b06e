"""A CPU training step on one JAX device against the same step with its batch split over one
device per core (``jax_corrdiff.cpu_devices``, what ``python -m jax_corrdiff.train`` chooses for
networks under 128 channels).

    python benchmarks/cpu_devices.py [--grid 64] [--width 32|full] [--batch 2]
        [--stages regression,diffusion] [--repeats 5] --out benchmarks/results/cpu_devices_cpu.json
    python benchmarks/cpu_devices.py --workdir /tmp/jax_corrdiff_demo   # a trained run's own steps

The network is the Taiwan architecture of ``speed.py`` at ``--grid`` / ``--width``, or with
``--workdir`` the stages of a trained run (its ``config.json``, data and regression models, at
its batch size). Both programs of a stage are compiled in one process, whose CPU backend is split into one device
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


def _trained_run_steps(config, workdir: str):
    """``build(stage, devices)`` -> (jitted step, state, batch, frozen) of the run in ``workdir``
    with its ``config``."""
    from jax_corrdiff.mesh import to_global
    from jax_corrdiff.training.data_setup import TrainingData, step_batch
    from jax_corrdiff.training.loop import init_state
    from jax_corrdiff.training.stage import build_stage
    from jax_corrdiff.training.steps import make_train_step

    data = TrainingData.open(config, workdir)

    def build(stage_name: str, devices: int):
        config.num_devices = devices
        stage = build_stage(config, stage_name, workdir, data)
        batch = step_batch(next(stage.data.train_iterator(stage.global_batch, seed=0)))
        step = make_train_step(
            stage.loss_fn, stage.optimizer, stage.training, stage.global_batch, stage.seed, stage.mesh
        )
        return step, init_state(stage), to_global(batch, stage.mesh), stage.frozen

    return build


def measure_stage(build, stage: str, split: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    sides = {"one_device": 1, "split": split}
    programs, losses, memory = {}, {}, {}
    for side, devices in sides.items():
        step, state, batch, frozen = build(stage, devices)
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
    harness.add_model_arguments(parser, grid="64", width="32", dtype="float32", batch=2)
    parser.add_argument("--stages", default="regression,diffusion")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workdir", help="a trained run's directory: time its own stages")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    harness.check_choices(parser, "--stages", args.stages, ("regression", "diffusion"))
    harness.parse_width(args.width)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from jax_corrdiff.cpu_devices import per_core_devices, usable_cores

    batches, run = [args.batch], None
    if args.workdir:
        import ml_collections

        with open(os.path.join(args.workdir, "config.json")) as f:
            run = ml_collections.ConfigDict(json.load(f))
        batches = [run[stage].training.batch_size for stage in args.stages.split(",")]
    split = per_core_devices(batches, usable_cores())
    if split == 1:
        raise SystemExit(f"batches {batches} on {usable_cores()} cores: nothing to split")
    import jax

    jax.config.update("jax_num_cpu_devices", split)
    build = (
        _trained_run_steps(run, args.workdir) if args.workdir else lambda stage, n: speed._train_step(args, stage, n)
    )
    results = {"machine": harness.describe_machine(), "settings": vars(args)}
    with jax.default_matmul_precision("highest"):
        for stage in args.stages.split(","):
            results[f"{stage}_step"] = measure_stage(build, stage, split, args)
            print(stage, json.dumps(results[f"{stage}_step"]), flush=True)
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
