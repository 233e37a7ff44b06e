"""benchmarks/kernel_profile.py: kernels charged to the source operation they were compiled from."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import harness  # noqa: E402
import kernel_profile  # noqa: E402

HLO = """
%fused_computation.4 (p0: f32[2,8,8,4]) -> f32[3,3,4,4] {
  %p0 = f32[2,8,8,4] parameter(0)
  %transpose.1 = f32[4,8,8,2] transpose(%p0), metadata={op_name="jit(s)/transpose(jvp(U))/u/conv1/transpose"}
  ROOT %convolution.3 = f32[3,3,4,4] convolution(%transpose.1, %p0), metadata={op_name="T/conv_general_dilated"}
}

%fused_computation.5 (p0: f32[2,8,8,4]) -> f32[4,3,3,4] {
  %p0 = f32[2,8,8,4] parameter(0)
  %bitcast.2 = f32[8,8,2,4] bitcast(%p0), metadata={op_name="jit(s)/jvp(U)/u/reshape"}
  ROOT %convolution.4 = f32[4,3,3,4] convolution(%bitcast.2, %p0), window={size=8x8 pad=1_1x1_1}
}

ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %conv.1 = f32[2,8,8,4] convolution(%a, %b), metadata={op_name="jit(s)/jvp(U)/u/conv0/conv_general_dilated"}
  %conv.2 = f32[3,3,4,4] convolution(%c, %d), metadata={op_name="jit(s)/transpose(jvp(U))/u/conv_general_dilated"}
  %fusion.7 = f32[2,8,8,4] fusion(%conv.1), kind=kLoop, calls=%fc, metadata={op_name="jit(s)/jvp(U)/u/norm0/sum"}
  %ynn_fusion.6 = f32[3,3,4,4] fusion(%conv.1), kind=kCustom, calls=%fused_computation.4
  %ynn_fusion.7 = f32[4,3,3,4] fusion(%conv.1), kind=kCustom, calls=%fused_computation.5
  %convolution.8 = f32[4,3,3,4] convolution(%e, %f), window={size=8x8 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %copy.3 = f32[4] copy(%p)
  %all-reduce.5 = f32[4] all-reduce(%conv.2), replica_groups={}
  ROOT %add.9 = f32[4] add(%copy.3, %all-reduce.5), metadata={op_name="jit(s)/add"}
}
"""


def _event(name, ts, dur, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_sources_are_read_from_every_instruction_and_from_the_bodies_of_fusions_without_metadata():
    sources = kernel_profile.instruction_sources(HLO)
    assert sources["conv.2"] == "jit(s)/transpose(jvp(U))/u/conv_general_dilated"
    assert sources["copy.3"] == "" and sources["add.9"] == "jit(s)/add"
    # A fusion without metadata takes its body's convolution's.
    assert sources["ynn_fusion.6"] == "T/conv_general_dilated"
    # XLA's kernel-gradient rewrite carries none: its window (the image) tells it apart.
    assert sources["convolution.8"] == "XLA convolution, window 8x8"
    assert kernel_profile.category("convolution.8", sources["convolution.8"]) == "convolution gradients"
    assert kernel_profile.category("convolution.9", "XLA convolution, window 3x3") == "convolutions"
    assert sources["ynn_fusion.7"] == "XLA convolution, window 8x8"  # preferred to the bitcast's


def test_kernels_are_charged_once_to_their_category_within_the_window():
    sources = kernel_profile.instruction_sources(HLO)
    events = [
        _event("conv.1", 100, 400),
        _event("conv.1", 150, 100),  # nested in the kernel above: not counted again
        _event("conv.2", 500, 300, tid=2),
        _event("fusion.7", 520, 50, tid=3),
        _event("kernel_on_stream", 600, 20, tid=4, hlo_op="copy.3"),  # a GPU kernel names its instruction
        _event("all-reduce.5", 700, 10),
        _event("add.9", 800, 5),
        _event("ThunkExecutor::Execute", 100, 900),  # not an instruction
        _event("add.9", 5000, 5),  # outside the window
    ]
    result = kernel_profile.attribute(events, (100, 1000), sources)
    ms = {name: row["ms"] for name, row in result["categories"].items()}
    assert ms == {
        "convolutions": 0.4,
        "convolution gradients": 0.3,
        "group norm": 0.05,
        "layout copies and transposes inserted by XLA": 0.02,
        "collectives": 0.01,
        "outside the networks (optimizer, EMA, sampler)": 0.005,
    }
    assert result["kernel_ms"] == pytest.approx(sum(ms.values()))
    assert [row["instruction"] for row in result["costliest"][:2]] == ["conv.1", "conv.2"]
    assert abs(sum(row["share"] for row in result["categories"].values()) - 1.0) < 1e-9


def test_a_traced_program_puts_its_time_in_its_convolutions():
    """A real trace of a convolution-heavy CPU program: its kernels are found and most of their
    time is charged to convolutions; the worker-occupancy levels add up to the call's wall time."""

    def program(x, w):
        for _ in range(4):
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(x)

    x, w = jnp.ones((2, 64, 64, 64)), jnp.full((3, 3, 64, 64), 0.01)
    compiled = jax.jit(program).lower(x, w).compile()
    call = lambda: jax.block_until_ready(compiled(x, w))  # noqa: E731
    call()
    events, window = harness.trace_calls(call)
    result = kernel_profile.attribute(events, window, kernel_profile.instruction_sources(compiled.as_text()))
    assert result["categories"]["convolutions"]["kernels"] >= 4
    assert result["categories"]["convolutions"]["share"] > 0.5
    occupancy = harness.worker_occupancy(events, window)
    np.testing.assert_allclose(sum(occupancy.values()), (window[1] - window[0]) / 1e3, rtol=1e-6)


def test_a_residual_block_s_group_norms_are_found_in_its_compiled_gradient():
    """The categories follow the model's own operation names: GroupNorm's statistics appear
    under its scope (``norm1/``) or under ``GroupNorm.recomputable``'s (``norm0.recomputable/``),
    forward and backward."""
    from jax_corrdiff.models.layers import UNetBlock

    x, emb = jnp.ones((2, 8, 8, 16)), jnp.ones((2, 16))
    block = UNetBlock(16)
    params = block.init(jax.random.key(0), x, emb, None)
    gradient = jax.jit(jax.grad(lambda p: jnp.sum(block.apply(p, x, emb, None) ** 2)))
    sources = kernel_profile.instruction_sources(gradient.lower(params).compile().as_text())
    categories = {kernel_profile.category(name, source) for name, source in sources.items()}
    assert {"group norm", "group norm, backward"} <= categories
