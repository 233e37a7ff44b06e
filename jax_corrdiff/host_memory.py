"""Returning the host heap's freed memory to the operating system between phases of a job.

XLA's compiler frees most of its working memory when it is done (1.6 GB for the full-width
CorrDiff diffusion step on CPU), but the allocator keeps the freed pages mapped, scattered
among live objects. A training step's temporaries are one large block (1.4 GB for that step)
that cannot reuse scattered pages, so the first step mapped it on top and the process's peak
resident memory held both (benchmarks/README.md, *Memory, and the warm start*). Handing the
freed pages back after compiling lets the peak be the larger of the two instead of their sum:
for that step, peak resident memory 5.14 -> 4.72 GB under TCMalloc and 5.72 -> 4.34 GB under
glibc (``benchmarks/results/peak_rss_release_cpu*.json``).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable
from typing import Any


@functools.cache
def _allocator():
    """The loaded allocator's release call: TCMalloc's (``launch/cpu_env.sh`` preloads it) or
    glibc's ``malloc_trim``; None for other C libraries."""
    process = ctypes.CDLL(None)
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        return process.MallocExtension_ReleaseFreeMemory
    if hasattr(process, "malloc_trim"):
        return functools.partial(process.malloc_trim, 0)
    return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (a no-op where the allocator has
    no such call); Python's unreachable objects are collected first so their memory counts."""
    gc.collect()
    release = _allocator()
    if release is not None:
        release()


def compile_then_release(lower: Callable[[], Any]):
    """``lower().compile()``, then ``release_freed_memory`` before the program first runs and
    maps its temporaries.

    ``lower`` returns a ``jax.stages.Lowered``; it is called here so that, when it also builds
    the ``jax.jit`` object, neither that object nor the lowered module outlives the compile: the
    jit object's cached traces of the full-width CorrDiff regression step stay resident otherwise
    (0.15 GB)."""
    compiled = lower().compile()
    release_freed_memory()
    return compiled
