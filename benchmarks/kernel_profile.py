"""Where one compiled program's time goes: a ``jax.profiler`` trace of a training step or a
sample, each kernel attributed to the operation of our code it was compiled from.

    python benchmarks/kernel_profile.py [--grid 64] [--width 32|full] [--dtype float32|bfloat16]
        [--batch 2] [--remat none|dots|full] [--programs regression_step,diffusion_step,sample_heun18] [--devices N]
        --out benchmarks/results/kernel_profile_cpu_tiny.json

The programs are ``speed.py``'s, built and compiled as it builds them (training steps on
``--devices`` devices, default as ``python -m jax_corrdiff.train`` would split a CPU). After
warm-up, two calls are traced and the last is read. Every trace event named after an instruction
of the compiled module (a CPU thunk, or ``args.hlo_op`` of a GPU kernel) is charged to a
category by the JAX source operation in that instruction's metadata; an event nested in another
of the same thread counts once. Per program: the call's wall time, each category's kernel time
(summed over threads or streams, so on a CPU it can exceed the wall time), the 15 costliest
instructions with their source operation, and on a CPU how long 0, 1, 2, ... of XLA's worker
threads were busy. Two kinds of work run outside any traced kernel, so that the occupancy
undercounts it: Eigen's convolutions (``compiler_options.EIGEN_CONVOLUTIONS``: one-device
training steps on x86, sampling) are split into tasks that show as workers not busy, not in a
category; and a loop fusion XLA splits over the cores (``outer_dimension_partitions`` in the
compiled module: 1,021 of the 32-channel regression step's 6,563 fusions) is traced as one
kernel on one worker while its other partition runs on the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import hlo_traffic  # noqa: E402
import speed  # noqa: E402

PROGRAMS = ("regression_step", "diffusion_step", "sample_heun18")

# jax.random's generators: the diffusion loss's noise, patch origins. The UNet's dropout hashes
# element indices (``models/layers.py`` ``dropout``), fused into its consumers: it counts with them.
_RANDOM = ("threefry", "random_bits", "_bernoulli", "_uniform", "_normal")
_LARGEST_KERNEL = 7
_PREFERRED_BODY_SOURCES = ("conv_general_dilated", "dot_general", "XLA convolution")
# A GroupNorm's statistics and affine map, under the norm's own scope (``norm1/``) or, where a
# convolution recomputes its input from them, under ``GroupNorm.recomputable``'s
# (``norm0.recomputable/``, ``out_norm.recomputable/``).
_GROUP_NORM = re.compile(r"/(?:out_)?norm\d*(?:\.recomputable)?/")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def category(instruction: str, source: str) -> str:
    """The category of a kernel from its instruction name and its metadata ``op_name``
    (``source``, empty when XLA left none: copies and transposes it inserted itself)."""
    if instruction.startswith(_COLLECTIVES):
        return "collectives"
    if not source:
        return "layout copies and transposes inserted by XLA"
    window = re.fullmatch(r"XLA convolution, window (\d+)x(\d+)", source)
    if window:  # a kernel gradient's window is the image, a forward convolution's the kernel
        return "convolution gradients" if int(window.group(1)) > _LARGEST_KERNEL else "convolutions"
    if any(word in source for word in _RANDOM):
        return "random numbers (jax.random)"
    backward = "transpose(" in source
    if "conv_general_dilated" in source:
        return "convolution gradients" if backward else "convolutions"
    if "dot_general" in source:
        return "matmul gradients" if backward else "matmuls"
    if _GROUP_NORM.search(source):
        return "group norm, backward" if backward else "group norm"
    if backward:
        return "other backward"
    if "jvp(" in source or "unet" in source.lower():
        return "other network forward"
    return "outside the networks (optimizer, EMA, sampler)"


def instruction_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its metadata ``op_name``, over every computation. A fusion that XLA
    left without one takes its body's: the convolution's or matmul's if it holds one, else its
    first. XLA rewrites kernel-gradient convolutions (batch and feature dimensions swapped)
    without metadata: a convolution left without any anywhere is "XLA convolution, window HxW".
    "" for the rest (copies and transposes XLA inserted)."""
    parsed, _ = hlo_traffic.computations(hlo_text)
    sources, calls, bodies = {}, {}, {}
    for computation, instructions in parsed.items():
        body = bodies.setdefault(computation, [])
        for name, _, opcode, rest in instructions:
            op_name = re.search(r'op_name="([^"]*)"', rest)
            window = re.search(r"window=\{size=(\d+x\d+)", rest) if opcode == "convolution" else None
            described = f"XLA convolution, window {window.group(1)}" if window else ""
            sources[name] = op_name.group(1) if op_name else described
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            if called:
                calls[name] = called.group(1)
            if sources[name]:
                body.append(sources[name])
    for name, body in calls.items():
        inner = bodies.get(body, [])
        if not sources[name] and inner:
            preferred = [op for op in inner if any(kind in op for kind in _PREFERRED_BODY_SOURCES)]
            sources[name] = (preferred or inner)[0]
    return sources


def attribute(events: list, window: tuple[float, float], sources: dict[str, str]) -> dict:
    """Kernel milliseconds per category and the costliest instructions within ``window``."""
    start, end = window
    per_thread: dict = {}
    for e in events:
        if e.get("ph") != "X" or not start <= e["ts"] < end:
            continue
        instruction = (e.get("args") or {}).get("hlo_op", e["name"])
        if instruction in sources:
            per_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"], instruction))
    categories: dict = {}
    instructions: dict = {}
    for spans in per_thread.values():
        outer_end = -1.0
        for begin, finish, instruction in sorted(spans):
            if begin < outer_end:  # nested in the previous kernel of this thread
                continue
            outer_end = finish
            ms = (finish - begin) / 1e3
            row = categories.setdefault(category(instruction, sources[instruction]), {"ms": 0.0, "kernels": 0})
            row["ms"] += ms
            row["kernels"] += 1
            instructions[instruction] = instructions.get(instruction, 0.0) + ms
    total = sum(row["ms"] for row in categories.values())
    for row in categories.values():
        row["share"] = row["ms"] / total if total else 0.0
    costliest = sorted(instructions.items(), key=lambda item: -item[1])[:15]
    return {
        "kernel_ms": total,
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1]["ms"])),
        "costliest": [{"instruction": i, "ms": ms, "source": sources[i][-160:]} for i, ms in costliest],
    }


def _program(args, name: str):
    """(compiled, call) of ``name``: ``call()`` runs it once and blocks."""
    import jax

    if name.endswith("_step"):
        step, state, batch, frozen = speed._train_step(args, name.split("_")[0], args.devices)
        compiled = step.lower(state, batch, frozen).compile()
        return compiled, speed.stepping(compiled, state, batch, frozen)
    sample, inputs, _, _ = speed.sample_program(args, "heun")
    compiled = speed.jit_as_generation(sample).lower(*inputs).compile()
    return compiled, lambda: jax.block_until_ready(compiled(*inputs))


def profile_program(args, name: str) -> dict:
    import jax

    compiled, call = _program(args, name)
    for _ in range(args.warmup):
        call()
    events, window = harness.trace_calls(call)
    sources = instruction_sources(compiled.as_text())
    result = {"wall_ms": (window[1] - window[0]) / 1e3, **attribute(events, window, sources)}
    if jax.default_backend() == "cpu":
        result["ms_with_workers_busy"] = harness.worker_occupancy(events, window)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, grid="64", width="32", dtype="float32", batch=2)
    parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated, of {PROGRAMS}")
    parser.add_argument("--devices", type=int, help="training-step devices (default: as training splits a CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    harness.check_model_arguments(parser, args, PROGRAMS)
    return args


def main(argv=None) -> None:
    import jax

    args = parse_args(argv)
    if args.devices is None:
        speed._split_cores(args)
    results = {"machine": harness.describe_machine(), "load": harness.wait_for_idle(), "settings": vars(args)}
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else "default"):
        for name in args.programs.split(","):
            results[name] = profile_program(args, name)
            summary = {k: round(v["ms"], 1) for k, v in results[name]["categories"].items()}
            print(name, f"{results[name]['wall_ms']:.1f} ms:", json.dumps(summary), flush=True)
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
