"""launch/cpu_env.sh: the allocator CPU jobs and the side-by-side benchmarks run under."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "cpu_env.sh")
_SET_BY_IT = ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES")
# TCMalloc's own reading of its thread-cache cap: a misspelt variable would be ignored silently.
_CAP_AS_TCMALLOC_READS_IT = (
    "import ctypes; value = ctypes.c_size_t(); "
    "ctypes.CDLL(None).MallocExtension_GetNumericProperty("
    "b'tcmalloc.max_total_thread_cache_bytes', ctypes.byref(value)); print(value.value)"
)


def _after_sourcing(command: str, **preset: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _SET_BY_IT} | preset
    script = f'source "{SCRIPT}"; {command}'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout.strip()


def _tcmalloc_installed() -> bool:
    return "tcmalloc" in _after_sourcing('echo "$LD_PRELOAD"')


def test_without_tcmalloc_glibc_gets_huge_pages():
    if _tcmalloc_installed():
        pytest.skip("TCMalloc is installed")
    assert _after_sourcing('echo "$GLIBC_TUNABLES"') == "glibc.malloc.hugetlb=1"


def test_tcmalloc_runs_with_its_thread_caches_capped_at_1_mb_unless_set():
    if not _tcmalloc_installed():
        pytest.skip("TCMalloc is not installed")
    python = f'"{sys.executable}" -c "{_CAP_AS_TCMALLOC_READS_IT}"'
    assert int(_after_sourcing(python)) == 1 << 20
    assert int(_after_sourcing(python, TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES="4194304")) == 4 << 20
