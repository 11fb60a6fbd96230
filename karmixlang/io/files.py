"""The files kmx keeps beside an output, and how files are written safely: their names
(`hidden_path`), the one-writer lock (`OutputLock`), whole-or-nothing replacement
(`atomic_write`), and the refusal to replace anything but a regular file (`not_regular`)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
import time

from karmixlang.diagnostics import Diagnostic, KmxError, error
from karmixlang.io.header import TOO_MANY_FILES_HELP

PARTIAL_SUFFIX = ".kmx-partial"
JOURNAL_SUFFIX = ".kmx-journal"
STAMP_SUFFIX = ".kmx-inputs"  # what a resumed run must match (runtime/outputs.py)
LOCK_SUFFIX = ".kmx-lock"
# A plain rerun would stop at the interrupted run's partial output (K0306): say --force.


def hidden_path(path: str, suffix: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{suffix}")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: str, span=None) -> Diagnostic | None:
    """K0311 if `path` is something kmx must never replace (a directory, a device, a FIFO...);
    None for a regular file, a symlink to one, or nothing (a dangling symlink is replaced by
    the rename, not followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    what = next((what for test, what in _KINDS if test(mode)), None)
    if what is None:
        return None
    return error("K0311", f"`{path}` is {what}, not a regular file", span,
                 label="this save" if span else "", help="kmx writes only regular files and "
                 "never replaces anything else: save to another name")


def atomic_write(path: str, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` through a new temporary file in the same folder: the file
    appears whole or not at all, and nothing already at a temporary name is followed."""
    folder, name = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        try:
            write_all(fd, data)
            if mode is not None:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


class OutputLock:
    """One writer per output: an exclusive, non-blocking flock on `.NAME.kmx-lock` beside it,
    which holds the owner's pid and start time for the refusal (K0409) of a second run.

    The kernel drops the lock when its process dies, so a lock file left by a killed run
    blocks nothing. release() removes the file while still holding the lock; a run that
    locked the removed inode meanwhile sees it is no longer at the path and locks again."""

    def __init__(self, final_path: str):
        self.final_path = final_path
        self.path = hidden_path(final_path, LOCK_SUFFIX)
        self.fd: int | None = None
        try:
            os.makedirs(os.path.dirname(final_path) or ".", exist_ok=True)
            while self.fd is None:
                self.fd = self._try_lock()
            owner = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(self.fd, 0)
            write_all(self.fd, owner.encode())
        except OSError as e:
            self.release()
            too_many = e.errno in (errno.EMFILE, errno.ENFILE)
            raise KmxError([error("K0402", f"cannot lock `{final_path}` for writing: "
                                  f"{e.strerror or e} (at `{self.path}`)",
                                  help=TOO_MANY_FILES_HELP if too_many else None)]) from e

    def _try_lock(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise KmxError([error(
                "K0409", f"another kmx run ({owner}) is writing `{self.final_path}`",
                help="wait for that run to finish or stop it; two runs never write one output "
                     "at the same time")]) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = same_file(os.stat(self.path, follow_symlinks=False), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:  # removed by the run we waited for: lock the file now at the path
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # a lock file left behind locks nothing
        os.close(self.fd)
        self.fd = None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
