"""JAX's persistent compilation cache, so a restarted or repeated job skips XLA compilation.

Compiling the full-width CorrDiff regression step at 64 x 64 takes about 53 s on 2 idle CPU
cores, and longer for large grids; a cache hit skips it. Every process of a multi-process job
compiles for itself (JAX's ``jax_share_binary_between_hosts`` hands binaries over the
coordination service, which deadlocked against the first Gloo collective in our two-process
test), and the cache's writes are atomic, so processes sharing a directory do not corrupt it.

A cache directory set for JAX itself (``JAX_COMPILATION_CACHE_DIR``, or
``jax_compilation_cache_dir`` set before the run) is the default over WORKDIR/compilation_cache:
a site-wide cache shared by many runs is what that variable is for, and JAX's cache cannot be
moved once a process has compiled anything.

JAX's cache keys a program by its lowered module, so a hit still traces the program in Python;
training keeps its compiled steps under DIRECTORY/executables too (``executable_cache``), keyed
on what the step is traced from, and a restart loads them without tracing.

On a CPU the cache trades memory for time: XLA:CPU keeps a program loaded from it with twice the
host heap of one it has just compiled (the full-width 64 x 64 diffusion step: 632 against 315 MB,
README, *Speed and memory*); ``"off"`` compiles every time instead.
"""

from __future__ import annotations

import os

import jax

DEFAULT_SUBDIR = "compilation_cache"


def cache_dir(setting: str, workdir: str) -> str | None:
    """The cache directory for a run: ``setting`` if given; if empty, JAX's own cache directory
    when one is set, else WORKDIR/compilation_cache; none for ``"off"``."""
    if setting == "off":
        return None
    return setting or jax.config.jax_compilation_cache_dir or os.path.join(workdir, DEFAULT_SUBDIR)


def enable_compilation_cache(directory: str | None) -> None:
    """Cache every compiled program in ``directory`` (None: leave caching off)."""
    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache everything that took over a second to compile, whatever its size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
