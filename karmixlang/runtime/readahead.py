"""Read-ahead of the keys about to run: the kernel is asked (posix_fadvise WILLNEED) to read
the stored byte ranges of the next keys, in run order, while the keys in flight compute, so
that from a cold page cache the disk works beside the CPU rather than between keys (a pool
of hundreds of checkpoints is always cold). Changes no file and reads nothing itself; a file
that cannot be opened, or a system without posix_fadvise, is left alone. Torch-free."""

from __future__ import annotations

import os
from itertools import accumulate

# Keep this many bytes advised past the keys started: enough for the next keys of each
# thread, little enough not to push what the keys in flight read out of a small page cache.
AHEAD_BYTES = 256 << 20


class Readahead:
    """The jobs' stored byte ranges in run order, advised a window at a time as keys start."""

    def __init__(self, jobs, ahead: int = AHEAD_BYTES):
        self.ahead = ahead
        per_job = [[(seg.file, seg.begin, seg.end - seg.begin)
                    for info in job.tensors.values() for seg in info.segments] for job in jobs]
        self.ranges = [r for ranges in per_job for r in ranges]
        # bytes of the ranges before each job's first: the window is counted from there
        self.job_starts = list(accumulate((sum(r[2] for r in ranges) for ranges in per_job),
                                          initial=0))
        self.cursor = 0  # ranges before it are advised
        self.advised = 0  # their bytes

    def start(self, index: int) -> int:
        """Job `index` (in run order; -1: none yet) starts: advise the ranges after it until
        `ahead` bytes past it are; the bytes of the ranges taken now (advised where the
        system has posix_fadvise)."""
        until = self.job_starts[min(index + 1, len(self.job_starts) - 1)] + self.ahead
        before, first = self.advised, self.cursor
        while self.cursor < len(self.ranges) and self.advised < until:
            self.advised += self.ranges[self.cursor][2]
            self.cursor += 1
        _advise(self.ranges[first:self.cursor])
        return self.advised - before


def _advise(ranges) -> None:
    """Advise `ranges` a file at a time, each file opened once and closed before the next:
    no descriptor is held between calls, so the read-ahead never doubles the one per input
    that the Reader keeps, and the prefetch beside torch's import (runtime/startup.py) never
    takes the descriptors that import needs."""
    if not hasattr(os, "posix_fadvise"):
        return
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, begin, length in ranges:
        by_file.setdefault(path, []).append((begin, length))
    for path, spans in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for begin, length in spans:
                try:
                    os.posix_fadvise(fd, begin, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
        finally:
            os.close(fd)
