"""Where a run's persistent compilation cache lives (jax_corrdiff.compilation_cache.cache_dir)."""

import jax
import pytest

from jax_corrdiff.compilation_cache import cache_dir


@pytest.fixture
def jax_cache_setting():
    """Set JAX's own cache directory for one test (as JAX_COMPILATION_CACHE_DIR would), then
    restore it. The setting only: the cache of this process is already open and stays where it is."""
    before = jax.config.jax_compilation_cache_dir
    yield lambda value: jax.config.update("jax_compilation_cache_dir", value)
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_cache_set_for_jax_is_the_default_over_the_workdirs(jax_cache_setting):
    jax_cache_setting(None)
    assert cache_dir("", "/runs/a") == "/runs/a/compilation_cache"
    jax_cache_setting("/site/jax_cache")
    assert cache_dir("", "/runs/a") == "/site/jax_cache"
    assert cache_dir("/mine", "/runs/a") == "/mine"
    assert cache_dir("off", "/runs/a") is None
