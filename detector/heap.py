"""Handing freed heap memory back to the system after the daemon lets go of many streams at once."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

__all__ = ["release_free_heap"]


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim); False where there is no such call.

    A restore or a hand-over frees hundreds of thousands of small and mid-sized blocks (checkpoint records, the
    decoding's arrays, the state table a reservation replaced). glibc keeps freed heap pages for later use, and
    where live blocks sit between them it never returns them: the hour soak's RSS rose in steps of 3 to 72 MiB
    at each rebalance and never came down (docs/reliability.md). malloc_trim returns every free page, wherever it
    lies; it takes milliseconds, and runs only after such events.
    """
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
