"""Speed and memory of CorrDiff training and sampling with jax_corrdiff.

    python benchmarks/speed.py [--grid 64 | 448 | 1056x1792] [--width full|tiny|N]
        [--dtype float32|bfloat16] [--batch B] [--remat none|dots|full] [--mean precomputed|in_step]
        [--only regression_step,diffusion_step,sample_heun18,sample_euler8,compile,matmul_peak]
        [--repeats N] --out benchmarks/results/speed_cpu.json

The network is CorrDiff's Taiwan architecture (channel_mult [1,2,2,2,2], 4 blocks per level,
attention at the coarsest level, 12 inputs, 4 outputs, sinusoidal position grid) at the
given width (full = 128 channels, 80 M parameters). Rows:

- ``regression_step`` / ``diffusion_step``: one whole training step as training runs it (loss,
  gradient, Adam, EMA), batch B, on CPU over the devices training would split the cores into
  (``jax_corrdiff.cpu_devices``). The diffusion step reads each sample's regression mean with
  the batch, as training does (``jax_corrdiff.training.regression_means``); its row adds
  ``regression_mean_s_per_sample``, the forward that computes a mean once per sample before
  training. ``--mean in_step`` runs the regression forward in every step instead, as PhysicsNeMo's
  step does.
- ``sample_heun18``: regression mean + 18-step Heun residual sample (35 network evaluations),
  one input, one member: CorrDiff's generation, compiled as it compiles (the compiler's freed
  memory handed back before the first call). ``sample_euler8``: the 8-step Euler preset.
- ``compile``: the diffusion training step as training gets it, cold (traced, lowered,
  compiled and written to the caches), then warm (a second process loading the first one's
  executable without tracing: ``jax_corrdiff.executable_cache``). ``compile_s`` counts from
  the call that gets the step to the executable, so cold it includes ``lower_s`` (tracing the
  state's shapes and the step, and lowering to StableHLO).
- ``matmul_peak``: the best FLOP/s of a large matmul in the same dtype: the yardstick for
  the achieved share of peak.

Each row runs in its own process after the machine has been idle for a few seconds
(``harness.wait_for_idle``). Timings are the median and min of ``--repeats`` calls after
warm-up; memory is XLA's ``memory_analysis()`` of the compiled program plus the peak RSS (CPU)
or the device's peak bytes in use (GPU); FLOPs come from the lowered program's ``cost_analysis()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROWS = ("matmul_peak", "regression_step", "diffusion_step", "sample_heun18", "sample_euler8", "compile")
IN_CHANNELS, OUT_CHANNELS = 12, 4


def model_configs(args) -> dict:
    """Regression and diffusion model configs of the Taiwan architecture at ``args``' size."""
    height, width = harness.parse_grid(args.grid)
    unet = dict(
        model_channels=harness.parse_width(args.width),
        channel_mult=[1, 2, 2, 2, 2],
        num_blocks=4,
        attn_resolutions=[height >> 4],
        dropout=0.13,
        position_grid="sinusoidal",
        num_grid_channels=4,
        remat=args.remat,
    )
    common = dict(img_resolution=[height, width], out_channels=OUT_CHANNELS, compute_dtype=args.dtype)
    return {
        "regression": dict(
            common, kind="regression", cond_channels=IN_CHANNELS, unet=dict(unet, embedding_type="zero")
        ),
        # Conditioned on the regression mean and the coarse input (hr-mean conditioning).
        "diffusion": dict(
            common,
            kind="diffusion",
            cond_channels=OUT_CHANNELS + IN_CHANNELS,
            unet=dict(unet, embedding_type="positional"),
        ),
    }


def _layout():
    from jax_corrdiff.diffusion.conditioning import ConditioningLayout

    return ConditioningLayout(
        target_channels=[f"out{i}" for i in range(OUT_CHANNELS)],
        input_channels=[f"in{i}" for i in range(IN_CHANNELS)],
        regression_mean=True,
    )


def _device() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "count": jax.device_count(),
        "jax": jax.__version__,
    }


def _cost(stage) -> dict:
    cost = stage.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost) or {}


def _compiled_stats(compiled) -> dict:
    """Bytes accessed and XLA's memory plan of one compiled program (bytes depend on the
    backend's fusion, so they are the compiled program's)."""
    mem = compiled.memory_analysis()
    plan = {}
    if mem is not None:
        plan = {
            "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
        }
        plan["xla_peak_bytes"] = (
            plan["argument_bytes"] + plan["output_bytes"] + plan["temp_bytes"] - plan["alias_bytes"]
        )
    return {"bytes_accessed": float(_cost(compiled).get("bytes accessed", 0.0)), **plan}


def _program_stats(lowered, compiled) -> dict:
    """FLOPs of one program and ``_compiled_stats``.

    FLOPs are counted on the lowered program, before backend optimisation: XLA:GPU turns
    convolutions into cuDNN custom calls, which the compiled program's cost analysis counts as
    zero FLOPs (an 18-step 448 x 448 sample read 2.2 TFLOP compiled for an H200, 148 TFLOP here).
    """
    return {"flops": float(_cost(lowered).get("flops", 0.0)), **_compiled_stats(compiled)}


def _module_size(compiled) -> dict:
    """Size of the optimized HLO module: a warm start's cost on XLA:CPU grows as the number of
    YNNPACK library fusions times the number of instructions (each fusion thunk is matched to its
    instruction by a scan of the whole module when a cached executable is loaded)."""
    text = compiled.as_text()
    return {"hlo_instructions": text.count(" = "), "library_fusions": text.count('"__ynn_fusion"')}


def _memory_in_use(peak_before: int | None) -> dict:
    """The device's peak bytes in use, or on a CPU ``harness.rss_after_running``."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"device_peak_bytes": stats["peak_bytes_in_use"]}
    return harness.rss_after_running(peak_before)


def _train_step(args, stage: str, num_devices: int | None = None):
    """(jitted step, state, batch, frozen) for one training step of ``stage`` on ``num_devices``
    devices (default: on CPU every device the worker split its cores into, as training does
    (``_split_cores``); one accelerator)."""
    step, init, batch, frozen = _train_parts(args, stage, num_devices)
    return step, init(), batch, frozen


def _train_parts(args, stage: str, num_devices: int | None = None):
    """``_train_step`` with ``init()`` in place of the state: what builds it."""
    import jax

    from jax_corrdiff.mesh import make_mesh, replicated, to_global

    if num_devices is None:
        num_devices = jax.device_count() if jax.default_backend() == "cpu" else 1
    mesh = make_mesh(num_devices)
    step, init, batch, frozen_init = train_program(args, stage, mesh)
    # Compiled, not op by op: training loads these weights, and eager initialisation would
    # leave hundreds of single-operation executables in the process's memory. Replicated over
    # the mesh as training places them: left on one device, every call of a step split over
    # devices copied them to the others first (38 ms of the 32-channel diffusion step's 294).
    frozen = jax.jit(frozen_init, out_shardings=replicated(mesh))() if frozen_init else {}
    return step, init, to_global(batch, mesh), frozen


def train_program(args, stage: str, mesh):
    """(jitted step, ``init()`` of its state, the batch as numpy arrays, ``frozen_init()`` of the
    frozen regression variables or None) for ``stage`` on ``mesh``: nothing computed, so that a
    program can also be compiled for devices this machine does not have (``gpu_aot_compile.py``)."""
    import jax
    import numpy as np

    from jax_corrdiff.config import base_config
    from jax_corrdiff.diffusion.residual_mean import PrecomputedMean
    from jax_corrdiff.models.factory import build_model, init_variables
    from jax_corrdiff.training.steps import diffusion_per_sample_loss, regression_per_sample_loss

    configs = model_configs(args)
    training = base_config()[stage].training
    training.batch_size = args.batch
    model = build_model(configs[stage])
    height, width = configs[stage]["img_resolution"]
    rng = np.random.default_rng(0)
    batch = {
        "target": rng.standard_normal((args.batch, height, width, OUT_CHANNELS), np.float32),
        "img_lr": rng.standard_normal((args.batch, height, width, IN_CHANNELS), np.float32),
    }
    frozen_init = None
    if stage == "regression":
        loss_fn = regression_per_sample_loss(model)
    elif args.mean == "precomputed":
        loss_fn = diffusion_per_sample_loss(model, PrecomputedMean(), _layout(), p_mean=0.0, p_std=1.2, sigma_data=0.5)
        batch["regression_mean"] = rng.standard_normal((args.batch, height, width, OUT_CHANNELS), np.float32)
    else:
        regression = build_model(configs["regression"])
        loss_fn = diffusion_per_sample_loss(model, regression, _layout(), p_mean=0.0, p_std=1.2, sigma_data=0.5)

        def frozen_init():
            return init_variables(configs["regression"], jax.random.key(1))

    return (*step_and_init(model, configs[stage], loss_fn, training, args.batch, mesh), batch, frozen_init)


def step_and_init(model, model_config, loss_fn, training, batch_size: int, mesh):
    """(jitted training step, ``init()`` of its state) for ``model`` as training builds them."""
    import jax

    from jax_corrdiff.models.factory import example_inputs
    from jax_corrdiff.training.optimizer import make_optimizer
    from jax_corrdiff.training.steps import init_train_state, make_train_step

    optimizer = make_optimizer(training, batch_size)
    example_args, example_kwargs = example_inputs(model_config)

    def init():
        return init_train_state(model, example_args, example_kwargs, optimizer, jax.random.key(0), mesh)

    return make_train_step(loss_fn, optimizer, training, batch_size, 0, mesh), init


def stepping(compiled, state, batch, frozen):
    """``call()``: one step of the compiled training step from the state its last call returned
    (the state is donated), blocking until it is done."""
    import jax

    holder = [state]

    def call():
        holder[0], metrics = compiled(holder[0], batch, frozen)
        jax.block_until_ready(metrics)

    return call


def jit_as_generation(sample):
    """``sample`` jitted with the options generation compiles its programs with."""
    import jax

    from jax_corrdiff.compiler_options import network_evaluation_options

    return jax.jit(sample, compiler_options=network_evaluation_options())


def measure_train_step(args, stage: str) -> dict:
    import jax

    from jax_corrdiff.host_memory import compile_then_release, release_freed_memory
    from jax_corrdiff.training.steps import train_state_shapes

    step, init, batch, frozen = _train_parts(args, stage)
    # As training compiles it: from the state's shapes, before the state exists, and keeping
    # neither the jit object nor the lowered module.
    shapes = train_state_shapes(init, batch["target"].sharding.mesh)
    unlowered, flops = [step], {}
    del step

    def lower():
        lowered = unlowered.pop().lower(shapes, batch, frozen)
        start = time.perf_counter()
        flops["flops"] = float(_cost(lowered).get("flops", 0.0))  # as ``_program_stats`` counts them
        release_freed_memory()  # the count's working memory: the compile's peak stays training's
        flops["counting_s"] = time.perf_counter() - start
        return lowered

    start = time.perf_counter()
    compiled = compile_then_release(lower)
    compile_s = time.perf_counter() - start - flops.pop("counting_s")
    print(f"{stage} step compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    state = jax.block_until_ready(init())
    release_freed_memory()  # as training's ``init_state``: initialising compiles and runs a program too
    peak_before = harness.start_running_peak()
    timing = harness.timed_repeats(stepping(compiled, state, batch, frozen), args.warmup, args.repeats)
    memory = _memory_in_use(peak_before)
    stats = {**flops, **_compiled_stats(compiled), **_module_size(compiled)}
    program = [compiled]
    del compiled
    return {
        **timing,
        "samples_per_s": args.batch / timing["median_s"],
        "compile_s": compile_s,
        **stats,
        "flops_per_s": stats["flops"] / timing["min_s"],
        **memory,
        **_heap_held_by(program),
        **(_regression_mean_cost(args, batch) if "regression_mean" in batch else {}),
    }


def _regression_mean_cost(args, batch) -> dict:
    """Seconds per sample of the forward that computes the regression means once before
    training (``regression_means.mean_forward``), on the step's batch and devices."""
    import jax

    from jax_corrdiff.mesh import replicated
    from jax_corrdiff.models.factory import build_model, init_variables
    from jax_corrdiff.training.regression_means import mean_forward

    config = model_configs(args)["regression"]
    mesh = batch["img_lr"].sharding.mesh
    variables = jax.jit(lambda: init_variables(config, jax.random.key(1)), out_shardings=replicated(mesh))()
    forward, inputs = mean_forward(build_model(config), mesh), {"img_lr": batch["img_lr"]}
    timing = harness.timed_repeats(lambda: jax.block_until_ready(forward(variables, inputs)), args.warmup, args.repeats)
    return {"regression_mean_s_per_sample": timing["median_s"] / args.batch}


def _heap_held_by(program: list) -> dict:
    """The host heap freed by dropping ``program``'s one item, a compiled executable no one else
    holds (call it last). XLA keeps the optimised module, its proto and its dataflow analysis with
    the program, so on a CPU this grows with the HLO instruction count, not with the model's arrays;
    one loaded from the persistent cache holds about twice what a freshly compiled one does."""
    from jax_corrdiff.host_memory import release_freed_memory

    before = harness.heap_bytes_in_use()
    program.clear()
    release_freed_memory()
    return {} if before is None else {"executable_heap_bytes": before - harness.heap_bytes_in_use()}


def forward_cost(config) -> dict:
    """``_program_stats`` of one network evaluation (batch 1)."""
    import jax

    from jax_corrdiff.models.factory import build_model, example_inputs, init_variables

    model, (args, kwargs) = build_model(config), example_inputs(config)
    variables = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    lowered = jax.jit(lambda v, *a: model.apply(v, *a, **kwargs)).lower(variables, *args)
    return _program_stats(lowered, lowered.compile())


def sample_program(args, solver: str):
    """(sample, inputs, sampler, configs): CorrDiff's generation of one member for one input as
    a function to jit, ``sample(*inputs)``. The variables are arguments, as generation passes
    them (inference/generate.py): closed over, they would be constants folded into the program,
    inflating compile time and memory."""
    import jax
    import numpy as np

    from jax_corrdiff.diffusion.samplers import EDMSampler
    from jax_corrdiff.inference.sampling import conditioned_denoisers, corrdiff_ensemble
    from jax_corrdiff.models.factory import build_model, init_variables

    configs = model_configs(args)
    regression, diffusion = build_model(configs["regression"]), build_model(configs["diffusion"])
    # Each initialised by one compiled program, as a checkpoint's variables arrive: initialised
    # op by op, they left hundreds of single-operation executables in the process's memory.
    reg_vars = jax.jit(lambda key: init_variables(configs["regression"], key))(jax.random.key(1))
    diff_vars = jax.jit(lambda key: init_variables(configs["diffusion"], key))(jax.random.key(2))
    sampler = (
        EDMSampler(num_steps=18, sigma_max=800.0) if solver == "heun" else EDMSampler(8, sigma_max=80.0, solver="euler")
    )

    def sample(reg_vars, diff_vars, img_lr, keys):
        def apply(x, cond, sigma, label, origin, margin):
            return diffusion.apply(
                diff_vars, x, cond, sigma, lead_time_label=label, patch_origin=origin, grid_margin=margin
            )

        return corrdiff_ensemble(
            lambda x, label: regression.apply(reg_vars, x),
            conditioned_denoisers(apply, _layout()),
            sampler,
            img_lr,
            keys,
            num_members=1,
        )

    height, width = configs["regression"]["img_resolution"]
    img_lr = np.random.default_rng(0).standard_normal((1, height, width, IN_CHANNELS), np.float32)
    keys = jax.random.split(jax.random.key(0), 1)
    return sample, (reg_vars, diff_vars, img_lr, keys), sampler, configs


def measure_sample(args, solver: str) -> dict:
    """``sample_program`` compiled as generation compiles it, its freed working memory handed
    back before the first call (``executable_cache.load_or_compile``)."""
    import jax

    from jax_corrdiff.host_memory import compile_then_release, release_freed_memory

    sample, inputs, sampler, configs = sample_program(args, solver)
    release_freed_memory()  # the initialisations' working memory, as if read from a checkpoint
    start = time.perf_counter()
    compiled = compile_then_release(lambda: jit_as_generation(sample).lower(*inputs))
    compile_s = time.perf_counter() - start
    peak_before = harness.start_running_peak()
    timing = harness.timed_repeats(lambda: jax.block_until_ready(compiled(*inputs)), args.warmup, args.repeats)
    memory = _memory_in_use(peak_before)  # before compiling the single forwards below
    # cost_analysis counts a loop body once, so count evaluations explicitly.
    flops = forward_cost(configs["regression"])["flops"]
    flops += sampler.network_evaluations * forward_cost(configs["diffusion"])["flops"]
    return {
        **timing,
        "network_evaluations": sampler.network_evaluations + 1,
        "compile_s": compile_s,
        "flops": flops,
        "flops_per_s": flops / timing["min_s"],
        **_compiled_stats(compiled),
        **memory,
    }


def measure_compile(args) -> dict:
    """The diffusion training step got as training gets it (``executable_cache.load_or_compile``,
    JAX's persistent cache in ``args.cache`` and the executable cache under it): cold, traced,
    lowered and compiled; warm, loaded without tracing. Also the compiled step's memory plan (how
    ``--remat`` trades memory at a grid too large to run)."""
    import jax

    from jax_corrdiff import executable_cache
    from jax_corrdiff.compilation_cache import enable_compilation_cache
    from jax_corrdiff.training.steps import train_state_shapes

    enable_compilation_cache(args.cache)
    step, init, batch, frozen = _train_parts(args, "diffusion")
    mesh = batch["target"].sharding.mesh
    description = {
        "program": "speed.py diffusion step",
        **{k: getattr(args, k) for k in ("grid", "width", "dtype", "batch", "remat", "mean")},
    }
    unlowered, traced = [step], {}
    del step  # the jit object keeps its lowering and so its executable

    def lower():
        traced["lowered"] = unlowered.pop().lower(train_state_shapes(init, mesh), batch, frozen)
        traced["lower_s"] = time.perf_counter() - start
        return traced["lowered"]

    executables, start = os.path.join(args.cache, executable_cache.SUBDIR), time.perf_counter()
    compiled = executable_cache.load_or_compile(executables, description, mesh, lower)
    compile_s = time.perf_counter() - start
    lowered = traced.pop("lowered", None)
    stats = _program_stats(lowered, compiled) if lowered else _compiled_stats(compiled)
    program = [compiled]
    del compiled, lowered
    return {
        "compile_s": compile_s,
        "traced": bool(traced),
        **traced,
        **stats,
        **_module_size(program[0]),
        "cache_entries": len(os.listdir(args.cache)),
        "jax": jax.__version__,
        **_heap_held_by(program),
    }


def measure_matmul_peak(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), args.dtype)
    matmul = jax.jit(lambda a: a @ a)
    timing = harness.timed_repeats(lambda: jax.block_until_ready(matmul(a)), 2, max(args.repeats, 5))
    return {**timing, "n": n, "flops_per_s": 2 * n**3 / timing["min_s"]}


def _split_cores(args) -> None:
    """The CPU devices ``python -m jax_corrdiff.train`` would train this network and batch on."""
    from jax_corrdiff.cpu_devices import cpu_device_count, usable_cores, use_cpu_devices

    use_cpu_devices(cpu_device_count(harness.parse_width(args.width), [args.batch], usable_cores()))


def worker(args) -> None:
    import jax

    if args.worker in ("regression_step", "diffusion_step", "compile"):
        _split_cores(args)
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else "default"):
        if args.worker in ("regression_step", "diffusion_step"):
            result = measure_train_step(args, args.worker.split("_")[0])
        elif args.worker.startswith("sample_"):
            result = measure_sample(args, "heun" if args.worker == "sample_heun18" else "euler")
        elif args.worker == "compile":
            result = measure_compile(args)
        else:
            result = measure_matmul_peak(args)
    harness.emit({**result, "device": _device()})


def _worker_command(args, row: str, cache: str | None = None) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", row, "--grid", args.grid, "--width", args.width]
    command += ["--dtype", args.dtype, "--batch", str(args.batch), "--remat", args.remat, "--mean", args.mean]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    return command + (["--cache", cache] if cache else [])


def measure_rows(args, rows: list[str]) -> dict:
    """Every requested row, each in its own process (compile: a cold then a warm process)."""
    results = {}
    for row in rows:
        print(f"measuring {row} ...", flush=True)
        if row == "compile":
            with tempfile.TemporaryDirectory() as cache:
                cold = harness.run_worker(_worker_command(args, row, cache), args.timeout)
                # Without a finished cold compile the cache holds nothing to start warm from.
                warm = (
                    harness.run_worker(_worker_command(args, row, cache), args.timeout) if "error" not in cold else {}
                )
            results["compile"] = {"cold": cold, "warm": warm}
        else:
            results[row] = harness.run_worker(_worker_command(args, row), args.timeout)
        print(json.dumps(results[row]), flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, grid="64", width="full", dtype="float32", batch=2)
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {ROWS}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    harness.check_choices(parser, "--only", args.only, ROWS)
    harness.parse_grid(args.grid), harness.parse_width(args.width)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    settings = {k: getattr(args, k) for k in ("grid", "width", "dtype", "batch", "remat", "mean", "repeats", "warmup")}
    results = {
        "machine": harness.describe_machine(),
        "settings": settings,
        "rows": measure_rows(args, args.only.split(",")),
    }
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
