"""Compiled training steps kept across runs (jax_corrdiff.executable_cache): loaded without
tracing, keyed on what the step is traced from."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import smoke

from jax_corrdiff import executable_cache
from jax_corrdiff.mesh import make_mesh, replicated
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.loop import (
    batch_shapes,
    compile_train_step,
    lower_train_step,
    state_shapes,
    train_state_shapes_of,
)
from jax_corrdiff.training.stage import build_stage


def _lowering(calls: list, factor: float):
    """``lower()`` of a step that donates its state, appending to ``calls`` when it traces;
    ``factor`` makes it a program no other test compiles."""
    state = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=replicated(make_mesh(2)))}

    def step(state):
        calls.append("traced")
        return {"w": state["w"] * factor}, jnp.sum(state["w"])

    return lambda: jax.jit(step, donate_argnums=0).lower(state)


def test_a_cached_program_is_loaded_without_tracing_and_runs_as_compiled(tmp_path, caplog):
    calls, description, mesh = [], {"program": "test"}, make_mesh(2)
    key = executable_cache.program_key(description, mesh)
    compiled = executable_cache.load_or_compile(str(tmp_path), description, mesh, _lowering(calls, 2.0))
    loaded = executable_cache.load_or_compile(str(tmp_path), description, mesh, _lowering(calls, 2.0))
    assert calls == ["traced"] and os.listdir(tmp_path) == [f"{key}.executable"]
    shapes = executable_cache.argument_shapes(loaded)[0]
    assert shapes["w"].shape == (3,) and shapes["w"].sharding == replicated(make_mesh(2))
    state = {"w": jax.device_put(np.arange(3.0, dtype=np.float32), shapes["w"].sharding)}
    expected = compiled({"w": jnp.copy(state["w"])})
    jax.tree.map(np.testing.assert_array_equal, loaded(state), expected)
    assert state["w"].is_deleted()  # the loaded program donates the state as the compiled one
    # A damaged entry is compiled again and replaced.
    with open(tmp_path / f"{key}.executable", "wb") as f:
        f.write(b"truncated")
    with caplog.at_level(logging.WARNING, logger="jax_corrdiff"):
        executable_cache.load_or_compile(str(tmp_path), description, mesh, _lowering(calls, 2.0))
    assert calls == ["traced", "traced"] and "cannot be loaded" in caplog.text
    executable_cache.load_or_compile(str(tmp_path), description, mesh, _lowering(calls, 2.0))
    assert calls == ["traced", "traced"]
    # A program that could not be described (describe_objects gave None) is compiled, not kept.
    executable_cache.load_or_compile(str(tmp_path / "undescribed"), None, mesh, _lowering(calls, 2.0))
    assert calls == ["traced", "traced", "traced"] and not os.path.exists(tmp_path / "undescribed")


def test_a_cache_that_cannot_be_written_warns_and_the_program_runs(tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    calls, mesh = [], make_mesh(2)
    with caplog.at_level(logging.WARNING, logger="jax_corrdiff"):
        compiled = executable_cache.load_or_compile(
            str(blocked / "cache"), {"program": "p"}, mesh, _lowering(calls, 4.0)
        )
    assert "cannot be cached" in caplog.text
    sharding = executable_cache.argument_shapes(compiled)[0]["w"].sharding
    np.testing.assert_array_equal(compiled({"w": jax.device_put(np.ones(3, np.float32), sharding)})[0]["w"], [4.0] * 3)


@pytest.fixture
def jax_cache_keeps_everything():
    """JAX's persistent cache (the test run's, conftest.py) keeps programs however fast they compiled."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def test_a_program_jax_cache_served_is_not_kept(tmp_path, jax_cache_keeps_everything):
    """XLA:CPU serialises a program it loaded from JAX's cache without its kernels, which then
    fail when the program runs; only programs XLA compiled are kept."""
    calls, mesh, first, second = [], make_mesh(2), str(tmp_path / "first"), str(tmp_path / "second")
    executable_cache.load_or_compile(first, {"program": "compiled"}, mesh, _lowering(calls, 3.0))
    served = executable_cache.load_or_compile(second, {"program": "served"}, mesh, _lowering(calls, 3.0))
    assert calls == ["traced", "traced"] and len(os.listdir(first)) == 1 and not os.path.exists(second)
    loaded = executable_cache.load_or_compile(first, {"program": "compiled"}, mesh, _lowering(calls, 3.0))
    assert calls == ["traced", "traced"]
    sharding = executable_cache.argument_shapes(loaded)[0]["w"].sharding
    for program in (served, loaded):
        state = {"w": jax.device_put(np.ones(3, np.float32), sharding)}
        np.testing.assert_array_equal(program(state)[0]["w"], [3.0, 3.0, 3.0])


def test_the_key_follows_the_description_the_mesh_and_the_environment(monkeypatch):
    key, mesh = executable_cache.program_key, make_mesh(2)
    plain = key({"a": 1}, mesh)
    assert key({"a": 1}, make_mesh(2)) == plain
    assert key({"a": 2}, mesh) != plain
    assert key({"a": 1}, make_mesh(4)) != plain
    with jax.default_matmul_precision("highest"):
        assert key({"a": 1}, mesh) != plain
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert key({"a": 1}, mesh) != plain


def test_objects_are_described_by_their_whole_repr_or_not_at_all():
    import flax.linen as nn

    class Tiny(nn.Module):
        width: int
        kind: str = "a"

    described = executable_cache.describe_objects(Tiny(3), (1, "a"), 2.5)
    assert "width = 3" in described[0] and "kind = 'a'" in described[0] and described[1:] == ["(1, 'a')", "2.5"]
    assert described != executable_cache.describe_objects(Tiny(4), (1, "a"), 2.5)
    assert executable_cache.describe_objects(np.zeros(2000)) is None  # numpy's summary: "..."
    assert executable_cache.describe_objects(lambda x: x) is None  # known only by its address


def _stage_and_batch(config, workdir):
    data = TrainingData.open(config, workdir)
    stage = build_stage(config, "regression", workdir, data)
    return stage, batch_shapes(stage)


def test_settings_left_out_of_the_key_do_not_change_the_step(tmp_path):
    """``Stage.description`` leaves out the loop's own settings and which stages run: the step
    traced with other values of all of them is the same program. A setting of the step changes
    the description."""
    workdir = str(tmp_path)
    stage, batch = _stage_and_batch(smoke(4), workdir)
    every = {f"regression.training.{k}": 3 for k in ("eval_batches", "keep_checkpoints", "log_every_steps")}
    other, other_batch = _stage_and_batch(smoke(9, stage="all", compilation_cache_dir="off", **every), workdir)
    assert other.description == stage.description
    with jax.default_matmul_precision("highest"):
        assert lower_train_step(other, other_batch).as_text() == lower_train_step(stage, batch).as_text()
    for setting in ({"regression.training.lr": 3e-4}, {"regression.training.ema_halflife_samples": 10}):
        assert _stage_and_batch(smoke(4, **setting), workdir)[0].description != stage.description


def test_a_compiled_or_loaded_step_takes_the_traced_state_shapes(tmp_path):
    # A learning rate no other test trains with: a program JAX's cache (the run's) has not seen,
    # which XLA compiles and the executable cache keeps.
    stage, batch = _stage_and_batch(smoke(4, **{"regression.training.lr": 1.234e-3}), str(tmp_path))
    executables = str(tmp_path / "executables")
    with jax.default_matmul_precision("highest"):
        compiled = compile_train_step(stage, batch, executables)
        loaded = compile_train_step(stage, batch, executables)
        traced = state_shapes(stage)
    assert len(os.listdir(executables)) == 1
    for step in (compiled, loaded):
        shapes = train_state_shapes_of(step)
        assert jax.tree.structure(shapes) == jax.tree.structure(traced)
        same = jax.tree.map(
            lambda a, b: (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding), shapes, traced
        )
        assert all(jax.tree.leaves(same))
