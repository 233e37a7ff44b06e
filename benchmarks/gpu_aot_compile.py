"""Compile CorrDiff's programs for a GPU on a machine without one: XLA:GPU's deviceless
ahead-of-time compilation, to know before a GPU is lent that every GPU code path compiles, and
what XLA:GPU's compile costs without its autotuner (which needs the device).

    pip install -e ".[cuda12]"     # an environment of its own: the CUDA plugin, no GPU needed
    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/gpu_aot_compile.py \\
        [--grid 448] [--width full] [--dtype bfloat16] [--batch 8] [--remat none|dots|full] \\
        [--mean precomputed|in_step] \\
        [--programs regression_step,diffusion_step,sample_heun18] [--devices 1] [--xla-defaults] \\
        [--model taiwan|china3km] \\
        --out benchmarks/results/gpu_aot_compile_h100.json

The target is an H100 (``TARGETS``: XLA's GPU target description; compute capability, memory,
cuDNN and CUDA versions; no autotuning without the device, so every fusion gets XLA's default
tiling). Each program is traced as on the GPU (``compiler_options.compiling_for("gpu")``: XLA's
convolutions, our GPU compiler options) from shapes alone, then compiled, each in its own process
under ``--timeout``: lowering and compile seconds, the optimised module's size and XLA's memory
plan, the kernels it launches and the bytes they read and write (``hlo_traffic.py``; for a
sample also per step of its sampling loop), or the compiler's error. ``--xla-defaults``
compiles the training steps with XLA's own matmul settings (Triton GEMM fusions) instead of
``training_step_options``'. ``--devices N``
splits the training steps' batch over N GPUs of one host, their gradients all-reduced as in a
cluster job (``XLA_FLAGS``, e.g. ``launch/xla_flags.sh``'s, apply). ``--model china3km``
compiles China 3 km CorrDiff's training steps instead (``configs/china3km.py``: 34 channels,
lead times, global residual, a 100-channel learnable position grid, 16 patches of 448 x 448 per
image) on a ``--grid`` domain, e.g. ``--grid 1664x2496 --batch 1`` for its 1670 x 2500 points.
The diffusion steps read the regression mean with the batch, as training does; ``--mean in_step``
runs the frozen regression network on the whole image in the step instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import harness  # noqa: E402
import hlo_traffic  # noqa: E402
import speed  # noqa: E402

PROGRAMS = ("regression_step", "diffusion_step", "sample_heun18")
# XLA's GPU target descriptions (``stream_executor::GpuTargetConfigProto``), as a device reports them.
TARGETS = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
# What XLA compiles the training steps' matmuls with when not told otherwise.
XLA_DEFAULT_MATMULS = {"xla_gpu_enable_triton_gemm": True}


def _train_lowered(args, stage: str, mesh):
    import jax

    from jax_corrdiff.mesh import batch_sharded, placed_shapes, replicated
    from jax_corrdiff.training.steps import train_state_shapes

    step, init, batch, frozen_init = speed.train_program(args, stage, mesh)
    frozen = placed_shapes(jax.eval_shape(frozen_init), replicated(mesh)) if frozen_init else {}
    return step.lower(train_state_shapes(init, mesh), placed_shapes(batch, batch_sharded(mesh)), frozen)


def _china3km_lowered(args, stage: str, mesh):
    """China 3 km CorrDiff's training step of ``stage`` (``configs/china3km.py``, built as
    ``training.stage.build_stage`` builds it) on a ``--grid`` domain: its channels, lead times
    and static fields come from the config's variable lists instead of its data."""
    import types

    import china3km
    import jax
    import numpy as np

    from jax_corrdiff.diffusion.residual_mean import PrecomputedMean
    from jax_corrdiff.mesh import batch_sharded, placed_shapes, replicated
    from jax_corrdiff.models.factory import build_model, init_variables
    from jax_corrdiff.training.stage import conditioning_layout, model_config
    from jax_corrdiff.training.steps import diffusion_per_sample_loss, regression_per_sample_loss, train_state_shapes

    config = china3km.get_config()
    config[stage].model.unet.remat = args.remat
    channels = types.SimpleNamespace(
        target_channels=list(config.data.target_variables),
        input_channels=list(config.data.input_variables),
        static_channels=list(config.data.static_variables),
    )
    data = types.SimpleNamespace(normalizer=channels, lead_time_steps=len(config.data.lead_times))
    grid = harness.parse_grid(args.grid)
    layout = conditioning_layout(config, stage, data)
    net_config = model_config(config, stage, layout, grid)
    regression_config = model_config(config, "regression", conditioning_layout(config, "regression", data), grid)
    model = build_model(net_config)
    images = (args.batch, *grid)
    batch = {
        "target": jax.ShapeDtypeStruct((*images, len(channels.target_channels)), np.float32),
        "img_lr": jax.ShapeDtypeStruct(
            (*images, len(channels.input_channels) + len(channels.static_channels)), np.float32
        ),
        "lead_time_label": jax.ShapeDtypeStruct((args.batch,), np.int32),
    }
    frozen = {}
    if stage == "regression":
        loss_fn = regression_per_sample_loss(model)
    else:
        if args.mean == "precomputed":
            mean = PrecomputedMean()
            batch["regression_mean"] = batch["target"]
        else:
            mean = build_model(regression_config)
            variables = jax.eval_shape(lambda: init_variables(regression_config, jax.random.key(1)))
            frozen = placed_shapes(variables, replicated(mesh))
        loss = config.diffusion.loss
        loss_fn = diffusion_per_sample_loss(
            model, mean, layout, p_mean=loss.p_mean, p_std=loss.p_std, sigma_data=config.diffusion.model.sigma_data
        )
    step, init = speed.step_and_init(model, net_config, loss_fn, config[stage].training, args.batch, mesh)
    return step.lower(train_state_shapes(init, mesh), placed_shapes(batch, batch_sharded(mesh)), frozen)


def _sample_lowered(args, mesh):
    import jax

    from jax_corrdiff.mesh import placed_shapes, replicated

    built = {}

    def inputs():
        built["sample"], inputs, _, _ = speed.sample_program(args, "heun")
        return inputs

    shapes = placed_shapes(jax.eval_shape(inputs), replicated(mesh))  # the variables, never initialised
    return speed.jit_as_generation(built["sample"]).lower(*shapes)


def compile_program(args) -> dict:
    """Trace, lower and compile ``args.worker`` for ``args.target`` without its device."""
    import jax
    from jax.experimental import topologies

    from jax_corrdiff.compiler_options import compiling_for
    from jax_corrdiff.mesh import DATA_AXIS

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=TARGETS[args.target], topology=f"1x1x{args.devices}"
    )
    # Training splits its batch over every GPU (``mesh.DATA_AXIS``); the sample runs on one.
    devices = topology.devices[:1] if args.worker == "sample_heun18" else topology.devices
    mesh = jax.sharding.Mesh(devices, (DATA_AXIS,))
    start = time.perf_counter()
    precision = "highest" if args.dtype == "float32" else "default"
    with compiling_for("gpu"), jax.default_matmul_precision(precision):
        if args.worker == "sample_heun18":
            lowered = _sample_lowered(args, mesh)
        elif args.model == "china3km":
            lowered = _china3km_lowered(args, args.worker.split("_")[0], mesh)
        else:
            lowered = _train_lowered(args, args.worker.split("_")[0], mesh)
    lower_s = time.perf_counter() - start
    options = XLA_DEFAULT_MATMULS if args.xla_defaults and args.worker != "sample_heun18" else None
    start = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # the compiler's own message, not the traceback's tail
        return {"lower_s": lower_s, "error": str(error).split("\n\n")[0], "jax": jax.__version__}
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    return {
        "lower_s": lower_s,
        "compile_s": compile_s,
        "hlo_instructions": text.count(" = "),
        "fusions": text.count(" fusion("),
        "custom_calls": text.count(" custom-call("),
        "all_reduces": text.count(" all-reduce(") + text.count(" all-reduce-start("),
        **hlo_traffic.program_traffic(text),
        **speed._compiled_stats(compiled),
        "device": str(topology.devices[0].device_kind),
        "jax": jax.__version__,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, grid="448", width="full", dtype="bfloat16", batch=8)
    parser.add_argument("--programs", help=f"comma-separated, of {PROGRAMS} (default: all the model has)")
    parser.add_argument("--target", default="h100", choices=sorted(TARGETS))
    parser.add_argument("--model", default="taiwan", choices=("taiwan", "china3km"), help="china3km: training steps")
    parser.add_argument("--devices", type=int, default=1, help="GPUs of one host the training batch is split over")
    parser.add_argument("--xla-defaults", action="store_true", help="training steps with XLA's Triton matmuls")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per program")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    programs = PROGRAMS if args.model == "taiwan" else PROGRAMS[:2]  # China 3 km: its training steps
    args.programs = args.programs or ",".join(programs)
    harness.check_model_arguments(parser, args, programs)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        harness.emit(compile_program(args))
        return
    results = {"machine": harness.describe_machine(), "settings": vars(args), "rows": {}}
    results["machine"]["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    for name in args.programs.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--programs", name]
        command += ["--target", args.target]
        command += ["--grid", args.grid, "--width", args.width, "--dtype", args.dtype, "--batch", str(args.batch)]
        command += ["--remat", args.remat, "--mean", args.mean, "--devices", str(args.devices), "--model", args.model]
        command += ["--xla-defaults"] if args.xla_defaults else []
        results["rows"][name] = row = harness.run_worker(command, args.timeout)
        shown = ("lower_s", "compile_s", "hlo_instructions", "kernels", "kernel_bytes", "loop_kernel_bytes", "error")
        shown = {k: row[k] for k in shown if k in row}
        print(name, json.dumps(shown), *row.get("output", [])[-3:], sep="\n  ", flush=True)
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
