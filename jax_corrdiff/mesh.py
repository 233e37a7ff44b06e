"""The device mesh and how arrays are laid out on it.

Mesh axes (the one place they are named):
    DATA_AXIS  "data": the batch dimension is split across these devices; parameters,
               optimizer state and EMA are replicated, and XLA all-reduces gradients.
    TILE_AXIS  "tiles": generation only, with ``tile_devices`` > 1: the multi-diffusion tiles
               of one image are denoised across these devices, so a continental image uses
               several GPUs; the batch of times is replicated along it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
TILE_AXIS = "tiles"


def make_mesh(num_devices: int = 0, tile_devices: int = 1) -> Mesh:
    """A data-parallel mesh over the first ``num_devices`` devices (0 = all of them); with
    ``tile_devices`` > 1 a 2-D (data, tiles) mesh whose rows of ``tile_devices`` devices each
    share one image's tiles."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("with several processes the mesh must use every device (num_devices=0)")
        devices = devices[:num_devices]
    if tile_devices < 1 or len(devices) % tile_devices:
        raise ValueError(f"tile_devices={tile_devices} must be >= 1 and divide the {len(devices)} devices")
    if tile_devices == 1:
        return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    grid = np.asarray(devices).reshape(-1, tile_devices)
    return Mesh(grid, (DATA_AXIS, TILE_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def data_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the size of the data axis)."""
    return mesh.shape[DATA_AXIS]


def tile_sharding(mesh: Mesh) -> NamedSharding | None:
    """Tiles of one image split over the tile axis (None for a data-parallel mesh)."""
    return NamedSharding(mesh, PartitionSpec(TILE_AXIS)) if TILE_AXIS in mesh.axis_names else None


def _local_data_rows(mesh: Mesh) -> list[int]:
    """Indices along the data axis that have a device of this process."""
    rows = mesh.devices.reshape(data_size(mesh), -1)
    return [i for i, row in enumerate(rows) if any(d.process_index == jax.process_index() for d in row)]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def placed_shapes(tree, sharding: NamedSharding):
    """``tree``'s arrays (or shapes) as ``ShapeDtypeStruct``s placed by ``sharding``: what a
    program is lowered from when its arguments need not exist."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch; the batch must split evenly over devices."""
    if global_batch % data_size(mesh):
        raise ValueError(f"global batch {global_batch} does not split over {data_size(mesh)} devices")
    return global_batch // data_size(mesh) * len(_local_data_rows(mesh))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded along the batch dimension."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _local_rows(n: int, mesh: Mesh) -> slice:
    """This process's contiguous rows of an n-row batch sharded over the data axis."""
    per_row = n // data_size(mesh)
    local = _local_data_rows(mesh)
    return slice(local[0] * per_row, (local[-1] + 1) * per_row)


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same whole batch on every process -> a global array; each process contributes its rows."""
    rows = _local_rows(len(array), mesh)
    return jax.make_array_from_process_local_data(batch_sharded(mesh), array[rows], array.shape)


def shard_keys(keys: jax.Array, mesh: Mesh) -> jax.Array:
    """``shard_batch`` for an array of PRNG keys."""
    return jax.random.wrap_key_data(shard_batch(np.asarray(jax.random.key_data(keys)), mesh))
