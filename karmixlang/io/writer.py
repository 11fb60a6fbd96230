"""The output side: a deterministic layout planned up front, then a crash-safe streaming writer.

The runtime knows every output key, dtype and shape before computing anything, so the whole
layout (headers, offsets, shards) is fixed first and each finished tensor is written straight to
its offset, from any thread, in any order: memory holds one tensor per worker, never the model.

Crash safety: data goes to `.<name>.kmx-partial` beside the final file, which only appears by an
atomic rename once complete. A journal (`.<name>.kmx-journal`) lists keys whose bytes were
fsync-ed, so `--resume` redoes only the rest.

One writer per output: `.<name>.kmx-lock` is locked (flock) before the first byte is written, and
a partial file is published only if it is still the inode this writer created.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass
from typing import NoReturn

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.dtypes import DTYPES, nbytes
from karmixlang.io.files import (JOURNAL_SUFFIX, LOCK_SUFFIX, PARTIAL_SUFFIX, STAMP_SUFFIX,
                                 OutputLock, hidden_path, not_regular, same_file, write_all)
from karmixlang.io.hashes import data_region_sha256
from karmixlang.io.header import TOO_MANY_FILES_HELP
from karmixlang.io.running_hash import RunningHash, WholeFileHashes

RESTART_HELP = ("to start this output over, run again with --force (the interrupted run's "
                "finished keys are discarded); or undo the change and resume")
JOURNAL_VERSION = 1


# ---------------------------------------------------------------- layout

@dataclass(frozen=True)
class Slot:
    file: int  # index into OutputLayout.files
    offset: int  # absolute byte offset in that file
    nbytes: int


@dataclass(frozen=True)
class OutputFile:
    path: str  # the final path
    header: bytes  # the 8-byte length followed by the space-padded JSON header
    size: int  # of the whole file
    keys: tuple[str, ...]  # in data order


@dataclass(frozen=True)
class OutputLayout:
    final_path: str  # what the recipe saves to; names the journal
    files: tuple[OutputFile, ...]
    slots: dict[str, Slot]  # sorted by key
    index_path: str | None  # set when sharded
    index: bytes | None  # the index file's content
    total_bytes: int  # tensor data bytes over all files
    fingerprint: str  # identifies the layout; a journal must carry the same one to be resumed


def layout_output(final_path: str, tensors: list[tuple[str, str, tuple[int, ...]]],
                metadata: dict[str, str], shard_bytes: int | None) -> OutputLayout:
    """Lay out `tensors` (name, safetensors dtype, shape) at `final_path`.

    Keys are sorted; with `shard_bytes`, shards are filled greedily in key order and a tensor
    bigger than `shard_bytes` gets a shard to itself. Several shards are named
    `<stem>-00001-of-0000N.safetensors` beside `<stem>.safetensors.index.json`; a single one is
    written as `final_path` itself, as transformers does. Within a file, tensors are ordered as
    safetensors orders them (widest dtype first, then name), which keeps every tensor aligned
    and makes a file byte-identical to `safetensors.save_file` of the same tensors when the
    metadata has at most one entry (safetensors orders metadata at random; we sort it).
    Raises ValueError for inputs no recipe can produce (the checker reports those first).
    """
    if shard_bytes is not None and shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, not {shard_bytes}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    sizes: dict[str, int] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, dtype, shape in tensors:
        shape = tuple(shape)
        if name in specs or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is duplicated or reserved")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} has an invalid shape {shape}")
        size = nbytes(dtype, shape)
        if size is None:
            raise ValueError(f"tensor {name!r}: {dtype}{list(shape)} is not whole bytes")
        specs[name], sizes[name] = (dtype, shape), size

    groups: list[list[str]] = [[]]
    filled = 0
    for name in sorted(specs):
        if shard_bytes is not None and groups[-1] and filled + sizes[name] > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]

    if len(groups) == 1:
        paths = [final_path]
        index_path = None
    else:
        folder, name = os.path.split(final_path)
        stem = name.removesuffix(".safetensors")
        paths = [os.path.join(folder, f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors")
                 for i in range(1, len(groups) + 1)]
        index_path = os.path.join(folder, f"{stem}.safetensors.index.json")

    files, slots = [], {}
    for i, (path, group) in enumerate(zip(paths, groups)):
        file, offsets = _lay_out_file(path, group, specs, sizes, metadata)
        files.append(file)
        slots.update((k, Slot(i, off, sizes[k])) for k, off in offsets.items())
    total = sum(sizes.values())
    index = None
    if index_path is not None:
        weight_map = {k: os.path.basename(paths[s.file]) for k, s in slots.items()}
        index = (json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                            indent=2, sort_keys=True) + "\n").encode()

    fp = hashlib.blake2b(digest_size=16)
    for f in files:
        fp.update(f"{os.path.basename(f.path)}\0{f.size}\0".encode() + f.header)
    fp.update(index or b"")
    return OutputLayout(final_path, tuple(files), dict(sorted(slots.items())), index_path,
                        index, total, fp.hexdigest())


def _lay_out_file(path: str, names: list[str], specs: dict, sizes: dict[str, int],
                  metadata: dict[str, str]) -> tuple[OutputFile, dict[str, int]]:
    order = sorted(names, key=lambda n: (-DTYPES[specs[n][0]].rank, n))
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    pos = 0
    for n in order:
        dtype, shape = specs[n]
        entries[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + sizes[n]]}
        pos += sizes[n]
    # Compact UTF-8 JSON padded with spaces to 8 bytes, exactly as safetensors writes it.
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    offsets, start = {}, len(header)
    for n in order:
        offsets[n] = start
        start += sizes[n]
    return OutputFile(path, header, start, tuple(order)), offsets


# ---------------------------------------------------------------- writer

def written_paths(layout: OutputLayout) -> list[str]:
    """Every path that writing `layout` creates or replaces: the files, the index, and the
    hidden partial, journal, stamp and lock files beside them."""
    finals = [f.path for f in layout.files] + ([layout.index_path] if layout.index_path else [])
    hidden = [hidden_path(layout.final_path, s)
              for s in (JOURNAL_SUFFIX, STAMP_SUFFIX, LOCK_SUFFIX)]
    return finals + [hidden_path(p, PARTIAL_SUFFIX) for p in finals] + hidden


def _create_new(path: str, mode: int) -> int:
    """A new, empty file at `path`: whatever was there (a stale partial file, or a symlink
    planted to redirect the write) is removed, never followed or truncated."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, mode | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        if n <= 0:  # the kernel made no progress: stop rather than spin
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data, offset = data[n:], offset + n


def _reserve(fd: int, size: int) -> None:
    """Allocate a new partial file's blocks up front where the file system can (Linux
    fallocate): a disk that fills up meanwhile fails the run now, not an hour in, and the
    writes allocate nothing. Not posix_fallocate: where the file system cannot, glibc's writes
    every block instead. Raises OSError only for a full disk or quota."""
    fallocate = _fallocate()
    if fallocate is None or size == 0:
        return
    if fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err))


@functools.cache
def _fallocate():
    """libc's fallocate(fd, mode, offset, len), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


class CheckpointWriter:
    """Writes one OutputLayout. Use as a context manager, or call commit() or abort().

    write() may be called from many threads; checkpoint() makes finished keys durable; commit()
    publishes the files. Leaving a `with` block without commit() keeps the partial files and
    journal (so `--resume` can continue after an error); abort(keep_partial=False) discards them.
    The output's OutputLock is taken first (or `lock`, held by the caller, is used).
    With `hashes`, each file's hashes are kept as it is written (io/running_hash.py): what a
    merge records and reports, at no extra read; without, data_hashes() reads the files.
    """

    def __init__(self, layout: OutputLayout, *, resume: bool = False,
                 lock: OutputLock | None = None, hashes: bool = False):
        self.layout = layout
        self._hashes = hashes
        self._lock = lock or OutputLock(layout.final_path)
        self._own_lock = lock is None
        # Durable keys: journaled by an earlier run (found on resume) or by checkpoint().
        self.done_keys: set[str] = set()
        self._folder = os.path.dirname(layout.final_path) or "."
        self._temps = [hidden_path(f.path, PARTIAL_SUFFIX) for f in layout.files]
        self._journal = hidden_path(layout.final_path, JOURNAL_SUFFIX)
        self._fds: list[int] = []
        self._running: list[RunningHash] = []  # each file's data hash, as keys are written
        self._idents: list[os.stat_result] = []  # of the partial files this writer opened
        self._journal_fd: int | None = None
        self._pending: set[str] = set()  # written since the last checkpoint, not yet durable
        self._state = threading.Condition()  # guards the fields above and the counters below
        self._in_flight = 0  # writes and fsyncs using the fds; close waits for them
        self._closed = False
        self._committed = False
        # Each published file's full SHA-256 and its identity when hashed (or None), once
        # committed: computed while the data was fsynced.
        self.file_sha256: list[tuple[str, os.stat_result] | None] = []
        self._checkpointing = threading.Lock()  # one journal append at a time
        resuming = resume and os.path.exists(self._journal)
        try:
            os.makedirs(self._folder, exist_ok=True)
            if resuming:
                self._reopen()
            else:
                self._create()
        except BaseException as e:
            self._close()
            if not resuming:  # a half-made fresh start has nothing worth keeping
                self._remove_partial()
            self._release_lock()
            if isinstance(e, OSError):
                self._fail_os(e, self._folder)
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort(keep_partial=True)

    # -------------------------------------------------------- opening

    def _create(self) -> None:
        self._check_space(sum(f.size for f in self.layout.files))
        for f, temp in zip(self.layout.files, self._temps):
            fd = _create_new(temp, os.O_RDWR)
            self._fds.append(fd)
            self._idents.append(os.fstat(fd))
            # Sized up front: every key's offset exists, so any thread may write any key.
            os.ftruncate(fd, f.size)
            _reserve(fd, f.size)
            _pwrite_all(fd, memoryview(f.header), 0)
        self._start_hashes(set())
        self._journal_fd = _create_new(self._journal, os.O_WRONLY | os.O_APPEND)
        first = {"kmx_journal": JOURNAL_VERSION, "plan": self.layout.fingerprint}
        write_all(self._journal_fd, (json.dumps(first) + "\n").encode())
        os.fsync(self._journal_fd)
        self._fsync_folder()

    def _reopen(self) -> None:
        def refuse(why: str) -> NoReturn:
            raise KmxError([error(
                "K0404", f"cannot resume writing `{self.layout.final_path}`: {why}",
                help=RESTART_HELP)])

        with open(self._journal, "rb") as j:
            raw = j.read()
        # The last line is torn if the crash came mid-append (or empty after a final newline).
        *lines, torn = raw.split(b"\n")
        try:
            first = json.loads(lines[0])
            keys = [json.loads(line) for line in lines[1:]]
        except (ValueError, IndexError):
            refuse(f"its journal `{self._journal}` is corrupt")
        if not isinstance(first, dict) or first.get("plan") != self.layout.fingerprint:
            refuse("the partial output was planned differently (the recipe or inputs changed)")
        if not all(isinstance(k, str) and k in self.layout.slots for k in keys):
            refuse(f"its journal `{self._journal}` names keys this output does not have")
        for f, temp in zip(self.layout.files, self._temps):
            try:
                fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                refuse(f"the partial file `{temp}` is missing")
            self._fds.append(fd)
            self._idents.append(os.fstat(fd))
            if not stat.S_ISREG(self._idents[-1].st_mode) or os.fstat(fd).st_size != f.size or \
                    os.pread(fd, len(f.header), 0) != f.header:
                refuse(f"the partial file `{temp}` does not match the plan")
        self._journal_fd = os.open(self._journal,
                                   os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        # Cut the torn line off, or the next append would extend it into a corrupt middle line.
        os.ftruncate(self._journal_fd, len(raw) - len(torn))
        self.done_keys = set(keys)
        self._start_hashes(self.done_keys)
        # Partial files are sparse: they still need their size minus the blocks on disk.
        self._check_space(sum(max(0, f.size - os.fstat(fd).st_blocks * 512)
                              for f, fd in zip(self.layout.files, self._fds)))

    def _start_hashes(self, done: set[str]) -> None:
        if not self._hashes:
            return
        slots = self.layout.slots
        self._running = [RunningHash(f.keys, [slots[k].nbytes for k in f.keys], len(f.header),
                                     done) for f in self.layout.files]

    def _check_space(self, need: int) -> None:
        # Fail in the first second rather than with ENOSPC after an hour of merging.
        vfs = os.statvfs(self._folder)
        if vfs.f_blocks == 0:  # the filesystem does not report space (some FUSE mounts)
            return
        free = vfs.f_bavail * vfs.f_frsize
        if need > free:
            raise KmxError([error(
                "K0402", f"cannot write `{self.layout.final_path}`: it needs {need:,} more bytes "
                f"but `{self._folder}` has {free:,} free",
                help="free some space or save to another disk")])

    # -------------------------------------------------------- writing

    def write(self, key: str, data: bytes | memoryview, start: int | None = None) -> None:
        """Write the bytes of `key` at its offset. Thread-safe; order does not matter. A key
        too large to hold may come in pieces, in order: `start` is then the piece's byte
        offset within the key, and the key counts as written with its last piece."""
        slot = self.layout.slots.get(key)
        if slot is None:
            raise KeyError(f"{key!r} is not in the output layout")
        view = memoryview(data).cast("B")
        if start is None and view.nbytes != slot.nbytes:
            raise ValueError(f"{key!r} needs {slot.nbytes} bytes, got {view.nbytes}")
        start = start or 0
        if start < 0 or start + view.nbytes > slot.nbytes:
            raise ValueError(f"{key!r} has {slot.nbytes} bytes: no piece of {view.nbytes} at "
                             f"{start}")
        complete = start + view.nbytes == slot.nbytes
        running = self._running[slot.file] if self._running else None
        self._enter()
        ok = False
        try:
            if running:
                running.rewriting(key)
            fd = self._fds[slot.file]
            _pwrite_all(fd, view, slot.offset + start)
            ok = True
            if running and complete:
                running.finished(key, fd, view if start == 0 else None)
        except OSError as e:
            self._fail_os(e, self._temps[slot.file])
        finally:
            self._leave(key if ok and complete else None)

    def checkpoint(self) -> None:
        """Make every key written so far durable: fsync the data, then journal the keys.

        Keys are taken before the fsync, so each journaled key's bytes were on disk first.
        """
        with self._checkpointing:
            self._enter()
            with self._state:
                batch, self._pending = self._pending, set()
            try:
                self._check_own_files()
                for fd in self._fds:
                    os.fsync(fd)
                if batch:
                    lines = "".join(json.dumps(k) + "\n" for k in sorted(batch))
                    write_all(self._journal_fd, lines.encode())
                    os.fsync(self._journal_fd)
            except OSError as e:
                self._fail_os(e, self._journal)
            finally:
                self._leave(None)
            with self._state:
                self.done_keys |= batch

    def data_hashes(self) -> list[str]:
        """The SHA-256 (hex) of each partial file's tensor data: once every key is written,
        what its header's modelspec.hash_sha256 records. Each was advanced as its keys were
        written (io/running_hash.py); one that could not be (a key rewritten, a read back that
        failed, a key never written) is read by path instead, after checking the file is still
        this writer's (commit() checks again before publishing)."""
        self._check_own_files()
        known = [r.hexdigest() for r in self._running] or [None] * len(self._temps)
        return [digest or data_region_sha256(temp) for digest, temp in zip(known, self._temps)]

    def commit(self, headers: list[bytes] | None = None) -> None:
        """Publish: fsync, rename every temp file to its final name (index last), fsync the
        folder, drop the journal. A final name never holds a partial file.

        `headers` replaces each file's header just before publishing; each must have the
        length of the planned one (the runtime fills in input hashes computed during the run,
        planned as fixed-length placeholders, so no tensor offset moves). With `hashes`, each
        file is hashed whole (file_sha256) while its data is fsynced: the wait for the disk
        hides the read."""
        if headers is not None:
            self._replace_headers(headers)
        whole = (WholeFileHashes(self._fds, [f.size for f in self.layout.files])
                 if self._hashes else None)
        try:
            self.checkpoint()
        finally:
            if whole:
                self.file_sha256 = whole.result()  # the thread is done with the descriptors
        missing = self.layout.slots.keys() - self.done_keys
        if missing:
            raise RuntimeError(f"commit() with {len(missing)} keys never written, "
                               f"e.g. {min(missing)!r}")
        self._close()
        renames = list(zip(self._temps, (f.path for f in self.layout.files)))
        try:
            if self.layout.index is not None:
                temp = hidden_path(self.layout.index_path, PARTIAL_SUFFIX)
                fd = _create_new(temp, os.O_WRONLY)
                try:
                    write_all(fd, self.layout.index)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                renames.append((temp, self.layout.index_path))
            # Planning refused these; one may have appeared since.
            special = [d for _, final in renames if (d := not_regular(final))]
            if special:
                raise KmxError(special[:1])
            self._check_own_files()
            for temp, final in renames:
                os.replace(temp, final)
            self._fsync_folder()
            os.unlink(self._journal)
        except OSError as e:
            self._fail_os(e, self.layout.final_path)
        self._committed = True
        self._release_lock()

    def _check_own_files(self) -> None:
        """Each partial file is still the inode this writer opened: never write on into, or
        publish, a file another process renamed away or put in its place."""
        for temp, ident in zip(self._temps, self._idents):
            try:
                now = os.stat(temp, follow_symlinks=False)
            except OSError as e:  # gone: removed, or renamed away (the folder, maybe)
                self._fail_os(e, temp)
            if not same_file(now, ident):
                raise KmxError([error(
                    "K0409", f"the partial file `{temp}` of `{self.layout.final_path}` was "
                    "moved or replaced by another process while this run wrote it; nothing "
                    "was published", help="make sure one run at a time writes an output, then "
                    "run again with --force")])

    def _replace_headers(self, headers: list[bytes]) -> None:
        if len(headers) != len(self.layout.files) or any(
                len(h) != len(f.header) for h, f in zip(headers, self.layout.files)):
            raise ValueError("replacement headers must match the planned header lengths")
        self._enter()
        try:
            for fd, h in zip(self._fds, headers):
                _pwrite_all(fd, memoryview(h), 0)
        except OSError as e:
            self._fail_os(e, self.layout.final_path)
        finally:
            self._leave(None)

    def abort(self, keep_partial: bool) -> None:
        """Stop writing (after in-flight writes finish). With keep_partial the temp files and
        journal stay for a later `--resume`; otherwise they are removed. Idempotent."""
        self._close()
        if not (keep_partial or self._committed):
            self._remove_partial()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._own_lock:
            self._lock.release()

    # -------------------------------------------------------- internals

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise RuntimeError("the writer is closed")
            self._in_flight += 1

    def _leave(self, written_key: str | None) -> None:
        with self._state:
            if written_key is not None:
                self._pending.add(written_key)
            self._in_flight -= 1
            self._state.notify_all()

    def _close(self) -> None:
        # Waits for in-flight pwrites: closing an fd under them could let its number be reused
        # by another open file, which they would then write into.
        with self._state:
            self._closed = True
            self._state.wait_for(lambda: self._in_flight == 0)
            fds, self._fds = self._fds, []
            if self._journal_fd is not None:
                fds.append(self._journal_fd)
                self._journal_fd = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # nothing more to do with it; the data was fsync-ed or is being discarded

    def _remove_partial(self) -> None:
        extra = [hidden_path(self.layout.index_path, PARTIAL_SUFFIX)] if self.layout.index_path else []
        for path in [*self._temps, self._journal, *extra]:
            try:
                os.unlink(path)
            except OSError:
                pass  # best effort: this runs on error paths, where the first error is the news

    def _fsync_folder(self) -> None:
        fd = os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fail_os(self, e: OSError, path: str) -> NoReturn:
        reason = e.strerror or str(e)
        helps = {
            errno.ENOSPC: "free some space, then rerun with --resume to continue",
            errno.EDQUOT: "free some space, then rerun with --resume to continue",
            errno.EACCES: f"check that `{self._folder}` is writable",
            errno.EPERM: f"check that `{self._folder}` is writable",
            errno.EROFS: "save to a writable disk",
            errno.ENOENT: f"`{self._folder}` or a file in it was removed or renamed while "
                          "writing",
            errno.EMFILE: TOO_MANY_FILES_HELP,
            errno.ENFILE: TOO_MANY_FILES_HELP,
        }
        where = f" (at `{path}`)" if path != self.layout.final_path else ""
        raise KmxError([error("K0402", f"cannot write `{self.layout.final_path}`: {reason}{where}",
                              help=helps.get(e.errno))]) from e
