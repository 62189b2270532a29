"""Keep freed activation memory in the process: glibc's defaults make CPU inference page-fault on every layer.

A MobileViTV2 forward on the CPU allocates and frees tensors of 4-16 MB per layer. glibc serves those with
mmap (above its dynamic threshold) or trims them off the top of the heap once freed, so the next layer gets
fresh pages from the kernel and touches each of them once more: measured, that halved the throughput of the
unmodified model (22-26 vs 42-44 images/s at 256x256, fp32, 2 cores). With large blocks kept in the heap
the same memory is reused from layer to layer. The peak resident set is unchanged (the run's largest
working set is reached either way); memory freed after the peak is not handed back until the process ends.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for this setting: larger blocks are rare and stay mmap'd
TRIM_THRESHOLD = 1 << 30  # hand memory back only when a whole GiB is free at the top of the heap
TOP_PAD = 64 << 20  # grow the heap in steps of 64 MB rather than one activation at a time


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for inference; False where it does not apply (not glibc, or the user tuned it)."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False  # the user's own allocator settings win
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False  # macOS, musl, Windows: other allocators, other defaults
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
