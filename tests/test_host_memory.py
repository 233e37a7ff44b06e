"""Returning freed heap memory to the operating system (jax_corrdiff.host_memory)."""

import ctypes

import pytest

from jax_corrdiff.host_memory import release_freed_memory

CHUNK = 64 * 1024  # below glibc's mmap threshold, so the chunks come from the heap
CHUNKS = 2000  # 131 MB


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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
    freed_but_resident = _resident_bytes()
    release_freed_memory()
    returned = freed_but_resident - _resident_bytes()
    libc.free(pin)
    assert returned > CHUNKS * CHUNK // 2
