"""How glibc serves tensor memory: a process-wide setting each phase of a run picks, and
handing free memory back after a large key."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def tune_allocator(mmap_threshold: int = 32 << 20) -> None:
    """Let glibc reuse freed tensor memory for the next key instead of returning it at once.
    By default any block above a dynamic threshold is a fresh mmap, whose pages the kernel
    zero-fills on first touch and whose unmapping interrupts every thread: on a 2-core TIES
    merge that was two thirds of the run time (20 s of system time). The mmap threshold is
    raised to its maximum (32 MB) and the heap is trimmed only past 64 MB free, so resident
    memory stays bounded by the keys in flight plus what the allocator keeps for reuse.
    A phase that keeps tensors for long among short-lived ones asks for a lower
    `mmap_threshold` instead (runtime/rebasin.py). Harmless where mallopt is missing."""
    libc = _libc()
    try:
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except AttributeError:
        pass


def release_free_memory() -> None:
    """Hand the free pages of every heap back to the system (glibc's malloc_trim, which also
    releases whole free pages inside a heap, not only at its top). The reuse above keeps a
    large key's freed blocks resident beside the next key's when those do not fit where they
    were; after a key too large for that to be worth it (plan/schedule.HEAP_RELEASE_ABOVE)
    the runtime calls this, so the next key starts from what is in use. Harmless where
    malloc_trim is missing."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass
