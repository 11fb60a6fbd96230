"""The hashes of input files: one read of a file gives both of its SHA-256 digests, cached.

- `sha256`: the whole file, what `sha256sum` prints. Its first 10 hex digits are Civitai's
  "AutoV2" (A1111's short model hash). Changing a file's metadata changes it.
- `data_sha256`: the bytes after the safetensors header (the tensor data only), what kmx
  records per input in `kmx_inputs` (as "sha256:" + hex). It is kohya's and A1111's "addnet"
  hash and Civitai's "AutoV3"; A1111 writes its first 12 hex digits ("Lora hashes"), which is
  also what Civitai shows. Rewriting a file's metadata keeps it.

Both digests are computed from the same buffer as it is read (on two threads: hashlib
releases the GIL), so hashing a file costs one read. Results are cached in
`$XDG_CACHE_HOME/karmixlang/hashes.json` by (real path, size, mtime, ctime, inode): the change
time is part of the key because no one can set it, so a file rewritten with its old size and
mtime put back still misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from karmixlang.diagnostics import KmxError, Span, error
from karmixlang.io.header import open_regular, os_fail, pread_exact, read_checkpoint

HASH_CHUNK = 8 << 20
HASH_PREFIX = "sha256:"
HASH_PLACEHOLDER = HASH_PREFIX + "0" * 64  # same length as a real hash
AUTOV2_DIGITS = 10
AUTOV3_DIGITS = 12


@dataclass(frozen=True, slots=True)
class FileHashes:
    sha256: str  # hex digest of the whole file
    data_sha256: str  # hex digest of the bytes after the safetensors header

    @property
    def autov2(self) -> str:
        return self.sha256[:AUTOV2_DIGITS]

    @property
    def autov3(self) -> str:
        return self.data_sha256[:AUTOV3_DIGITS]

    @property
    def data_hash(self) -> str:
        """The data hash as kmx records it ("sha256:" + hex)."""
        return HASH_PREFIX + self.data_sha256


def compute_hashes(path: str, span: Span | None = None,
                   data_sha256: str | None = None) -> FileHashes:
    """Both hashes of one file, read once, never cached. The data region starts after the
    8-byte length and the header it gives (clipped to the file: a file that is not
    safetensors has an empty data region). `data_sha256`: the data hash already known (kmx
    hashed the data region of a file it wrote, before writing the header that records it),
    so only the whole file is hashed. Raises KmxError (K0301, K0302) naming `path`."""
    full, data = _hash_file(path, span, whole=True, data=data_sha256 is None)
    return FileHashes(full, data_sha256 or data)


def data_region_sha256(path: str, span: Span | None = None) -> str:
    """The hex SHA-256 of a file's data region alone: only that region is read."""
    return _hash_file(path, span, whole=False, data=True)[1]


def _hash_file(path: str, span: Span | None, whole: bool, data: bool):
    """(whole file's hex digest or None, data region's or None), the file read once: the two
    digests are updated from the same buffer on two threads (hashlib releases the GIL)."""
    fd, st = open_regular(path, span)
    full_h, data_h = hashlib.sha256(), hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    try:
        start = st.st_size
        if st.st_size >= 8:
            start = min(st.st_size, 8 + int.from_bytes(pread_exact(fd, 8, 0, path, span), "little"))
        with ThreadPoolExecutor(1) as pool:
            offset = 0 if whole else start
            while offset < st.st_size:
                got = os.preadv(fd, [buf], offset)
                if not got:
                    raise KmxError([error("K0302", f"`{path}` shrank while it was being hashed",
                                          span)])
                other = pool.submit(full_h.update, view[:got]) if whole else None
                if data:
                    data_h.update(view[max(0, start - offset):got])
                if other is not None:
                    other.result()
                offset += got
    except OSError as e:
        os_fail(e, path, span)
    finally:
        os.close(fd)
    return (full_h.hexdigest() if whole else None), (data_h.hexdigest() if data else None)


def combine_hashes(hashes: list[str]) -> str:
    """A checkpoint's data hash from its files' ("sha256:" + hex), in `CheckpointHeader.files`
    order: a sharded checkpoint's is the SHA-256 of its shards' digests."""
    if len(hashes) == 1:
        return hashes[0]
    return HASH_PREFIX + hashlib.sha256(
        b"".join(bytes.fromhex(h.removeprefix(HASH_PREFIX)) for h in hashes)).hexdigest()


class HashCache:
    """FileHashes by file identity, loaded from and saved to the user's cache folder. A cache
    that cannot be read or written only costs time."""

    def __init__(self):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self.path = os.path.join(base, "karmixlang", "hashes.json")
        try:
            with open(self.path) as f:
                self.data = json.load(f)
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def key(path: str, st: os.stat_result | None = None) -> str:
        st = st or os.stat(path)
        return (f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|"
                f"{st.st_ino}")

    def get(self, path: str, fresh: bool = False, span: Span | None = None,
            data_sha256: str | None = None,
            sha256: tuple[str, os.stat_result] | None = None) -> FileHashes:
        """`fresh`: hash again even if cached (a resumed run must not trust the cache).
        `data_sha256`: the data hash, if known (compute_hashes). `sha256`: the whole file's,
        if known, with the file's identity when it was hashed: trusted only while the file is
        that file, unwritten since (same_content); the file is not read at all then."""
        try:
            st = os.stat(path)
            k = self.key(path, st)
        except OSError as e:
            os_fail(e, path, span)
        cached = None if fresh else _entry(self.data.get(k))
        if cached is None:
            if data_sha256 is not None and sha256 is not None and same_content(sha256[1], st):
                cached = FileHashes(sha256[0], data_sha256)
            else:
                cached = compute_hashes(path, span, data_sha256=data_sha256)
            self.data[k] = {"sha256": cached.sha256, "data_sha256": cached.data_sha256}
        return cached

    def peek(self, path: str) -> FileHashes | None:
        """The cached hashes of `path` as it is now, or None: never reads the file."""
        try:
            return _entry(self.data.get(self.key(path)))
        except OSError:
            return None

    def save(self) -> None:
        # Entries of files since removed or changed can never hit again; kept, they made the
        # cache grow with every temporary file ever hashed, and every run loads it whole.
        self.data = {k: v for k, v in self.data.items() if _current(k)}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def same_content(before: os.stat_result, now: os.stat_result) -> bool:
    """Whether `now` is the file hashed at `before`, unwritten since: same inode, size and
    modification time (a rename, which is how a file is published, changes none of them)."""
    return (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == \
        (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)


def _current(key: str) -> bool:
    """Whether a cache key still names a file as it is now."""
    try:
        return HashCache.key(key.rsplit("|", 4)[0]) == key
    except OSError:
        return False


def _entry(value: object) -> FileHashes | None:
    """A cache entry, if it is one: an entry of another kmx version (another algorithm or
    shape) is never trusted."""
    if not isinstance(value, dict):
        return None
    hexes = [value.get("sha256"), value.get("data_sha256")]
    if not all(isinstance(h, str) and len(h) == 64 and _is_hex(h) for h in hexes):
        return None
    return FileHashes(*hexes)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def file_hashes(paths: list[str], span: Span | None = None,
                data_sha256: dict[str, str] | None = None,
                sha256: dict[str, tuple[str, os.stat_result]] | None = None
                ) -> dict[str, FileHashes]:
    """The hashes of several files through the cache (read once each, saved once);
    `data_sha256`, `sha256`: the hashes already known, by path (HashCache.get)."""
    cache = HashCache()
    data, whole = data_sha256 or {}, sha256 or {}
    try:
        return {p: cache.get(p, span=span, data_sha256=data.get(p), sha256=whole.get(p))
                for p in paths}
    finally:
        cache.save()


def hash_data_region(path: str, span: Span | None = None) -> str:
    """The data hash of a checkpoint (a file, an index or a folder, as `read_checkpoint`
    takes), as kmx records it: shards are combined by `combine_hashes`."""
    files = read_checkpoint(path, span).files
    hashes = file_hashes(list(files), span)
    return combine_hashes([hashes[f].data_hash for f in files])
