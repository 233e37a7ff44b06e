"""Compiled programs kept across runs under a key known before tracing, so a restarted job
neither traces nor compiles its training step or its sampling program.

JAX's persistent compilation cache (``compilation_cache``) keys a program by its lowered
module: a warm start there still traces and lowers the step in Python, 6.0 s of the 448 x 448
Taiwan diffusion step's 15.7 s warm start on a 2-core Xeon (10.1 s loaded from this cache), and
tracing alone is 4 of the 32-channel 64 x 64 step's 13.5 s (benchmarks/README.md, *A warm start
without tracing*). This cache keys the compiled executable on what the traced program is a
function of:

- the caller's description of the program: for training, ``Stage.description`` (the run config
  without the loop's own settings, the stage, the data's grid, lead times and normalisation, the
  reprs of the networks the loss closes over) and the shapes of the batch and the frozen
  variables; for generation, the reprs of the networks, conditioning and sampler it closes over
  and the shapes of its arguments (``describe_objects``: a Flax module's repr lists every
  attribute);
- this package's source, the versions of the libraries that trace and compile it, XLA_FLAGS and
  JAX's configuration;
- the backend, the mesh with its devices, this process's place in the job, and the host CPU's
  features (XLA:CPU compiles for them).

A description must therefore name every input of the trace that the source does not fix: one
left out would serve runs that differ in it a program traced for another value. A cache
directory is trusted as the code is: what it holds runs (native code and pickled tree
structures), as in JAX's own cache.

Entries are never evicted (one per program and version of the source, 32 MB for the full-width
Taiwan diffusion step); deleting any of them costs only a compile.

Only programs XLA compiled are kept. When JAX's persistent cache serves one instead (the same
module under another key: an edit that left the program unchanged), it is used and not kept:
XLA:CPU 0.10.2 serialises a program it loaded without its kernels' object code, and such an
entry would load, then fail at its first call. Such a run starts as before, from JAX's cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.sharding import Mesh

from jax_corrdiff.compiler_options import cpu_flags
from jax_corrdiff.host_memory import compile_then_release, release_freed_memory

log = logging.getLogger("jax_corrdiff")

SUBDIR = "executables"  # under the run's compilation cache directory
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")


@functools.cache
def source_digest() -> str:
    """SHA-256 of this package's Python source, file names included."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _environment(mesh: Mesh) -> dict:
    """Everything outside a program's description that its trace or its compiled code depends on."""
    jax_config = {k: v for k, v in jax.config.values.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {
        "source": source_digest(),
        "libraries": {name: importlib.metadata.version(name) for name in _LIBRARIES},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_config": jax_config,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),  # a context's, when one is set
        "platform": [jax.default_backend(), jax.devices()[0].client.platform_version],
        "mesh": {
            "axes": dict(mesh.shape),
            "devices": [(d.id, d.device_kind, d.process_index) for d in mesh.devices.flat],
        },
        "process": [jax.process_index(), jax.process_count()],
        "cpu_flags": sorted(cpu_flags()),
    }


def directory() -> str | None:
    """The executable cache of this process: ``executables/`` in JAX's persistent cache
    directory (``compilation_cache.enable_compilation_cache``), none where that is unset."""
    jax_cache = jax.config.jax_compilation_cache_dir
    return os.path.join(jax_cache, SUBDIR) if jax_cache else None


def describe_objects(*objects: Any) -> list[str] | None:
    """The reprs of Flax modules, dataclasses and plain values a program closes over: for Flax
    modules every attribute, so the network's whole definition. None where a repr would not
    tell two objects apart (numpy's summary of a long array, an object known only by address)."""
    texts = [repr(o) for o in objects]
    return None if any("..." in t or " at 0x" in t for t in texts) else texts


def describe_arguments(tree: Any) -> list:
    """Path, shape, dtype and sharding of each array (or ``jax.ShapeDtypeStruct``) of ``tree``."""
    return [
        [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype), str(getattr(leaf, "sharding", None))]
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def program_key(description: dict, mesh: Mesh) -> str:
    """The cache key of the program ``description`` names, compiled for ``mesh`` here."""
    contents = {"description": description, "environment": _environment(mesh)}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


def load_or_compile(
    directory: str | None, description: dict | None, mesh: Mesh, lower: Callable[[], jax.stages.Lowered]
) -> jax.stages.Compiled:
    """The program ``description`` names, for ``mesh``: loaded from ``directory`` when cached
    there, else ``lower()`` compiled (``compile_then_release``) and written there. Always
    compiled where there is no directory, or no description (``describe_objects`` could not
    tell what the program closes over)."""
    if directory is None or description is None:
        return compile_then_release(lower)
    path = os.path.join(directory, f"{program_key(description, mesh)}.executable")
    start = time.perf_counter()
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=list(mesh.devices.flat)
            )
        except Exception as error:  # noqa: BLE001 - truncated, or written by an incompatible jaxlib
            log.warning("%s cannot be loaded (%s: %s); compiling again", path, type(error).__name__, error)
        else:
            del payload
            release_freed_memory()  # the file's bytes, before the program first runs
            log.info("%s loaded from %s in %.1f s", description.get("program"), path, time.perf_counter() - start)
            return compiled
    compiled, served_by_jax_cache = _compile_noting_jax_cache_hits(lower)
    log.info("%s compiled in %.1f s", description.get("program"), time.perf_counter() - start)
    if served_by_jax_cache:
        # XLA:CPU 0.10.2 serialises a program it loaded without its kernels' object code: kept
        # here, it would load, then fail at its first call ("Function ... not found").
        log.info("%s came from JAX's persistent cache: not kept in %s", description.get("program"), directory)
        return compiled
    try:
        write_atomically(path, pickle.dumps(serialize_executable.serialize(compiled)))
    except Exception as error:  # noqa: BLE001 - a backend that cannot serialise it, a directory not writable
        log.warning(
            "%s cannot be cached in %s (%s: %s)", description.get("program"), directory, type(error).__name__, error
        )
    release_freed_memory()  # the serialised copy's pages, before the program first runs
    return compiled


class FirstCallProgram:
    """``fn`` (a jitted function over ``mesh``) compiled for the arguments of its first call,
    which every later call repeats in shape (generation's batches, ``Batch.sharded``): loaded
    untraced from this process's cache ``directory()`` where an earlier run kept it.
    ``description`` names the program without its arguments (``load_or_compile``); the first
    call's argument shapes complete it."""

    def __init__(self, fn, mesh: Mesh, description: dict | None):
        self._fn, self._mesh, self._description = fn, mesh, description
        self._compiled = None

    def __call__(self, *args):
        if self._compiled is None:
            description = self._description and {**self._description, "arguments": describe_arguments(args)}
            self._compiled = load_or_compile(directory(), description, self._mesh, lambda: self._fn.lower(*args))
        return self._compiled(*args)


# The event JAX records when its persistent cache serves a program instead of XLA compiling it.
JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _compile_noting_jax_cache_hits(lower: Callable[[], jax.stages.Lowered]) -> tuple[jax.stages.Compiled, bool]:
    """``compile_then_release(lower)``, and whether JAX's persistent cache served the program."""
    hits = []

    def note(event: str, **kwargs) -> None:
        if event == JAX_CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(note)
    try:
        compiled = compile_then_release(lower)
    finally:
        jax.monitoring.unregister_event_listener(note)
    return compiled, bool(hits)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: a reader finds
    the whole file or none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    with os.fdopen(handle, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def argument_shapes(compiled: jax.stages.Compiled) -> tuple:
    """The positional arguments ``compiled`` takes, as ``jax.ShapeDtypeStruct`` with shardings."""
    (infos, _), (shardings, _) = compiled.args_info, compiled.input_shardings
    return jax.tree_util.tree_map(
        lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding), infos, shardings
    )
