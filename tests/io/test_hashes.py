"""io/hashes.py: both SHA-256s of a file in one read, against digests computed here from the
file's bytes (and `sha256sum` itself where it is installed), and the cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from karmixlang.diagnostics import KmxError
from karmixlang.io import hashes as hashes_mod
from karmixlang.io.hashes import FileHashes, HashCache, compute_hashes, file_hashes


def reference(raw: bytes) -> tuple[str, str]:
    """The whole-file digest and the digest of what follows the 8-byte length and the header."""
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else len(raw)
    return hashlib.sha256(raw).hexdigest(), hashlib.sha256(raw[8 + n:]).hexdigest()


def a_model(path, metadata=None, n=1000) -> str:
    save_file({"w": np.arange(n, dtype=np.float32), "b": np.ones(3, np.float16)}, str(path),
              metadata=metadata)
    return str(path)


def test_both_digests_match_hashlib_and_the_short_forms(workdir):
    path = a_model(workdir / "m.safetensors", {"title": "x"})
    raw = open(path, "rb").read()
    full, data = reference(raw)
    h = compute_hashes(path)
    assert h == FileHashes(full, data)
    assert h.autov2 == full[:10] and h.autov3 == data[:12] and h.data_hash == "sha256:" + data
    # safetensors stores wider dtypes first
    assert data == hashlib.sha256(np.arange(1000, dtype=np.float32).tobytes()
                                  + np.ones(3, np.float16).tobytes()).hexdigest()


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum here")
def test_the_full_digest_is_what_sha256sum_prints(workdir):
    path = a_model(workdir / "m.safetensors")
    printed = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True)
    assert compute_hashes(path).sha256 == printed.stdout.split()[0]


def test_new_metadata_changes_the_full_digest_only(workdir):
    a = compute_hashes(a_model(workdir / "a.safetensors", {"v": "1"}))
    b = compute_hashes(a_model(workdir / "b.safetensors", {"v": "2, longer"}))
    assert a.data_sha256 == b.data_sha256 and a.sha256 != b.sha256


@settings(max_examples=60, deadline=None)
@given(header=st.integers(0, 40), data=st.binary(max_size=200), chunk=st.integers(1, 64),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_any_chunking_gives_the_digests_of_the_whole(tmp_path_factory, header, data, chunk,
                                                     length):
    # The data region may start inside any chunk; a length past the end (not safetensors)
    # leaves an empty data region instead of failing.
    raw = (header if length is None else length).to_bytes(8, "little") + b"{" * header + data
    path = tmp_path_factory.mktemp("h") / "f.bin"
    path.write_bytes(raw)
    old = hashes_mod.HASH_CHUNK
    hashes_mod.HASH_CHUNK = chunk
    try:
        assert compute_hashes(str(path)) == FileHashes(*reference(raw))
    finally:
        hashes_mod.HASH_CHUNK = old


def test_a_file_shorter_than_the_length_field_has_an_empty_data_region(workdir):
    path = workdir / "tiny.bin"
    path.write_bytes(b"abc")
    assert compute_hashes(str(path)) == FileHashes(hashlib.sha256(b"abc").hexdigest(),
                                                   hashlib.sha256(b"").hexdigest())


def test_each_byte_is_read_once(workdir, monkeypatch):
    path = a_model(workdir / "m.safetensors", n=300_000)
    monkeypatch.setattr(hashes_mod, "HASH_CHUNK", 1 << 16)
    read = []
    real = os.preadv

    def counting(fd, buffers, offset):
        got = real(fd, buffers, offset)
        read.append(got)
        return got

    monkeypatch.setattr(hashes_mod.os, "preadv", counting)
    compute_hashes(path)
    assert sum(read) == os.path.getsize(path) and len(read) > 10


def test_missing_files_and_folders_are_diagnostics(workdir):
    with pytest.raises(KmxError) as e:
        compute_hashes(str(workdir / "nope.safetensors"))
    assert e.value.diagnostics[0].code == "K0301"
    with pytest.raises(KmxError) as e:
        compute_hashes(str(workdir))
    assert e.value.diagnostics[0].code == "K0302"


def test_the_cache_answers_without_reading_until_the_file_changes(workdir, monkeypatch):
    path = a_model(workdir / "m.safetensors")
    first = file_hashes([path])[path]
    calls = []
    real = hashes_mod.compute_hashes
    monkeypatch.setattr(hashes_mod, "compute_hashes",
                        lambda p, span=None, **kw: calls.append(p) or real(p, span, **kw))
    assert file_hashes([path])[path] == first and calls == []  # from the saved cache file
    assert HashCache().get(path, fresh=True) == first and calls == [path]

    # Same size, old mtime put back: the change time still differs, so it is hashed again.
    st_ = os.stat(path)
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 1
    open(path, "wb").write(bytes(raw))
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    again = file_hashes([path])[path]
    assert again == FileHashes(*reference(bytes(raw))) and again != first
    assert HashCache().peek(path) == again


def test_an_unwritable_cache_only_costs_time(workdir, monkeypatch):
    blocker = workdir / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path = a_model(workdir / "m.safetensors")
    assert file_hashes([path])[path] == FileHashes(*reference(open(path, "rb").read()))


@settings(max_examples=40, deadline=None)
@given(header=st.integers(0, 40), data=st.binary(max_size=200), chunk=st.integers(1, 64))
def test_the_data_region_alone_and_a_known_data_hash(tmp_path_factory, header, data, chunk):
    # The writer hashes a partial file's data region alone; once published, only the whole
    # file is hashed again and the data hash it already knows is taken as given.
    raw = header.to_bytes(8, "little") + b"{" * header + data
    path = tmp_path_factory.mktemp("h") / "f.bin"
    path.write_bytes(raw)
    full, region = reference(raw)
    old = hashes_mod.HASH_CHUNK
    hashes_mod.HASH_CHUNK = chunk
    try:
        assert hashes_mod.data_region_sha256(str(path)) == region
        assert compute_hashes(str(path), data_sha256="ab" * 32) == FileHashes(full, "ab" * 32)
    finally:
        hashes_mod.HASH_CHUNK = old


def test_the_data_region_alone_reads_only_that_region(workdir, monkeypatch):
    path = a_model(workdir / "m.safetensors", {"title": "x" * 500}, n=100_000)
    monkeypatch.setattr(hashes_mod, "HASH_CHUNK", 1 << 16)
    read, real = [], os.preadv
    monkeypatch.setattr(hashes_mod.os, "preadv",
                        lambda fd, bufs, off: read.append(off) or real(fd, bufs, off))
    hashes_mod.data_region_sha256(path)
    start = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    assert read[0] == start and len(read) == -(-(os.path.getsize(path) - start) // (1 << 16))


def test_saving_the_cache_drops_entries_of_files_removed_or_changed(workdir):
    kept, gone, changed = (a_model(workdir / f"{n}.safetensors") for n in ("k", "g", "c"))
    file_hashes([kept, gone, changed])
    stale_key = HashCache.key(changed)
    os.remove(gone)
    a_model(workdir / "c.safetensors", {"v": "new"})
    file_hashes([])  # loads and saves the cache
    data = HashCache().data
    assert HashCache.key(kept) in data and stale_key not in data
    assert not any(k.startswith(os.path.realpath(gone) + "|") for k in data)
