"""The output's data hash advanced while keys are written (io/running_hash.py): equal to
hashlib over the written file's data region, whatever the order, the pieces or the threads,
and given up (the file hashed from disk instead) whenever it could be wrong."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from karmixlang.io import hashes as hashes_module, writer as writer_module
from karmixlang.io.hashes import HashCache, same_content
from karmixlang.io.running_hash import RunningHash
from karmixlang.io.writer import CheckpointWriter, layout_output


def arrays_of(sizes: list[int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"k{i:03d}": rng.random(n).astype(np.float32 if i % 2 else np.float16)
            for i, n in enumerate(sizes)}


def layout_for(folder: str, arrays: dict, shard_bytes: int | None = None):
    tensors = [(k, {"float32": "F32", "float16": "F16"}[a.dtype.name], a.shape)
               for k, a in arrays.items()]
    return layout_output(os.path.join(folder, "m.safetensors"), tensors, {"x": "y"}, shard_bytes)


def region_sha256(path: str) -> str:
    """hashlib over the bytes after a safetensors header: independent of the writer."""
    raw = open(path, "rb").read()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


@pytest.fixture
def no_reread(monkeypatch):
    """Reading a partial file back at commit fails the test: the digest must be complete."""
    def reread(path, span=None):
        raise AssertionError(f"{path} was hashed again")
    monkeypatch.setattr(writer_module, "data_region_sha256", reread)


@pytest.fixture
def rereads(monkeypatch):
    calls = []
    real = writer_module.data_region_sha256

    def counted(path, span=None):
        calls.append(path)
        return real(path, span)
    monkeypatch.setattr(writer_module, "data_region_sha256", counted)
    return calls


def write_key(w, key: str, data: bytes, cuts: int) -> None:
    """`data` whole, or in `cuts` + 1 pieces in order (how an out-of-core key arrives)."""
    if cuts == 0 or not data:
        w.write(key, data)
        return
    bounds = sorted({0, len(data), *(len(data) * i // (cuts + 1) for i in range(1, cuts + 1))})
    for a, b in zip(bounds, bounds[1:]):
        w.write(key, data[a:b], a)


def digests(layout) -> list[str]:
    return [region_sha256(os.path.join(os.path.dirname(f.path),
                                       "." + os.path.basename(f.path) + ".kmx-partial"))
            for f in layout.files]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=0, max_size=12),
       seed=st.integers(0, 2**16), shard=st.sampled_from([None, 500]))
def test_the_running_digest_is_hashlibs_for_any_order_and_pieces(sizes, seed, shard):
    arrays = arrays_of(sizes, seed)
    order = list(arrays)
    rnd = random.Random(seed)
    rnd.shuffle(order)
    with tempfile.TemporaryDirectory() as folder:
        layout = layout_for(folder, arrays, shard)
        with CheckpointWriter(layout, hashes=True) as w:
            for k in order:
                write_key(w, k, arrays[k].tobytes(), rnd.choice([0, 0, 1, 3]))
            got = [r.hexdigest() for r in w._running]
            assert got == digests(layout)  # no key re-read by the fallback: every one complete
            assert w.data_hashes() == got
            w.abort(keep_partial=False)


def test_keys_written_by_many_threads_need_no_second_read(tmp_path, no_reread):
    arrays = arrays_of([(i * 37) % 4000 + 1 for i in range(400)], 1)
    layout = layout_for(str(tmp_path), arrays, shard_bytes=200_000)
    keys = list(arrays)
    random.Random(2).shuffle(keys)
    with CheckpointWriter(layout, hashes=True) as w:
        threads = [threading.Thread(target=lambda part: [w.write(k, arrays[k].tobytes())
                                                         for k in part], args=(keys[i::6],))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hashes = w.data_hashes()
        w.commit()
    assert len(layout.files) > 1
    assert hashes == [region_sha256(f.path) for f in layout.files]


def test_a_resumed_write_counts_the_journaled_keys(tmp_path, no_reread):
    arrays = arrays_of([50, 7, 0, 300, 12, 90], 3)
    keys = sorted(arrays)
    layout = layout_for(str(tmp_path), arrays)
    w = CheckpointWriter(layout, hashes=True)
    for k in keys[3:]:
        w.write(k, arrays[k].tobytes())
    w.checkpoint()
    w.abort(keep_partial=True)
    with CheckpointWriter(layout, resume=True, hashes=True) as w:
        for k in reversed(keys[:3]):
            w.write(k, arrays[k].tobytes())
        assert w.data_hashes() == digests(layout)
        w.commit()


def test_a_finished_key_written_again_is_hashed_from_the_file(tmp_path, rereads):
    arrays = arrays_of([64, 64, 64], 4)
    first = sorted(arrays)[0]
    layout = layout_for(str(tmp_path), arrays)
    with CheckpointWriter(layout, hashes=True) as w:
        for k, a in arrays.items():
            w.write(k, a.tobytes())
        w.write(first, (arrays[first] + 1).tobytes())  # e.g. a copy redone after a failure
        assert w.data_hashes() == digests(layout)
        assert len(rereads) == 1  # the digest gave up; the file itself was hashed
        w.abort(keep_partial=False)


def test_a_key_never_written_leaves_the_digest_incomplete(tmp_path):
    arrays = arrays_of([10, 10], 5)
    layout = layout_for(str(tmp_path), arrays)
    with CheckpointWriter(layout, hashes=True) as w:
        w.write(sorted(arrays)[1], arrays[sorted(arrays)[1]].tobytes())
        assert w._running[0].hexdigest() is None
        w.abort(keep_partial=False)


def test_a_failed_read_back_gives_the_digest_up(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"h" * 4 + b"a" * 10)
    running = RunningHash(("a", "b"), [6, 4], 4, set())
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)  # a closed descriptor: the read back fails with EBADF
    running.finished("b", fd, None)
    running.finished("a", fd, memoryview(b"a" * 6))  # hashed from memory, then b is read
    assert running.hexdigest() is None
    fd = os.open(path, os.O_RDONLY)
    try:
        ok = RunningHash(("a", "b"), [6, 4], 4, set())
        ok.finished("b", fd, None)
        ok.finished("a", fd, None)
        assert ok.hexdigest() == hashlib.sha256(b"a" * 10).hexdigest()
    finally:
        os.close(fd)


def test_commit_hashes_each_file_whole_while_it_is_fsynced(tmp_path):
    arrays = arrays_of([(i * 53) % 900 + 1 for i in range(40)], 6)
    layout = layout_for(str(tmp_path), arrays, shard_bytes=20_000)
    with CheckpointWriter(layout, hashes=True) as w:
        for k, a in arrays.items():
            w.write(k, a.tobytes())
        w.commit()
    assert len(w.file_sha256) == len(layout.files) > 1
    for f, (digest, ident) in zip(layout.files, w.file_sha256):
        assert digest == hashlib.sha256(open(f.path, "rb").read()).hexdigest()
        assert same_content(ident, os.stat(f.path))  # publishing kept what was hashed


def test_the_cache_takes_a_known_hash_only_for_the_file_that_was_hashed(tmp_path, monkeypatch):
    """A hash known from writing is trusted only while the file is unchanged since: a file
    written again afterwards (even at the same size) is hashed from disk."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"\x08" + b"\0" * 7 + b"{}      " + b"a" * 64)
    real = hashes_module.compute_hashes
    read = []
    monkeypatch.setattr(hashes_module, "compute_hashes",
                        lambda p, *a, **kw: read.append(p) or real(p, *a, **kw))
    truth = real(str(path))
    known = (truth.sha256, os.stat(path))
    got = HashCache().get(str(path), data_sha256=truth.data_sha256, sha256=known)
    assert got == truth and read == []
    os.utime(path, ns=(1, 1))  # another file, as far as anyone can tell: not trusted
    got = HashCache().get(str(path), data_sha256=truth.data_sha256, sha256=known)
    assert got == truth and read == [str(path)]
    before = os.stat(path)
    with open(path, "r+b") as f:  # the same size, other bytes, written after the hashing
        f.seek(20)
        f.write(b"b")
    got = HashCache().get(str(path), data_sha256=truth.data_sha256,
                          sha256=(truth.sha256, before))
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != truth.sha256


def test_a_writer_without_hashes_keeps_none_and_hashes_from_disk_when_asked(tmp_path, rereads):
    """`kmx convert` reports no hashes: its writer spends nothing on them while writing."""
    arrays = arrays_of([30, 40], 7)
    layout = layout_for(str(tmp_path), arrays)
    with CheckpointWriter(layout) as w:
        for k, a in arrays.items():
            w.write(k, a.tobytes())
        assert w._running == []
        assert w.data_hashes() == digests(layout) and len(rereads) == 1
        w.commit()
    assert w.file_sha256 == []
