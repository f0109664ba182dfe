"""Giving freed memory back to the system.

glibc keeps what a process frees for its own later use, so a process's resident size
stays at its peak: a clang compile, or the first listing and merge of a big cluster,
would set an agent's memory for its whole life. ``malloc_trim`` returns the free pages.
"""

from __future__ import annotations

import ctypes


def release_freed_heap() -> None:
    """Return free heap pages to the system (glibc only; elsewhere nothing happens)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
