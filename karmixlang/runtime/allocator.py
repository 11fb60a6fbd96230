"""How glibc serves tensor memory: a process-wide setting each phase of a run picks."""

from __future__ import annotations


def tune_allocator(mmap_threshold: int = 32 << 20) -> None:
    """Let glibc reuse freed tensor memory for the next key instead of returning it at once.
    By default any block above a dynamic threshold is a fresh mmap, whose pages the kernel
    zero-fills on first touch and whose unmapping interrupts every thread: on a 2-core TIES
    merge that was two thirds of the run time (20 s of system time). The mmap threshold is
    raised to its maximum (32 MB) and the heap is trimmed only past 64 MB free, so resident
    memory stays bounded by the keys in flight plus what the allocator keeps for reuse.
    A phase that keeps tensors for long among short-lived ones asks for a lower
    `mmap_threshold` instead (runtime/rebasin.py). Harmless where mallopt is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
