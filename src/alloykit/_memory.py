"""Process-level memory settings for merges.

glibc's allocator raises its mmap threshold each time a large block is freed (up to 32 MB), so
after the first tensors of a merge, buffers of up to 32 MB come from the heap, where freed space
fragments and is rarely returned: measured on a merge of 1.25 MB tensors, the peak resident
memory above the interpreter was 30-45 MB with the default, 5.5-7.9 MB with the threshold fixed
at 1 MiB and 6.0-6.3 MB at 64 KiB (``benchmarks/RESULTS.md``). Fixing the threshold makes every
buffer of at least 64 KiB its own mapping, unmapped when freed, so the peak follows the tensors
a merge really holds. (Large tensors are mapped by glibc anyway; the cost is a system call per
block-sized temporary, small next to the arithmetic on it.)
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 16

_tuned = False


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 64 KiB, once per process; True when it is set.

    Skipped when not on Linux/glibc, when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves,
    or with ``ALLOYKIT_MALLOC_TUNING=0``.
    """
    global _tuned
    if _tuned:
        return True
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
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _tuned
