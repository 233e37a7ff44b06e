"""What the benchmarks share: the machine's description, waiting for an idle machine, running
one measurement in its own subprocess, and the hourly times a skill benchmark scores.

These machines are shared: a second busy process slows both sides of a comparison by large
factors, so every measurement waits until the CPUs have been idle for a few seconds and
records how busy they were just before it started.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

RESULT_PREFIX = "RESULT "  # a worker prints its result as one line: RESULT {json}


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of CPU time spent busy over the next ``seconds`` (0 = idle, 1 = all cores busy)."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_idle(threshold: float = 0.1, settle: int = 3, timeout: float = 3600.0) -> dict:
    """Block until the CPUs were below ``threshold`` busy for ``settle`` consecutive seconds.

    Returns how long it waited and the busy share of the last second before starting; after
    ``timeout`` seconds it gives up and says so (the result is then marked ``busy``).
    """
    start, quiet, busy = time.time(), 0, 1.0
    while quiet < settle and time.time() - start < timeout:
        busy = cpu_busy(1.0)
        quiet = quiet + 1 if busy < threshold else 0
    return {"waited_s": round(time.time() - start, 1), "busy_before": round(busy, 3), "idle": quiet >= settle}


def describe_machine() -> dict:
    """CPU model and widest x86 vector extension (which convolution library trains faster depends
    on it: ``jax_corrdiff.compiler_options``), core count, OS, Python, XLA_FLAGS, GLIBC_TUNABLES,
    LD_PRELOAD and TCMalloc's thread-cache cap (the allocator; launch/cpu_env.sh); the
    accelerator is described by the worker."""
    from jax_corrdiff.compiler_options import cpu_flags, cpuinfo

    info = cpuinfo()
    return {
        "cpu": info.get("model name", platform.processor()),
        # A VM's model name can be the vendor's alone ("AMD EPYC"); family and model tell the
        # core: family 25 model 1 was a Zen 3 (AVX2), family 25 model 17 a Zen 4 (AVX-512).
        "cpu_family_model": [info.get("cpu family", ""), info.get("model", "")],
        "vector_extension": next((isa for isa in ("avx512f", "avx2") if isa in cpu_flags()), ""),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "tcmalloc_max_total_thread_cache_bytes": os.environ.get("TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES", ""),
    }


def run_worker(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one measurement in a fresh process, after an idle machine, and return its result
    (``run_command``'s) with how busy the machine was before it started."""
    load = wait_for_idle()
    return {**run_command(command, timeout, env), "load": load}


def run_command(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a worker process and return its result: the worker prints ``RESULT {json}`` as its
    last such line; a failure becomes ``{"error": ...}`` with the tail of its output, so one
    broken row does not stop a run."""
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "output": tail}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def write_results(path: str, results: dict) -> None:
    """Write a benchmark's results as JSON (creating its folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


def emit(result: dict) -> None:
    """Print a worker's result for ``run_worker``."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_running_peak() -> int | None:
    """Start measuring the peak resident memory of what runs next (a compiled step, without its
    compilation): Linux resets the high-water mark that ru_maxrss reads when 5 is written to
    /proc/self/clear_refs. Returns the peak of the process so far, or None where the mark
    cannot be reset."""
    peak = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return peak


def rss_after_running(peak_before: int | None) -> dict:
    """Peak resident memory of the process (``peak_rss_bytes``), of what ran since
    ``start_running_peak`` returned ``peak_before`` (``running_peak_rss_bytes``) and now."""
    running = peak_rss_bytes()
    if peak_before is None:
        return {"peak_rss_bytes": running, "rss_bytes": current_rss_bytes()}
    return {
        "peak_rss_bytes": max(peak_before, running),
        "running_peak_rss_bytes": running,
        "rss_bytes": current_rss_bytes(),
    }


def current_rss_bytes() -> int:
    """Resident memory of this process now (after compiling, the runtime's footprint)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_bytes_in_use() -> int | None:
    """Bytes the C allocator has handed out and not had back: TCMalloc's count where it is
    preloaded, else glibc's (``mallinfo2``: arena chunks in use plus mapped blocks); None for
    other allocators. Unlike resident memory this leaves out freed pages the allocator keeps,
    so the difference across freeing one object is that object's heap."""
    process = ctypes.CDLL(None)
    if hasattr(process, "MallocExtension_GetNumericProperty"):
        value = ctypes.c_size_t()
        process.MallocExtension_GetNumericProperty(b"generic.current_allocated_bytes", ctypes.byref(value))
        return value.value
    if hasattr(process, "mallinfo2"):
        process.mallinfo2.restype = _MallInfo2
        info = process.mallinfo2()
        return info.uordblks + info.hblkhd
    return None


def timed_repeats(run, warmup: int, repeats: int) -> dict:
    """Median and min wall time of ``run()`` (which must block until done) after warm-up."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}


def alternate(calls: dict, warmup: int, repeats: int) -> dict:
    """Median and min seconds of each ``calls[name]()`` (which must block until done), the calls
    made in turn, so a machine whose speed drifts slows every side alike."""
    times = {name: [] for name in calls}
    for repeat in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": sorted(t)[len(t) // 2], "min_s": min(t)} for name, t in times.items()}


def trace_calls(call, calls: int = 2) -> tuple[list, tuple[float, float]]:
    """Chrome-trace events of ``calls`` calls of ``call()`` (which must block until done) under
    ``jax.profiler``, and the (start, end) microseconds of the last call."""
    import glob
    import gzip
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for i in range(calls):
                with jax.profiler.TraceAnnotation(f"profiled_call_{i}"):
                    call()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if isinstance(e, dict)]
    (last,) = [e for e in events if e.get("ph") == "X" and e.get("name") == f"profiled_call_{calls - 1}"]
    return events, (last["ts"], last["ts"] + last["dur"])


def thread_names(events: list) -> dict:
    """(pid, tid) -> the trace's name for that thread (or device stream)."""
    return {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }


def merged_spans(spans) -> list[list[float]]:
    """Sorted, non-overlapping [start, end) covering ``spans`` (nested events count once)."""
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def worker_occupancy(events: list, window: tuple[float, float]) -> dict:
    """Milliseconds of ``window`` during which 0, 1, 2, ... of XLA:CPU's worker threads
    ("tf_XLAEigen") were inside some event."""
    start, end = window
    edges = []
    for thread, name in thread_names(events).items():
        if not name.startswith("tf_XLAEigen"):
            continue
        spans = (
            (max(e["ts"], start), min(e["ts"] + e["dur"], end))
            for e in events
            if e.get("ph") == "X" and (e["pid"], e["tid"]) == thread and e["ts"] < end and e["ts"] + e["dur"] > start
        )
        for a, b in merged_spans(spans):
            edges += [(a, 1), (b, -1)]
    busy_ms, level, last = {}, 0, start
    for t, change in sorted(edges):
        busy_ms[level] = busy_ms.get(level, 0.0) + (t - last) / 1e3
        level, last = level + change, t
    busy_ms[level] = busy_ms.get(level, 0.0) + (end - last) / 1e3
    return {str(k): v for k, v in sorted(busy_ms.items())}


def parse_grid(text: str) -> tuple[int, int]:
    """``64`` -> (64, 64); ``1056x1792`` -> (1056, 1792)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16 or any(p % 16 for p in parts):
        raise SystemExit(f"--grid {text!r}: need H or HxW, multiples of 16 (the UNet's 5 levels)")
    return parts[0], parts[1]


WIDTHS = {"full": 128, "tiny": 32}


def parse_width(text: str) -> int:
    """``full`` (128, the Taiwan model), ``tiny`` (32) or a number of base channels."""
    if text in WIDTHS:
        return WIDTHS[text]
    if not text.isdigit() or int(text) % 32:
        raise SystemExit(f"--width {text!r}: full, tiny or a multiple of 32")
    return int(text)


def hourly_times(period: list[str], stride: int = 1) -> list[str]:
    """Every ``stride``-th hour from period[0] to period[1] (inclusive), as ISO strings."""
    start, end = (np.datetime64(t, "h") for t in period)
    return [str(t) for t in np.arange(start, end + np.timedelta64(1, "h"), np.timedelta64(stride, "h"))]


def add_model_arguments(parser, *, grid: str, width: str, dtype: str, batch: int) -> None:
    """--grid, --width, --dtype, --batch, --remat and --mean: the Taiwan model ``speed.model_configs``
    builds, and where its diffusion step takes the regression mean from."""
    parser.add_argument("--grid", default=grid)
    parser.add_argument("--width", default=width)
    parser.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"), help="UNet block remat")
    parser.add_argument(
        "--mean",
        default="precomputed",
        choices=("precomputed", "in_step"),
        help="the diffusion step's regression mean: read with the batch, as training does "
        "(diffusion.precompute_mean), or a regression forward in the step, as PhysicsNeMo's",
    )


def check_choices(parser, option: str, value: str, known) -> None:
    """Exit with the parser's message when the comma-separated ``value`` of ``option`` names
    anything not in ``known``."""
    unknown = sorted(set(value.split(",")) - set(known))
    if unknown:
        parser.error(f"{option}: unknown {unknown}; known: {tuple(known)}")


def check_model_arguments(parser, args, programs: tuple[str, ...]) -> None:
    """Exit with the parser's message on an unknown grid, width or program (``args.programs``,
    comma-separated)."""
    check_choices(parser, "--programs", args.programs, programs)
    parse_grid(args.grid), parse_width(args.width)
