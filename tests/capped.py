"""Run checkpoint-reading code in a child process under a memory cap and a time limit.

A hostile checkpoint that gets past the reader's checks must fail its test, not
exhaust the CI machine's memory or hang it.  The child imports what it needs,
then caps its address space (RLIMIT_AS) at what it already uses plus a
headroom, so the cap follows the platform's import footprint (JAX reserves far
more address space than NumPy alone) while staying far below what the hostile
files ask for.  Each case prints one line: "ok: <summary>" or
"<ExceptionClass>: <message>", so a test sees a MemoryError or RecursionError
as such; a hang is killed at the time limit and fails the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PRELUDE = """
import json, resource, sys
{setup}
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + {headroom}, used + {headroom}))

def case(name, run):
    try:
        outcome = "ok: " + str(run())[:500]
    except BaseException as exc:  # MemoryError, RecursionError... are what the tests look for
        outcome = f"{{type(exc).__name__}}: {{exc}}"[:3000]
    print(json.dumps([name, outcome]), flush=True)
"""


def run_capped(
    cases: str, *, setup: str, headroom_mib: int, timeout_s: float, args: tuple[str, ...] = ()
) -> dict[str, str]:
    """Run ``cases`` (code calling ``case(name, fn)``) after ``setup``; {name: outcome line}.

    ``args`` become ``sys.argv[1:]``.  Summaries must be cheap: a hostile
    object's repr can be as costly as the attack itself.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("the memory cap uses /proc and RLIMIT_AS")
    script = _PRELUDE.format(setup=setup, headroom=headroom_mib << 20) + textwrap.dedent(cases)
    # One malloc arena per thread would reserve address space after the cap is set.
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="2")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the reader was still running after {timeout_s} s (killed): a hang or runaway work")
    outcomes = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith('["'))
    if not outcomes:
        pytest.fail(f"the child exited with {proc.returncode} and no result: {proc.stderr[-3000:]}")
    return outcomes
