#!/usr/bin/env bash
# Memory allocator for CPU runs, sourced by launch/demo.sh and launch/local.sh (and before the
# side-by-side benchmarks, so both sides run under it):
#   source launch/cpu_env.sh
# XLA:CPU allocates each training step's temporaries as one block from a worker thread (315 MB
# for the 32-channel 64 x 64 step, 1.4 GB at full width). glibc serves a thread arena's large
# block by mmap and unmaps it after the step, so every step the kernel zeroes and faults the
# whole block in again (strace: one mmap/munmap pair per step; 0.17-0.22 s of system time per
# full-width step even with huge pages). TCMalloc keeps the freed block for reuse (0.01-0.02 s of
# system time per step): full-width training steps run 11-20% faster, PyTorch's 7-11%
# (benchmarks/README.md, "TCMalloc"). Where it is not installed (Debian/Ubuntu: apt install
# libtcmalloc-minimal4), transparent huge pages at least cut the number of faults. An LD_PRELOAD
# or GLIBC_TUNABLES already set is kept.
# TCMalloc's threads each keep a cache of the small objects they freed (32 MB in all by default),
# and the compiler's threads free a great many: at the peak of the full-width regression step
# they held about 60 MB. Capped at 1 MB in all, the step peaked at 2.676 GB instead of
# 2.739-2.745 GB, its compile and step times unchanged (benchmarks/README.md, "TCMalloc's
# thread caches"). A value already set is kept.
if [[ -z "${LD_PRELOAD:-}" ]]; then
    TCMALLOC=$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}' || true)
    if [[ -n "$TCMALLOC" ]]; then
        export LD_PRELOAD=$TCMALLOC
        export TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES=${TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES:-1048576}
    else
        export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
    fi
fi
