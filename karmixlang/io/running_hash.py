"""The hashes of an output as it is written: no pass over the file of its own at the end.

`RunningHash`: the SHA-256 of a partial output's data region, advanced while its keys are
written.

A file's data region is its keys' bytes back to back, in data order. Keys finish in any
order, so the digest follows the contiguous prefix of finished keys: the thread that finishes
the next key hashes it from the buffer it just wrote, then any finished keys after it are read
back from the file (the page cache holds them). At commit the digest is complete and the file
need not be read again.

The digest is an optimisation, never a claim: a key written again once hashed, or a read back
that fails, spoils it, and the writer then hashes the file from disk as it did before.

`WholeFileHashes`: each finished file's full SHA-256 (its header holds its data hash, so it
cannot be advanced with the data), computed on a thread while the writer fsyncs the files:
the read comes from the page cache and overlaps the wait for the disk. It is paired with the
file's identity (size, mtime, inode) when the hashing began, so that whoever caches it can
check the published file is still that file (io/hashes.py, `HashCache.get`).
"""

from __future__ import annotations

import hashlib
import os
import threading

READ_CHUNK = 1 << 20  # read-back buffer, allocated only when keys finish out of order
WHOLE_CHUNK = 8 << 20  # at commit, when no key is in memory any more


class RunningHash:
    """One file's data-region digest. `keys` and `sizes` in data order, the region starting at
    byte `start`; `done`: keys already in the file (an interrupted run's journaled keys)."""

    def __init__(self, keys: tuple[str, ...], sizes: list[int], start: int, done: set[str]):
        self._keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self._offsets = []
        for size in sizes:
            self._offsets.append(start)
            start += size
        self._sizes = sizes
        self._finished = [k in done for k in keys]
        self._next = 0  # keys before it are hashed
        self._sha = hashlib.sha256()
        self._spoiled = False
        self._state = threading.Lock()  # _finished, _next and _spoiled
        self._hashing = threading.Lock()  # one thread advances the digest at a time
        self._buf: bytearray | None = None

    def rewriting(self, key: str) -> None:
        """`key` is about to be written (again): a key already finished and now rewritten
        could change under the digest, so the digest is given up."""
        with self._state:
            if self._finished[self._index[key]]:
                self._spoiled = True

    def finished(self, key: str, fd: int, data: memoryview | None) -> None:
        """`key`'s bytes are all in the file `fd`; `data`: those bytes, when the caller holds
        them whole. Advances the digest as far as finished keys reach, unless another thread
        already does (it then takes this key too)."""
        i = self._index[key]
        with self._state:
            self._finished[i] = True
        while self._hashing.acquire(blocking=False):
            try:
                self._advance(fd, i, data)
                data = None  # hashed, or not the next key
            finally:
                self._hashing.release()
            # A key that finished while the lock was held may have seen it taken and left.
            with self._state:
                if not self._ready():
                    return

    def hexdigest(self) -> str | None:
        """The digest once every key is hashed and none was rewritten, else None."""
        with self._state:
            complete = self._next == len(self._keys) and not self._spoiled
        return self._sha.hexdigest() if complete else None

    def _ready(self) -> bool:
        return not self._spoiled and self._next < len(self._keys) and self._finished[self._next]

    def _advance(self, fd: int, held: int, data: memoryview | None) -> None:
        while True:
            with self._state:
                if not self._ready():
                    return
                i = self._next
            try:
                if i == held and data is not None:
                    self._sha.update(data)
                else:
                    self._read_into_digest(fd, self._offsets[i], self._sizes[i])
            except OSError:
                with self._state:
                    self._spoiled = True
                return
            with self._state:
                self._next = i + 1

    def _read_into_digest(self, fd: int, offset: int, size: int) -> None:
        if self._buf is None:
            self._buf = bytearray(READ_CHUNK)
        _update_from(self._sha, fd, offset, offset + size, memoryview(self._buf))


class WholeFileHashes:
    """The full SHA-256 of each file open as `fds`, `sizes` bytes long, on a thread started
    now. The caller keeps the descriptors open until result() returns."""

    def __init__(self, fds: list[int], sizes: list[int]):
        self._idents = [os.fstat(fd) for fd in fds]
        self._digests: list[str | None] = [None] * len(fds)
        self._thread = threading.Thread(target=self._run, args=(fds, sizes), daemon=True,
                                        name="kmx-hash-output")
        self._thread.start()

    def _run(self, fds: list[int], sizes: list[int]) -> None:
        view = memoryview(bytearray(WHOLE_CHUNK))
        for i, (fd, size) in enumerate(zip(fds, sizes)):
            sha = hashlib.sha256()
            try:
                _update_from(sha, fd, 0, size, view)
            except OSError:
                continue  # unknown: whoever needs it hashes the published file instead
            self._digests[i] = sha.hexdigest()

    def result(self) -> list[tuple[str, os.stat_result] | None]:
        """Per file, (hex digest, its identity when hashing began), or None if unread."""
        self._thread.join()
        return [None if d is None else (d, ident) for d, ident in zip(self._digests, self._idents)]


def _update_from(sha, fd: int, offset: int, end: int, view: memoryview) -> None:
    """Hash the bytes [offset, end) of `fd` into `sha`, through the buffer `view`."""
    while offset < end:
        got = os.preadv(fd, [view[:min(len(view), end - offset)]], offset)
        if got <= 0:
            raise OSError("the file is shorter than planned")
        sha.update(view[:got])
        offset += got
