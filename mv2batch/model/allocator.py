"""Memory settings for CPU inference: keep freed activations in the heap, and few oneDNN kernels in the cache.

A MobileViTV2 forward on the CPU allocates and frees tensors of 4-16 MB per layer (up to 55 MB for a whole
photo at short side 512). glibc serves those with mmap (above its dynamic threshold) or trims them off the
top of the heap once freed, so the next layer gets fresh pages from the kernel and touches each of them once
more: measured, that halved the throughput of the unmodified model (22-26 vs 42-44 images/s at 256x256, fp32,
2 cores). With every block kept in the heap the same memory is reused from layer to layer. The peak resident
set is unchanged (the run's largest working set is reached either way); memory freed after the peak is not
handed back until the process ends.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for this setting
# ... and no block is mmap'd at all, not even above that bound: a whole photo's widest activations (128
# channels at half resolution: 55 MB at 512x842) would fault in again at every layer of every photo.
MMAP_MAX = 0
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
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_TOP_PAD, TOP_PAD)))


# oneDNN keeps the kernels it compiled for each exact convolution / reorder problem (shape included) in a
# process-wide cache, 1024 of them by default, and with them memory of their own. A whole-photo segmentation
# run meets a new input shape every few photos (80 shapes in 200 ImageNet photos, ~120 kernels per shape in
# fp32), and the runner keeps equal shapes together, so a shape's kernels are not needed again once its photos
# are done: the default cache only holds on to ~8 stale shapes (peak RSS 3-4 GB instead of 1.5-2 GB, and
# slower). 256 still holds every kernel of a fixed-shape classification run (100-200).
PRIMITIVE_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
PRIMITIVE_CACHE_CAPACITY = 256


def limit_kernel_cache(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> bool:
    """Cap oneDNN's primitive cache; False where the user set it. oneDNN reads the variable once, when this
    process first compiles a kernel, so this only takes effect before the first convolution on the CPU."""
    if any(name in os.environ for name in PRIMITIVE_CACHE_VARIABLES):
        return False
    os.environ[PRIMITIVE_CACHE_VARIABLES[0]] = str(capacity)
    return True
