"""Returning freed heap memory to the operating system (jax_corrdiff.host_memory)."""

import ctypes
import os
import sys

import numpy as np
import pytest

from jax_corrdiff.host_memory import release_freed_memory

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from harness import current_rss_bytes, heap_bytes_in_use, rss_after_running, start_running_peak  # noqa: E402

CHUNK = 64 * 1024  # below glibc's mmap threshold, so the chunks come from the heap
CHUNKS = 2000  # 131 MB


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc"), reason="needs a C library with malloc")
def test_freed_heap_pages_go_back_to_the_system():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(CHUNK) for _ in range(CHUNKS)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, CHUNK)
    # A live block after the freed ones keeps the allocator from trimming the heap's top by itself.
    pin = libc.malloc(CHUNK)
    ctypes.memset(pin, 1, CHUNK)
    for chunk in chunks:
        libc.free(chunk)
    freed_but_resident = current_rss_bytes()
    release_freed_memory()
    returned = freed_but_resident - current_rss_bytes()
    libc.free(pin)
    assert returned > CHUNKS * CHUNK // 2


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's clear_refs")
@pytest.mark.skipif("tcmalloc" in os.environ.get("LD_PRELOAD", ""), reason="TCMalloc keeps the freed 400 MB resident")
def test_running_peak_leaves_out_what_ran_before():
    """The benchmarks' running peak: 400 MB touched and freed before the window, 100 MB in it."""
    before = np.ones(50_000_000)
    del before
    peak_before = start_running_peak()
    inside = np.ones(12_500_000)
    memory = rss_after_running(peak_before)
    del inside
    assert memory["peak_rss_bytes"] - memory["running_peak_rss_bytes"] > 250e6
    assert memory["running_peak_rss_bytes"] >= 100e6


@pytest.mark.skipif(heap_bytes_in_use() is None, reason="needs TCMalloc or glibc's mallinfo2")
def test_heap_in_use_counts_an_object_until_it_is_freed():
    """What ``speed.py``'s ``executable_heap_bytes`` rests on: 100 MB held, then freed."""
    before = heap_bytes_in_use()
    held = np.ones(12_500_000)
    holding = heap_bytes_in_use()
    del held
    assert 100e6 <= holding - before < 101e6
    assert heap_bytes_in_use() - before < 1e6
