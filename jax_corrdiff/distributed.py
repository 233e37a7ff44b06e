"""Multi-process start-up: ``initialize()`` is the first thing the entry points call.

Which processes form one JAX job is read from the environment:

1. ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID``: what ``launch/local.sh`` exports, and what any cluster launcher can set
   (Kubernetes, torchrun-style wrappers, a hand-written ssh loop, ...).
2. Under SLURM with more than one task (``SLURM_NTASKS`` > 1): ``jax.distributed.initialize()``
   detects coordinator, process count and id from SLURM's variables.
3. ``JAX_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` with JAX's own cluster detection
   (Cloud TPU pods, Open MPI ``mpirun``, Kubernetes JobSets).
4. Otherwise nothing: one process, all local devices.

On CPU, cross-process collectives use Gloo (``jax_cpu_collectives_implementation``; JAX's
default, set explicitly unless the environment chose another). The number of CPU devices
per process comes from ``JAX_NUM_CPU_DEVICES`` (or ``--xla_force_host_platform_device_count``
in ``XLA_FLAGS``), read by JAX itself.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("jax_corrdiff")

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def describe_environment() -> str:
    """Which of the rules above applies (for logs and errors)."""
    if all(os.environ.get(k) for k in _EXPLICIT):
        return "explicit (JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "SLURM"
    if os.environ.get("JAX_DISTRIBUTED", "").lower() == "auto":
        return "auto-detect (JAX_DISTRIBUTED=auto)"
    return "single process"


def initialize() -> None:
    """Join the multi-process JAX job the environment describes (a no-op for one process).

    Must run before anything touches a JAX backend (``jax.devices()``, any computation).
    Calling it again after a successful initialization does nothing.
    """
    if jax.distributed.is_initialized():
        return
    present = [k for k in _EXPLICIT if os.environ.get(k)]
    if present and len(present) != len(_EXPLICIT):
        missing = sorted(set(_EXPLICIT) - set(present))
        raise RuntimeError(f"multi-process environment is incomplete: {present} set but {missing} missing")
    mode = describe_environment()
    if mode == "single process":
        return
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if present:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    log.info(
        "jax.distributed: %s, process %d of %d, %d local / %d global devices",
        mode,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


_barrier_count = 0


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches this point (a no-op for one process).

    First a barrier of the coordination service, which waits as long as ``timeout_s``: a device
    collective alone (``multihost_utils.sync_global_devices``) builds its Gloo context on CPU
    the first time and gives up when the processes arrive more than 30 s apart, as they do while
    process 0 alone prepares data or writes a model. Then that collective, now with every
    process present, so the Gloo context later collectives (Orbax's, the train step's) use
    exists. Every process must pass the same barriers in the same order.
    """
    global _barrier_count
    if jax.process_count() == 1:
        return
    _barrier_count += 1
    from jax._src.distributed import global_state  # the client jax.distributed.initialize made

    global_state.client.wait_at_barrier(f"jax_corrdiff {_barrier_count} {name}", int(timeout_s * 1000))
    multihost_utils.sync_global_devices(f"jax_corrdiff {name}")
