"""Process-level memory settings for merges.

glibc's allocator raises its mmap threshold each time a large block is freed (up to 32 MB), so
after the first tensors of a merge, buffers of up to 32 MB come from the heap, where freed space
fragments and is rarely returned: measured on a merge of 1.25 MB tensors, the peak resident
memory above the interpreter was 30-45 MB with the default, 5.5-7.9 MB with the threshold fixed
at 1 MiB and 6.0-6.3 MB at 64 KiB. A threshold below the blockwise passes' temporaries costs
time instead: each is then a fresh mapping faulted in page by page (on the 1.1B benchmark model,
2.4 million page faults and 15 s of system time for a linear merge). So the threshold follows
the model: an eighth of its largest tensor (:func:`mmap_threshold`).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MIN_THRESHOLD = 1 << 16
MAX_THRESHOLD = 1 << 25  # glibc's own ceiling for its moving threshold (32 MiB on 64-bit)


def mmap_threshold(largest: int) -> int:
    """The threshold for a merge whose largest tensor takes ``largest`` bytes (working
    precision): an eighth of it, between 64 KiB and 32 MiB. Whole tensors and stacks are then
    mapped and unmapped (no fragmentation, returned to the OS at once); the blockwise passes'
    temporaries, smaller, are reused from the heap without new page faults."""
    return min(max(largest // 8, MIN_THRESHOLD), MAX_THRESHOLD)


def tune_malloc(largest: int) -> bool:
    """Fix glibc's mmap threshold for a merge (see :func:`mmap_threshold`); True when set.

    Skipped when not on Linux/glibc, when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves,
    or with ``ALLOYKIT_MALLOC_TUNING=0``.
    """
    if (
        not sys.platform.startswith("linux")
        or "MALLOC_MMAP_THRESHOLD_" in os.environ
        or os.environ.get("ALLOYKIT_MALLOC_TUNING") == "0"
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = mmap_threshold(largest)
    # and keep freed heap memory up to twice that (glibc's own ratio when it moves the
    # threshold): returning every freed block to the OS would fault it in again at once
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * threshold)
    )
