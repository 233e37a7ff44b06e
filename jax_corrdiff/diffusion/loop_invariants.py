"""Casts a sampling loop would repeat at every network evaluation, taken once before it."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend as jex
import jax.numpy as jnp


def with_casts_hoisted(network: Callable, *example_args) -> Callable:
    """``network`` with each value it closes over that it only ever casts to one narrower dtype
    (a bf16 network's float32 weights) cast once, here, outside the loop that calls it.

    A network computing in bf16 keeps float32 parameters and converts each where it uses it. In
    a sampling loop those converts are loop-invariant, and XLA:GPU does not move them out of
    it: compiled for an H100, each step of the 448 x 448 18-step Heun loop ran 270 kernels
    that converted the convolutions' and matmuls' weights and biases, 11% of its kernels
    (``benchmarks/gpu_aot_compile.py``). Traced here with ``example_args`` (shaped and typed as
    the loop's calls), the network's program shows which closed-over values reach it only
    through a convert: those are converted now and the network runs on them, an identical
    program without the converts. Values used any other way (GroupNorm's float32 scale and
    bias, the conditioning) are left as they are.
    """
    closed, out_shape = jax.make_jaxpr(network, return_shape=True)(*example_args)
    jaxpr = closed.jaxpr
    uses: dict = {var: set() for var in jaxpr.constvars}
    for eqn in jaxpr.eqns:
        converts_to = eqn.params["new_dtype"] if eqn.primitive.name == "convert_element_type" else None
        for var in eqn.invars:
            if isinstance(var, jex.core.Var) and var in uses:
                uses[var].add(converts_to)
    for var in jaxpr.outvars:
        if isinstance(var, jex.core.Var) and var in uses:
            uses[var].add(None)
    consts = []
    for var, value in zip(jaxpr.constvars, closed.consts):
        (dtype,) = uses[var] if len(uses[var]) == 1 else (None,)
        narrower = dtype is not None and jnp.dtype(dtype).itemsize < jnp.dtype(var.aval.dtype).itemsize
        consts.append(jnp.asarray(value).astype(dtype) if narrower else value)
    hoisted = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(jaxpr, consts))
    tree = jax.tree_util.tree_structure(out_shape)
    return lambda *args: jax.tree_util.tree_unflatten(tree, hoisted(*args))
