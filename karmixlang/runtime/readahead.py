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
        self.fds: dict[str, int | None] = {}

    def start(self, index: int) -> int:
        """Job `index` (in run order; -1: none yet) starts: advise the ranges after it until
        `ahead` bytes past it are; the bytes advised now."""
        until = self.job_starts[min(index + 1, len(self.job_starts) - 1)] + self.ahead
        before = self.advised
        while self.cursor < len(self.ranges) and self.advised < until:
            path, begin, length = self.ranges[self.cursor]
            self._advise(path, begin, length)
            self.cursor += 1
            self.advised += length
        return self.advised - before

    def _advise(self, path: str, begin: int, length: int) -> None:
        if path not in self.fds:
            try:
                self.fds[path] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self.fds[path] = None
        fd = self.fds[path]
        if fd is not None and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, begin, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def close(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Readahead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
