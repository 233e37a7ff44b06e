"""benchmarks/hlo_traffic.py: the kernels and bytes of a compiled program, from its HLO text."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import hlo_traffic  # noqa: E402


def _compiled_text(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_a_loop_body_counts_once_per_trip():
    """sin(y) * 2 five times over a 2 MB array: each step reads and writes it once."""
    x = jnp.ones((500, 1000), jnp.float32)
    traffic = hlo_traffic.program_traffic(
        _compiled_text(lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) * 2, x), x)
    )
    step = 2 * x.nbytes
    assert step <= traffic["loop_kernel_bytes"] <= step + 64
    assert 5 * traffic["loop_kernel_bytes"] <= traffic["kernel_bytes"] <= 5 * traffic["loop_kernel_bytes"] + 2 * step
    assert traffic["kernels"] >= 5 * traffic["loop_kernels"] >= 5


def test_an_operand_read_through_a_slice_counts_as_the_slice():
    """exp(x) * 2 of the first 10 of 1000 rows: XLA computes those rows only."""
    x = jnp.ones((1000, 1000), jnp.float32)
    traffic = hlo_traffic.program_traffic(_compiled_text(lambda x: (jnp.exp(x) * 2)[:10], x))
    assert "loop_kernels" not in traffic
    assert traffic["kernel_bytes"] == 2 * 10 * 1000 * 4


def test_tuple_shapes_with_index_comments_are_read():
    """XLA numbers long tuples' elements (/*index=5*/) inside the shape."""
    shape = "(s32[], f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, /*index=5*/bf16[4]{0})"
    assert hlo_traffic.array_bytes(shape) == 4 + 4 * 8 + 8
    line = f"  %while.1 = {shape} while(%tuple.1), condition=%c, body=%b"
    assert hlo_traffic._INSTRUCTION.match(line).group(3) == "while"
