"""Hand freed host memory back to the operating system between memory-bounded steps.

glibc serves large allocations by mmap only below a threshold that rises each time such a block
is freed; after the first freed dense weight, Gram matrices and factors come from the heap, and
the pages of the ones freed stay resident in its holes. The sequential compression path frees
one block's statistics before the next block's exist, so without a trim its peak resident size
still grew with depth (BENCHMARKS.md, "Peak memory vs depth").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def release_freed_memory() -> bool:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim(0)``).

    True when the C library has the call (and so the trim ran), False where it does not.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
