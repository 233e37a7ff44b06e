"""JAX's persistent compilation cache, so a restarted or repeated job skips XLA compilation.

Compiling the full-width CorrDiff training step takes about a minute on a CPU and longer for
large grids; loading it from the cache takes seconds (figures: benchmarks/results). In a
multi-process job one process compiles each program, writes the cache and hands the binary
to the others (``jax_share_binary_between_hosts``), so N processes neither compile N times
nor race to write the same entries.
"""

from __future__ import annotations

import os

import jax

DEFAULT_SUBDIR = "compilation_cache"


def cache_dir(setting: str, workdir: str) -> str | None:
    """The cache directory for a run: ``setting`` if given, WORKDIR/compilation_cache if empty,
    none for ``"off"``."""
    if setting == "off":
        return None
    return setting or os.path.join(workdir, DEFAULT_SUBDIR)


def enable_compilation_cache(directory: str | None) -> None:
    """Cache every compiled program in ``directory`` (None: leave caching off)."""
    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache everything that took over a second to compile, whatever its size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.process_count() > 1:
        jax.config.update("jax_share_binary_between_hosts", True)
