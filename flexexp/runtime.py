"""Process-level settings that change speed, never results.

**Large blocks on the CPU heap.** At batch 1000, one ResNet20 activation is 1000 x 16 x
32 x 32 floats = 64 MiB. glibc's ``malloc`` serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each
training step maps, page-faults and unmaps gigabytes: on a 2-core CPU that is about a
third of the step time, and the main source of step-to-step jitter. :func:`keep_heap`
tells glibc to serve large blocks from the heap and to keep freed memory for reuse (the
memory stays with the process at its peak, as a caching allocator would keep it),
through ``mallopt``: the same knobs as the environment variables ``MALLOC_MMAP_MAX_=0``
and ``MALLOC_TRIM_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["keep_heap", "heap_kept"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # an int, as mallopt takes; larger than any step's frees

_state = {"kept": False}


def keep_heap() -> bool:
    """Serve large blocks from the heap and keep freed memory (glibc only).

    Returns True when the settings took effect, False where they do not apply (not
    Linux, another C library) or ``mallopt`` refused them. Safe to call repeatedly.
    """
    if _state["kept"]:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    _state["kept"] = ok
    return ok


def heap_kept() -> bool:
    """Whether :func:`keep_heap` has taken effect in this process."""
    return _state["kept"]
