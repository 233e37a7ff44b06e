"""One training step of two git revisions, timed in turn on the same machine.

    python benchmarks/ab_revisions.py BASELINE CANDIDATE [--stage regression|diffusion]
        [--grid 64] [--width full|tiny|N] [--dtype float32|bfloat16] [--batch 2] [--steps 20]
        --out benchmarks/results/ab_REVISIONS.json

Each revision is exported (``git archive``) to a folder of its own, and a worker process per
revision imports the package from there and builds the step with that revision's own
``benchmarks/speed.py`` (so a change to how the step is built is measured too), compiles it and
waits. Once the machine is idle, the workers run one step each in turn, the baseline first in
even pairs and the candidate first in odd ones, and the result is each side's median and the
median of the per-pair ratios candidate / baseline. These VMs drift by tens of percent over
minutes: a ratio of two separate runs carries the drift, while neighbouring steps see the same
machine. Running a revision against itself shows how far the ratios spread on the day.
Uncommitted changes are measured as ``HEAD $(git stash create)``: ``git stash create`` makes a
commit of the working tree without touching it. ``--candidate-xla-options JSON`` compiles the
candidate's step with these XLA debug options added to the ones its revision chooses
(``compiler_options.training_step_options``): ``HEAD HEAD --candidate-xla-options
'{"xla_cpu_prefer_vector_width": 512}'`` measures a compiler setting.

Each worker also reports its compiled step's HLO instruction and YNNPACK fusion counts and XLA's
planned temporaries. The workers hold their states at the same time (two training states in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

READY_PREFIX = "READY "
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_revision(revision: str, folder: str) -> str:
    """The commit ``revision`` names, its files written under ``folder`` (``git archive``)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    if commit.returncode:
        raise SystemExit(f"not a revision of {REPOSITORY}: {revision!r} ({commit.stderr.strip()})")
    archive = subprocess.Popen(["git", "archive", commit.stdout.strip()], cwd=REPOSITORY, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", folder], stdin=archive.stdout, check=True)
    if archive.wait():
        raise SystemExit(f"git archive {revision} failed")
    return commit.stdout.strip()


def measure_pairs(step_baseline, step_candidate, steps: int) -> dict:
    """``steps`` pairs of calls (each returns its step's seconds), the baseline first in even
    pairs: each side's seconds and median, and the candidate / baseline ratio per pair, its median
    (the summary: pairs cancel a drift their neighbours share) and quartiles."""
    seconds = {"baseline": [], "candidate": []}
    sides = {"baseline": step_baseline, "candidate": step_candidate}
    for pair in range(steps):
        order = ("baseline", "candidate") if pair % 2 == 0 else ("candidate", "baseline")
        for side in order:
            seconds[side].append(sides[side]())
    ratios = [c / b for b, c in zip(seconds["baseline"], seconds["candidate"])]
    return {
        **{side: {"seconds": s, "median_s": statistics.median(s)} for side, s in seconds.items()},
        "candidate_over_baseline_per_pair": ratios,
        "candidate_over_baseline": statistics.median(ratios),
        "candidate_over_baseline_quartiles": statistics.quantiles(ratios, n=4) if steps > 1 else ratios * 3,
    }


class Worker:
    """One revision's compiled step in a process of its own, stepped on request."""

    def __init__(self, folder: str, args, xla_options: str = "{}"):
        command = [sys.executable, os.path.abspath(__file__), "--worker", folder, "--stage", args.stage]
        command += ["--grid", args.grid, "--width", args.width, "--dtype", args.dtype, "--batch", str(args.batch)]
        command += ["--candidate-xla-options", xla_options]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.program = json.loads(self._read_line(READY_PREFIX))

    def _read_line(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise SystemExit(f"worker exited ({self.process.wait()}) before answering; its stderr is above")

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return float(self._read_line("SECONDS "))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


def worker(args) -> None:
    """Build, compile and warm the step of the revision in ``args.worker``, then answer each
    ``step`` line on stdin with the seconds one step took."""
    sys.path[:0] = [args.worker, os.path.join(args.worker, "benchmarks")]
    for name in [m for m in sys.modules if m in ("harness", "speed") or m.startswith("jax_corrdiff")]:
        del sys.modules[name]
    import jax
    import speed

    import jax_corrdiff

    if not jax_corrdiff.__file__.startswith(args.worker):
        raise SystemExit(f"imported {jax_corrdiff.__file__}, not the revision under {args.worker}")
    options = speed.parse_args(
        ["--grid", args.grid, "--width", args.width, "--dtype", args.dtype, "--batch", str(args.batch)]
    )
    speed._split_cores(options)
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else "default"):
        step, init, batch, frozen = speed._train_parts(options, args.stage)
        state = init()
        lowered = step.lower(state, batch, frozen)
        extra = json.loads(args.candidate_xla_options)
        if extra:  # compile's options replace the ones the revision's jax.jit was given
            from jax_corrdiff.compiler_options import training_step_options

            extra = {**(training_step_options(jax.local_device_count()) or {}), **extra}
        compiled = lowered.compile(compiler_options=extra) if extra else lowered.compile()
        program = {
            **speed._module_size(compiled),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "devices": jax.device_count(),
            "xla_options": extra,
        }
        call = speed.stepping(compiled, state, batch, frozen)
        for _ in range(2):
            call()
        print(READY_PREFIX + json.dumps(program), flush=True)
        for line in sys.stdin:
            if line.strip() == "step":
                start = time.perf_counter()
                call()
                print(f"SECONDS {time.perf_counter() - start}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", nargs="?")
    parser.add_argument("candidate", nargs="?")
    parser.add_argument("--stage", default="regression", choices=("regression", "diffusion"))
    parser.add_argument("--grid", default="64")
    parser.add_argument("--width", default="full")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="pairs of steps timed")
    parser.add_argument(
        "--candidate-xla-options", default="{}", help="JSON: XLA debug options added to the candidate's step"
    )
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if not isinstance(json.loads(args.candidate_xla_options), dict):
            raise ValueError("not an object")
    except ValueError as error:
        parser.error(f"--candidate-xla-options: {error}")
    if not args.worker and not (args.baseline and args.candidate):
        parser.error("give a BASELINE and a CANDIDATE revision")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    harness.parse_grid(args.grid), harness.parse_width(args.width)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as root:
        commits, workers = {}, {}
        try:
            for side, revision in (("baseline", args.baseline), ("candidate", args.candidate)):
                folder = os.path.join(root, side)
                os.makedirs(folder)
                commits[side] = {"revision": revision, "commit": export_revision(revision, folder)}
                print(f"compiling {side} ({revision}) ...", flush=True)
                options = args.candidate_xla_options if side == "candidate" else "{}"
                workers[side] = Worker(folder, args, options)  # one compile at a time
            load = harness.wait_for_idle()
            timing = measure_pairs(workers["baseline"].step, workers["candidate"].step, args.steps)
        finally:
            for w in workers.values():
                w.close()
    results = {
        "machine": harness.describe_machine(),
        "settings": {
            k: getattr(args, k) for k in ("stage", "grid", "width", "dtype", "batch", "steps", "candidate_xla_options")
        },
        "revisions": commits,
        "programs": {side: w.program for side, w in workers.items()},
        "load": load,
        **timing,
    }
    low, _, high = timing["candidate_over_baseline_quartiles"]
    print(
        f"{args.stage} step: baseline {timing['baseline']['median_s']:.4f} s, candidate "
        f"{timing['candidate']['median_s']:.4f} s, candidate / baseline {timing['candidate_over_baseline']:.4f} "
        f"(middle half of the pairs {low:.3f}-{high:.3f})"
    )
    if args.out:
        harness.write_results(args.out, results)


if __name__ == "__main__":
    main()
