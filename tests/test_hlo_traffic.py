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


def test_a_loop_step_is_broken_down_by_source_operation_over_layers():
    """Two layers' matmuls are one source (layer numbers become #), and the sources add up to
    the loop step."""
    w = jnp.ones((256, 256), jnp.float32)

    def body(i, y):
        with jax.named_scope("layer1"):
            y = jnp.tanh(y @ w)
        with jax.named_scope("layer2"):
            return jnp.tanh(y @ w)

    traffic = hlo_traffic.program_traffic(_compiled_text(lambda y: jax.lax.fori_loop(0, 3, body, y), w))
    by_source = traffic["loop_bytes_by_source"]
    assert by_source["layer#/dot_general"] == [2, 2 * 3 * w.nbytes]  # y and w read, y written
    assert sum(kernels for kernels, _ in by_source.values()) == traffic["loop_kernels"]
    assert sum(moved for _, moved in by_source.values()) == traffic["loop_kernel_bytes"]


# A GroupNorm's shift on a GPU (``models.normalization``): one value per group of a decoder
# block's input, the concatenation of its two halves, which XLA:GPU leaves unmaterialised.
_SLICE_OF_A_CONCATENATION = """HloModule shift

%fused_slice (p0: bf16[1,448,448,128], p1: bf16[1,448,448,128]) -> f32[1,1,1,32] {
  %p0 = bf16[1,448,448,128]{3,2,1,0} parameter(0)
  %p1 = bf16[1,448,448,128]{3,2,1,0} parameter(1)
  %concatenate = bf16[1,448,448,256]{3,2,1,0} concatenate(%p0, %p1), dimensions={3}
  %convert = f32[1,448,448,256]{3,2,1,0} convert(%concatenate)
  ROOT %slice = f32[1,1,1,32]{3,2,1,0} slice(%convert), slice={[0:1:1], [0:1:1], [0:1:1], [0:256:8]}
}

ENTRY %main (a: bf16[1,448,448,128], b: bf16[1,448,448,128]) -> f32[1,1,1,32] {
  %a = bf16[1,448,448,128]{3,2,1,0} parameter(0)
  %b = bf16[1,448,448,128]{3,2,1,0} parameter(1)
  ROOT %shift = f32[1,1,1,32]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_slice
}
"""


def test_a_slice_of_a_fused_concatenation_reads_the_slice_of_each_half():
    """Each output element reads one element of one half: not the halves' 2 x 51 MB."""
    traffic = hlo_traffic.program_traffic(_SLICE_OF_A_CONCATENATION)
    assert traffic["kernels"] == 1
    assert traffic["kernel_bytes"] <= 3 * 32 * 4  # each half at most the slice, and the slice
