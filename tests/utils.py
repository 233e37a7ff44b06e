"""Helpers shared by tests."""

import jax
import jax.numpy as jnp
import numpy as np


def redraw_params(variables, key):
    """Replace every parameter by a draw that makes it matter (DDPM++ init hides most of
    the network behind 1e-5-scaled output convs): kernels N(0, 1/fan_in), biases
    N(0, 0.1^2), GroupNorm scales 1 + N(0, 0.1^2), embeddings N(0, 1)."""
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    keys = jax.random.split(key, len(flat))
    new = {}
    for (path, leaf), k in zip(flat, keys):
        name = path[-1].key
        noise = jax.random.normal(k, leaf.shape, jnp.float32)
        if name == "kernel":
            value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * noise
        elif name == "bias":
            value = 0.1 * noise
        else:
            value = noise
        new[tuple(p.key for p in path)] = value
    params = jax.tree_util.tree_map_with_path(lambda p, _: new[tuple(q.key for q in p)], variables["params"])
    return {**variables, "params": params}
