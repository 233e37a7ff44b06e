"""The device mesh and how arrays are laid out on it.

Mesh axes (the one place they are named):
    DATA_AXIS  "data": the batch dimension is split across these devices; parameters,
               optimizer state and EMA are replicated, and XLA all-reduces gradients.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D data-parallel mesh over the first ``num_devices`` devices (0 = all of them)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("with several processes the mesh must use every device (num_devices=0)")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch; the batch must split evenly over devices."""
    if global_batch % mesh.size:
        raise ValueError(f"global batch {global_batch} does not split over {mesh.size} devices")
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return global_batch // mesh.size * local_devices


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded along the batch dimension."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _local_rows(n: int, mesh: Mesh) -> slice:
    """This process's contiguous rows of an n-row batch sharded over the data axis."""
    per_device = n // mesh.size
    local = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    return slice(local[0] * per_device, (local[-1] + 1) * per_device)


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same whole batch on every process -> a global array; each process contributes its rows."""
    rows = _local_rows(len(array), mesh)
    return jax.make_array_from_process_local_data(batch_sharded(mesh), array[rows], array.shape)


def shard_keys(keys: jax.Array, mesh: Mesh) -> jax.Array:
    """``shard_batch`` for an array of PRNG keys."""
    return jax.random.wrap_key_data(shard_batch(np.asarray(jax.random.key_data(keys)), mesh))
