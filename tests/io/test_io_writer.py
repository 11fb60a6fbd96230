"""The output writer: layouts, sharding, crash-safe resume, and write failures."""

from __future__ import annotations

import errno
import json
import os
import random
import threading

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from karmixlang.diagnostics import KmxError
from karmixlang.io.header import read_checkpoint
from karmixlang.io.writer import CheckpointWriter, layout_output
from karmixlang.units import parse_size

NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
            "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16"}


def sample(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtypes = [np.float32, np.float16, np.int64, np.int8, np.bool_, np.float64, np.uint16]
    out = {}
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        shape = tuple(int(d) for d in rng.integers(0, 5, size=i % 3 + 1))
        out[f"layer.{i:02d}.{'weight' if i % 2 else 'bias'}"] = (rng.random(shape) * 100).astype(dt)
    return out


def specs(arrays):
    return [(k, NP_TO_ST[a.dtype.name], a.shape) for k, a in arrays.items()]


def write_all(layout, arrays, **kw):
    with CheckpointWriter(layout, **kw) as w:
        for k, a in arrays.items():
            w.write(k, a.tobytes())
        w.commit()


def load(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert got[k].tobytes() == want[k].tobytes()


# ---------------------------------------------------------------- layout

def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("500mb") == 5 * 10**8
    assert parse_size("2KiB") == 2048 and parse_size("1TB") == 10**12
    assert parse_size("1TiB") == 2**40
    assert parse_size("123") == 123 and parse_size("7B") == 7
    for bad in ("", "GB", "5 GBs", "-1GB", "1e9", "five", "0", "0.1B"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_output_is_byte_identical_to_safetensors(tmp_path):
    arrays = sample()
    for metadata in ({}, {"format": "pt"}):
        ref = str(tmp_path / "ref.safetensors")
        save_file(arrays, ref, metadata=metadata or None)
        layout = layout_output(str(tmp_path / "out.safetensors"), specs(arrays), metadata, None)
        write_all(layout, arrays)
        assert open(layout.final_path, "rb").read() == open(ref, "rb").read()


def test_output_loads_with_its_metadata(tmp_path):
    arrays = sample(20, seed=3)
    metadata = {"z": "last", "a": "first", "ss:note": "ünïcode \"quoted\"\n"}
    # The plan gets the tensors in a scrambled order: the layout must not depend on it.
    order = list(specs(arrays))
    random.Random(1).shuffle(order)
    layout = layout_output(str(tmp_path / "o.safetensors"), order, metadata, None)
    assert layout == layout_output(str(tmp_path / "o.safetensors"), specs(arrays), metadata, None)
    assert list(layout.slots) == sorted(arrays)
    write_all(layout, arrays)
    got, meta = load(layout.final_path)
    assert_same(got, arrays)
    assert meta == metadata
    assert len(layout.files[0].header) % 8 == 0


def test_sharded_output(tmp_path):
    arrays = {f"k{i}": np.full(25, i, np.float32) for i in range(7)}  # 100 bytes each
    arrays["k3"] = np.zeros(100, np.float32)  # 400 bytes: bigger than a shard, so alone
    layout = layout_output(str(tmp_path / "out" / "model.safetensors"), specs(arrays),
                         {"format": "pt"}, shard_bytes=250)
    names = [os.path.basename(f.path) for f in layout.files]
    assert names == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert [f.keys for f in layout.files] == [("k0", "k1"), ("k2",), ("k3",), ("k4", "k5"), ("k6",)]
    write_all(layout, arrays)
    assert not os.path.exists(layout.final_path)
    index = json.load(open(layout.index_path))
    assert index["metadata"]["total_size"] == layout.total_bytes == 1000
    assert index["weight_map"]["k3"] == "model-00003-of-00005.safetensors"
    h = read_checkpoint(str(tmp_path / "out"))
    assert h.path == layout.index_path and h.metadata == {"format": "pt"}
    got = {}
    for f in layout.files:
        tensors, meta = load(f.path)
        assert meta == {"format": "pt"}
        got.update(tensors)
    assert_same(got, arrays)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names + ["model.safetensors.index.json"])


def test_one_shard_is_a_plain_file(tmp_path):
    arrays = sample(4)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, shard_bytes=10**9)
    assert layout.index_path is None and [f.path for f in layout.files] == [layout.final_path]


@pytest.mark.parametrize("tensors, metadata, shard, match", [
    ([("a", "F32", (1,)), ("a", "F32", (1,))], {}, None, "duplicated"),
    ([("__metadata__", "F32", (1,))], {}, None, "reserved"),
    ([("a", "F32", (-1,))], {}, None, "shape"),
    ([("a", "F4", (3,))], {}, None, "whole bytes"),
    ([("a", "F99", (3,))], {}, None, "unknown dtype"),
    ([], {"a": 1}, None, "metadata"),
    ([], {}, 0, "positive"),
])
def test_plan_rejects_impossible_layouts(tmp_path, tensors, metadata, shard, match):
    with pytest.raises(ValueError, match=match):
        layout_output(str(tmp_path / "x.safetensors"), tensors, metadata, shard)


# ---------------------------------------------------------------- writing

def hidden(path, suffix):
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{suffix}")


def test_partial_files_until_commit(tmp_path):
    arrays = sample(3)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    w = CheckpointWriter(layout)
    for k, a in arrays.items():
        w.write(k, memoryview(a.tobytes()))
    assert not os.path.exists(layout.final_path)
    partial = hidden(layout.final_path, ".kmx-partial")
    assert os.path.getsize(partial) == layout.files[0].size
    w.commit()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # temp renamed, journal removed
    w.abort(keep_partial=False)  # after commit: a no-op, the output stays
    assert os.path.exists(layout.final_path)


def test_write_checks_its_arguments(tmp_path):
    layout = layout_output(str(tmp_path / "m.safetensors"), [("a", "F32", (2,))], {}, None)
    with CheckpointWriter(layout) as w:
        with pytest.raises(KeyError):
            w.write("b", b"\0" * 8)
        with pytest.raises(ValueError, match="needs 8 bytes"):
            w.write("a", b"\0" * 4)
        with pytest.raises(RuntimeError, match="never written"):
            w.commit()
    with pytest.raises(RuntimeError, match="closed"):
        w.write("a", b"\0" * 8)


def test_abort_keeps_or_removes_partial_files(tmp_path):
    layout = layout_output(str(tmp_path / "m.safetensors"), [("a", "F32", (2,))], {}, None)
    CheckpointWriter(layout).abort(keep_partial=True)
    assert sorted(os.listdir(tmp_path)) == [
        ".m.safetensors.kmx-journal", ".m.safetensors.kmx-partial"]
    CheckpointWriter(layout).abort(keep_partial=False)
    assert os.listdir(tmp_path) == []


def test_concurrent_writes(tmp_path):
    arrays = {f"t{i:03d}": np.random.default_rng(i).random(i % 50 + 1).astype(np.float32)
              for i in range(300)}
    layout = layout_output(str(tmp_path / "c.safetensors"), specs(arrays), {}, shard_bytes=20_000)
    keys = list(arrays)
    random.Random(0).shuffle(keys)
    with CheckpointWriter(layout) as w:
        def work(part):
            for k in part:
                w.write(k, arrays[k].tobytes())
                if k.endswith("7"):
                    w.checkpoint()  # checkpoints racing with writes must lose nothing

        threads = [threading.Thread(target=work, args=(keys[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.commit()
    got = {}
    for f in layout.files:
        got.update(load(f.path)[0])
    assert_same(got, arrays)


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("shard_bytes", [None, 60])
def test_resume_after_crash_is_byte_identical(tmp_path, shard_bytes):
    arrays = sample(14, seed=5)
    keys = sorted(arrays)
    def plan(folder):
        return layout_output(str(tmp_path / folder / "m.safetensors"), specs(arrays), {"a": "b"},
                           shard_bytes)

    clean = plan("clean")
    write_all(clean, arrays)

    layout = plan("crash")
    w = CheckpointWriter(layout)
    for k in keys[:6]:
        w.write(k, arrays[k].tobytes())
    w.checkpoint()
    w.write(keys[6], arrays[keys[6]].tobytes())  # written but never journaled: must be redone
    w.abort(keep_partial=True)  # as a crash would leave it (minus the closed fds)
    journal = hidden(layout.final_path, ".kmx-journal")
    with open(journal, "ab") as f:
        f.write(b'"layer.0')  # a torn append

    w = CheckpointWriter(layout, resume=True)
    assert w.done_keys == set(keys[:6])
    for k in keys[6:10]:
        w.write(k, arrays[k].tobytes())
    w.checkpoint()
    w.abort(keep_partial=True)

    with CheckpointWriter(layout, resume=True) as w:  # a second resume reads the repaired journal
        assert w.done_keys == set(keys[:10])
        for k in keys:
            if k not in w.done_keys:
                w.write(k, arrays[k].tobytes())
        w.commit()
    for a, b in zip(clean.files, layout.files):
        assert open(a.path, "rb").read() == open(b.path, "rb").read()
    if shard_bytes:
        assert open(clean.index_path, "rb").read() == open(layout.index_path, "rb").read()
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "crash"))


def test_resume_without_journal_starts_fresh(tmp_path):
    arrays = sample(3)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    with CheckpointWriter(layout, resume=True) as w:
        assert w.done_keys == set()


def test_fresh_run_overwrites_old_partial_files(tmp_path):
    arrays = sample(3)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    w = CheckpointWriter(layout)
    w.write(sorted(arrays)[0], arrays[sorted(arrays)[0]].tobytes())
    w.checkpoint()
    w.abort(keep_partial=True)
    with CheckpointWriter(layout) as w:
        assert w.done_keys == set()
    with CheckpointWriter(layout, resume=True) as w:
        assert w.done_keys == set()


def crashed(tmp_path, arrays, metadata=None):
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), metadata or {}, None)
    w = CheckpointWriter(layout)
    k = sorted(arrays)[0]
    w.write(k, arrays[k].tobytes())
    w.checkpoint()
    w.abort(keep_partial=True)
    return layout


def expect_k0404(layout, contains):
    with pytest.raises(KmxError) as info:
        CheckpointWriter(layout, resume=True)
    (d,) = info.value.diagnostics
    assert d.code == "K0404" and contains in d.message and "--force" in d.help
    assert layout.final_path in d.message


def test_resume_refuses_another_plan(tmp_path):
    arrays = sample(4)
    crashed(tmp_path, arrays)
    other = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {"changed": "1"}, None)
    expect_k0404(other, "planned differently")


def test_resume_refuses_damaged_partial_files(tmp_path):
    arrays = sample(4)
    layout = crashed(tmp_path, arrays)
    partial = hidden(layout.final_path, ".kmx-partial")
    with open(partial, "r+b") as f:
        f.write(b"\xff" * 9)
    expect_k0404(layout, "does not match")
    os.unlink(partial)
    expect_k0404(layout, "missing")


def test_resume_refuses_corrupt_journal(tmp_path):
    arrays = sample(4)
    layout = crashed(tmp_path, arrays)
    journal = hidden(layout.final_path, ".kmx-journal")
    lines = open(journal, "rb").read().split(b"\n")
    open(journal, "wb").write(b"\n".join([lines[0], b"{not json", *lines[1:]]))
    expect_k0404(layout, "corrupt")
    open(journal, "wb").write(b"\n".join([lines[0], b'"no.such.key"', b""]))
    expect_k0404(layout, "does not have")


# ---------------------------------------------------------------- failures

def expect_k0402(fn, final_path):
    with pytest.raises(KmxError) as info:
        fn()
    (d,) = info.value.diagnostics
    assert d.code == "K0402" and final_path in d.message
    return d


def test_disk_full_while_writing(tmp_path, monkeypatch):
    arrays = sample(3)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    with CheckpointWriter(layout) as w:
        def full(*a):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "pwrite", full)
        k = sorted(arrays)[0]
        d = expect_k0402(lambda: w.write(k, arrays[k].tobytes()), layout.final_path)
        assert "No space left on device" in d.message and "--resume" in d.help
    assert not os.path.exists(layout.final_path)


def test_not_enough_space_is_reported_up_front(tmp_path, monkeypatch):
    layout = layout_output(str(tmp_path / "m.safetensors"), [("a", "F32", (1000,))], {}, None)
    real = os.statvfs(tmp_path)
    fake = os.statvfs_result((real.f_bsize, 1, real.f_blocks, 0, 0, 0, 0, 0, 0, real.f_namemax))
    monkeypatch.setattr(os, "statvfs", lambda p: fake)
    d = expect_k0402(lambda: CheckpointWriter(layout), layout.final_path)
    assert "free" in d.message
    assert os.listdir(tmp_path) == []


def test_folder_removed_before_commit(tmp_path):
    folder = tmp_path / "out"
    arrays = sample(2)
    layout = layout_output(str(folder / "m.safetensors"), specs(arrays), {}, None)
    w = CheckpointWriter(layout)
    for k, a in arrays.items():
        w.write(k, a.tobytes())
    for name in os.listdir(folder):
        os.unlink(folder / name)
    os.rmdir(folder)
    expect_k0402(w.commit, layout.final_path)
    assert not os.path.exists(layout.final_path)


def test_output_folder_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    layout = layout_output(str(tmp_path / "file" / "m.safetensors"), [("a", "F32", (1,))], {}, None)
    expect_k0402(lambda: CheckpointWriter(layout), layout.final_path)


def test_no_descriptors_leak_on_failure(tmp_path, monkeypatch):
    arrays = sample(3)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, 50)
    before = len(os.listdir("/proc/self/fd"))

    def broken(fd, n):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", broken)
    for _ in range(3):
        with pytest.raises(KmxError):
            CheckpointWriter(layout)
    assert len(os.listdir("/proc/self/fd")) == before
    assert os.listdir(tmp_path) == []  # a failed fresh start leaves nothing behind


def _fake_fallocate(err):
    import ctypes

    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(err)
        return -1
    return lambda: fallocate


def test_partial_files_are_allocated_up_front(tmp_path):
    # Where the file system allocates (ext4, xfs, tmpfs), every block of the partial file
    # exists before the first key is written.
    from karmixlang.io import writer as writer_mod

    probe = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        if writer_mod._fallocate() is None or writer_mod._fallocate()(probe, 0, 0, 4096) != 0:
            pytest.skip("this file system does not allocate ahead")
    finally:
        os.close(probe)
        os.remove(tmp_path / "probe")
    arrays = sample(12)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    with CheckpointWriter(layout) as w:
        partial = os.stat(w._temps[0])
        assert partial.st_size == layout.files[0].size
        assert partial.st_blocks * 512 >= partial.st_size
        for k, a in arrays.items():
            w.write(k, a.tobytes())
        w.commit()
    assert_same(load(layout.final_path)[0], arrays)


def test_a_file_system_that_cannot_allocate_ahead_still_gets_its_output(tmp_path, monkeypatch):
    from karmixlang.io import writer as writer_mod

    monkeypatch.setattr(writer_mod, "_fallocate", _fake_fallocate(errno.EOPNOTSUPP))
    arrays = sample(6)
    layout = layout_output(str(tmp_path / "m.safetensors"), specs(arrays), {}, None)
    write_all(layout, arrays)
    assert_same(load(layout.final_path)[0], arrays)


def test_a_disk_full_when_allocating_is_k0402_and_leaves_nothing(tmp_path, monkeypatch):
    from karmixlang.io import writer as writer_mod

    monkeypatch.setattr(writer_mod, "_fallocate", _fake_fallocate(errno.ENOSPC))
    layout = layout_output(str(tmp_path / "m.safetensors"), [("a", "F32", (1000,))], {}, None)
    d = expect_k0402(lambda: CheckpointWriter(layout), layout.final_path)
    assert "No space left on device" in d.message
    assert os.listdir(tmp_path) == []
