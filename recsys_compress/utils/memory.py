"""Keep freed host memory from staying resident between memory-bounded steps (glibc).

glibc serves an allocation by its own mmap only above a threshold that rises, up to 32 MiB,
each time such a block is freed. After the first freed dense weight, Gram matrices, factors
and SVD workspace below that size come from the heap, and the pages of the ones freed stay
resident in its holes: the sequential compression path frees one block's statistics before
the next block's exist, yet its peak resident size grew with depth (BENCHMARKS.md, "Peak
memory vs depth"). Where the C library is not glibc, both helpers do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its sliding threshold tops out, and so the
# threshold a long-running process has usually reached; restored after a bounded step.
SLIDING_THRESHOLD_MAX = 32 * 2**20
MAPPED_FROM = 64 * 2**10  # inside a bounded step: every allocation from 64 KiB up is its own mapping


@functools.cache
def _libc_function(name: str) -> Any | None:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_memory() -> bool:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim(0)``).

    True when the C library has the call (and so the trim ran), False where it does not.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = MAPPED_FROM) -> Iterator[bool]:
    """Inside the block, serve every allocation of ``threshold`` bytes or more by its own mmap,
    so freeing it returns its pages at once (the effect of ``MALLOC_MMAP_THRESHOLD_``, for this
    step only). Yields whether the setting took effect.

    Afterwards the threshold is set to glibc's sliding maximum (32 MiB): glibc cannot hand back
    its own sliding value once it is set by hand. A threshold the user set through the
    environment is left alone.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield False
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield True
    finally:
        mallopt(M_MMAP_THRESHOLD, SLIDING_THRESHOLD_MAX)


def resident_mib() -> float:
    """This process's resident set size now, in MiB (Linux's ``VmRSS``; the benchmarks and tests
    of the bounded step read it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (resident size is read on Linux only)")
