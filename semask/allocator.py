"""Keeping freed CPU memory for reuse: glibc's allocator settings for large-tensor workloads such as training.

glibc serves every allocation above 32 MB with a fresh `mmap` and returns it to the system when freed, so each
training step maps (and page-faults in, 4 KB at a time) its large activations again: on a 2-core VM, SeMask-T at
512 x 512 takes about 0.9 million page faults per step. `keep_freed_memory()` makes glibc serve them from its heap and
keep freed memory (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, ...)`, as the environment variables
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` would at start-up): the memory is then reused without page faults.
The process keeps its peak memory until it exits, which suits a training or benchmarking process. It changes
nothing the model computes.
"""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest one


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of mapping large allocations afresh; True where it applied
    (glibc), False elsewhere (other C libraries, e.g. macOS or musl), where nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        logger.info("keep_freed_memory: this C library has no mallopt; the allocator is left as it is.")
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
