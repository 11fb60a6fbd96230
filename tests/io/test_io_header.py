"""Header reading: valid single and sharded checkpoints, and a corpus of broken files that must
each give the right code and name the file. Every file is built here, tiny, by hand or with
safetensors.numpy."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import tempfile
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from karmixlang.diagnostics import KmxError, Span
from karmixlang.io import header as header_mod
from karmixlang.io.dtypes import DTYPES, nbytes, parse_user_dtype
from karmixlang.io.hashes import hash_data_region
from karmixlang.io.header import read_checkpoint
from conftest import fuzz_examples

SPAN = Span("merge.kmx", 3, 9, 3, 30)


def st_bytes(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-shaped file from raw parts, so each can be broken on purpose."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(body) if length is None else length).to_bytes(8, "little") + body + data


def raw_file(path, header: bytes | dict, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(st_bytes(header, data))
    return str(path)


def expect(code: str, path, *, contains: str | None = None):
    with pytest.raises(KmxError) as info:
        read_checkpoint(str(path), SPAN)
    (diag,) = info.value.diagnostics
    assert diag.code == code, diag.message
    name = os.path.basename(str(path))
    assert name in diag.message or name in (diag.help or "")
    assert diag.span == SPAN
    if contains:
        assert contains in diag.message + (diag.help or "")
    return diag


def tensor(dtype="F32", shape=(2,), b=0, e=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [b, e]}


# ---------------------------------------------------------------- valid files

def test_single_file_offsets_point_at_the_data(tmp_path):
    arrays = {"b": np.arange(3, dtype=np.float16), "a": np.ones((2, 2), np.float32),
              "c": np.arange(3, dtype=np.int64), "empty": np.zeros(0, np.float32)}
    path = str(tmp_path / "m.safetensors")
    save_file(arrays, path, metadata={"format": "pt"})
    h = read_checkpoint(path)
    assert list(h.tensors) == sorted(arrays)
    assert h.metadata == {"format": "pt"}
    assert h.files == (path,)
    assert h.total_bytes == sum(a.nbytes for a in arrays.values())
    raw = open(path, "rb").read()
    for name, a in arrays.items():
        t = h.tensors[name]
        assert (t.name, t.shape, t.file) == (name, a.shape, path)
        assert raw[t.begin:t.end] == a.tobytes() and t.nbytes == a.nbytes


def make_sharded(folder, extra_in_shard=False):
    os.makedirs(folder, exist_ok=True)
    s1 = {"a": np.ones(2, np.float32), "b": np.arange(4, dtype=np.float16)}
    s2 = {"c": np.full(3, 7, np.int32)}
    if extra_in_shard:
        s2["not_listed"] = np.zeros(1, np.float32)
    for i, shard in enumerate((s1, s2), 1):
        save_file(shard, os.path.join(folder, f"model-0000{i}-of-00002.safetensors"),
                  metadata={"format": "pt"})
    index = {"metadata": {"total_size": 26},
             "weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00001-of-00002.safetensors",
                            "c": "./model-00002-of-00002.safetensors"}}
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path, "w") as f:
        json.dump(index, f)
    return path, {**s1, **s2}


def test_sharded_checkpoint_read_through_index_and_folder(tmp_path):
    index, arrays = make_sharded(str(tmp_path / "m"), extra_in_shard=True)
    for given in (index, str(tmp_path / "m")):
        h = read_checkpoint(given)
        assert h.path == index
        assert list(h.tensors) == ["a", "b", "c"]  # the unlisted shard tensor is ignored
        assert h.metadata == {"format": "pt"}
        assert [os.path.basename(f) for f in h.files] == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for name, t in h.tensors.items():
            with open(t.file, "rb") as f:
                f.seek(t.begin)
                assert f.read(t.nbytes) == arrays[name].tobytes()
        assert h.total_bytes == 8 + 8 + 12


def test_escaped_names_read_back(tmp_path):
    body = b'{"smile\\ud83d\\ude00":%s}' % json.dumps(tensor()).encode()
    path = raw_file(tmp_path / "e.safetensors", body, b"\0" * 8)
    assert list(read_checkpoint(path).tensors) == ["smile\U0001F600"]


def test_folder_with_one_file(tmp_path):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "only.safetensors"))
    assert read_checkpoint(str(tmp_path)).path == str(tmp_path / "only.safetensors")


def test_results_are_cached_until_the_file_changes(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"x": np.zeros(1, np.float32)}, path)
    first = read_checkpoint(path)
    assert read_checkpoint(path) is first
    save_file({"y": np.zeros(2, np.float32)}, path)
    os.utime(path, ns=(1, 1))  # mtime granularity may be coarser than this test is fast
    assert list(read_checkpoint(path).tensors) == ["y"]


def test_hash_covers_data_only_and_combines_shards(workdir):
    tmp_path = workdir  # hash_data_region caches in the user cache: the test's own
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"x": np.arange(4, dtype=np.float32)}, a, metadata={"v": "1"})
    save_file({"x": np.arange(4, dtype=np.float32)}, b, metadata={"v": "2, a longer one"})
    data = np.arange(4, dtype=np.float32).tobytes()
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert hash_data_region(a) == hash_data_region(b) == expected
    save_file({"x": np.arange(1, 5, dtype=np.float32)}, b)
    assert hash_data_region(b) != expected

    index, _ = make_sharded(str(tmp_path / "m"))
    files = read_checkpoint(index).files
    def data_digest(f):
        raw = open(f, "rb").read()
        return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).digest()

    combined = hashlib.sha256(b"".join(map(data_digest, files))).hexdigest()
    assert hash_data_region(index) == "sha256:" + combined


# ---------------------------------------------------------------- broken files

ENTRY = tensor("F32", (2,), 0, 8)
Z8 = b"\0" * 8
BROKEN = [  # (case, code, message fragment, file content)
    ("too_short", "K0302", "shorter", b"\x01\x02\x03"),
    ("header_length_past_eof", "K0302", "past the end", st_bytes(b"{}", length=1000)),
    ("absurd_header_length", "K0302", "absurd", st_bytes(b"{}", length=2**63)),
    ("truncated_in_header", "K0302", "past the end", st_bytes(b'{"a":', length=40)),
    ("truncated_data", "K0302", "outside the data", st_bytes({"x": ENTRY}, b"\0" * 5)),
    ("malformed_json", "K0302", "malformed JSON", st_bytes(b'{"a": ')),
    ("json_array", "K0302", "not an object", st_bytes(b"[1, 2]")),
    ("not_utf8", "K0302", "UTF-8", st_bytes(b'{"\xff": 1}')),
    ("deep_nesting", "K0302", "JSON", st_bytes(b"[" * 200_000)),
    ("duplicate_key", "K0302", "twice",
     st_bytes(b'{"x":%s,"x":%s}' % ((json.dumps(ENTRY).encode(),) * 2), Z8)),
    ("overlap", "K0302", "overlap",
     st_bytes({"x": tensor(b=0, e=8), "y": tensor(b=4, e=12)}, b"\0" * 12)),
    ("outside_data", "K0302", "outside", st_bytes({"x": tensor(b=8, e=16)}, Z8)),
    ("reversed_offsets", "K0302", "data_offsets", st_bytes({"x": tensor(b=8, e=0)}, Z8)),
    ("size_shape_mismatch", "K0302", "needs 12", st_bytes({"x": tensor(shape=(3,), e=8)}, Z8)),
    ("sub_byte_not_whole", "K0302", "needs", st_bytes({"x": tensor("F4", (3,), 0, 1)}, b"\0")),
    ("unknown_dtype", "K0302", "F17", st_bytes({"x": tensor("F17")}, Z8)),
    ("unhashable_dtype", "K0302", "dtype", st_bytes({"x": tensor(["F32"])}, Z8)),
    ("negative_dim", "K0302", "shape", st_bytes({"x": tensor(shape=(-2,))}, Z8)),
    ("bool_dim", "K0302", "shape", st_bytes({"x": {**ENTRY, "shape": [True]}}, Z8)),
    ("string_offsets", "K0302", "data_offsets",
     st_bytes({"x": {**ENTRY, "data_offsets": ["0", "8"]}}, Z8)),
    ("lone_surrogate_name", "K0302", "Unicode",
     st_bytes(b'{"\\ud800":%s}' % json.dumps(ENTRY).encode(), Z8)),
    ("entry_not_object", "K0302", "not an object", st_bytes({"x": 3})),
    ("metadata_not_strings", "K0302", "__metadata__", st_bytes({"__metadata__": {"k": 1}})),
    ("zip_pickle_renamed", "K0308", "convert it to safetensors", b"PK\x03\x04" + b"\0" * 60),
]


@pytest.mark.parametrize("case, code, contains, content", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_file(tmp_path, case, code, contains, content):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    expect(code, path, contains=contains)


def test_overlap_allows_gaps_and_empty_tensors(tmp_path):
    path = raw_file(tmp_path / "gaps.safetensors",
                    {"x": tensor(b=0, e=8), "e": tensor(shape=(0,), b=4, e=4),
                     "y": tensor(b=16, e=24)},
                    b"\0" * 24)
    assert list(read_checkpoint(path).tensors) == ["e", "x", "y"]


def test_missing_file_suggests_a_near_name(tmp_path):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    diag = expect("K0301", tmp_path / "modle.safetensors")
    assert "model.safetensors" in diag.help


def test_pickle_files_are_refused_unread(tmp_path):
    for name in ("sd.ckpt", "w.pt", "w.pth", "pytorch_model.bin"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04 would be unpickled")
        expect("K0308", path, contains="convert it to safetensors")
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(KmxError) as info:
        read_checkpoint(str(tmp_path / "hf"), SPAN)
    assert info.value.diagnostics[0].code == "K0308"


def test_folders(tmp_path):
    os.makedirs(tmp_path / "empty")
    expect("K0301", tmp_path / "empty", contains="no .safetensors")
    os.makedirs(tmp_path / "two")
    for n in ("a", "b"):
        save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "two" / f"{n}.safetensors"))
    expect("K0302", tmp_path / "two", contains="name one")


def test_directory_where_a_file_is_expected(tmp_path):
    folder = tmp_path / "m"
    os.makedirs(folder / "shard.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
    diag = expect("K0302", index, contains="is a directory")
    assert "shard.safetensors" in diag.message


def test_fifo_is_refused_without_blocking(tmp_path):
    path = str(tmp_path / "pipe.safetensors")
    os.mkfifo(path)
    result = []

    def read():  # in a thread, so a regression shows as a failure, not a hung test run
        try:
            read_checkpoint(path, SPAN)
        except KmxError as e:
            result.append(e.diagnostics[0])

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert result and result[0].code == "K0302" and "not a regular file" in result[0].message


def test_unreadable_file(tmp_path):
    locked = tmp_path / "locked"
    os.makedirs(locked)
    save_file({"x": np.zeros(1, np.float32)}, str(locked / "m.safetensors"))
    os.chmod(locked, 0)
    try:
        if os.access(locked / "m.safetensors", os.R_OK):
            pytest.skip("running as root: permissions do not stop reads (see the mocked test)")
        expect("K0302", locked / "m.safetensors", contains="permission denied")
    finally:
        os.chmod(locked, stat.S_IRWXU)


def test_permission_denied_reported(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(path))
    real_open = os.open

    def deny(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    expect("K0302", path, contains="permission denied")
    real_stat = os.stat

    def deny_stat(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", deny_stat)
    expect("K0302", path, contains="permission denied")


# ---------------------------------------------------------------- sharded indexes

def write_index(folder, weight_map, extra=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path, "w") as f:
        json.dump({"weight_map": weight_map, **(extra or {})}, f)
    return path


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "",
                                   "sub/../../outside.safetensors", "link.safetensors"])
def test_index_shard_outside_folder(tmp_path, shard):
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "outside.safetensors"))
    os.makedirs(tmp_path / "m")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "m" / "link.safetensors")
    index = write_index(str(tmp_path / "m"), {"x": shard})
    expect("K0309", index, contains="outside the index's folder")


def test_index_symlink_inside_folder_is_fine(tmp_path):
    folder = tmp_path / "m"
    os.makedirs(folder / "blobs")
    save_file({"x": np.zeros(1, np.float32)}, str(folder / "blobs" / "abc"))
    os.symlink(folder / "blobs" / "abc", folder / "model.safetensors")  # the HF cache layout
    index = write_index(str(folder), {"x": "model.safetensors"})
    assert list(read_checkpoint(index).tensors) == ["x"]


def test_index_with_missing_shard(tmp_path):
    index = write_index(str(tmp_path / "m"), {"x": "model-00001-of-00002.safetensors"})
    diag = expect("K0301", index)
    assert "model-00001-of-00002.safetensors" in diag.message


def test_index_key_missing_from_its_shard(tmp_path):
    index, _ = make_sharded(str(tmp_path / "m"))
    data = json.load(open(index))
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    json.dump(data, open(index, "w"))
    diag = expect("K0309", index, contains="ghost")
    assert "model-00001-of-00002.safetensors" in diag.message


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"weight_map": []}',
                                     b'{"weight_map": {"x": 1}}', b'{"metadata": {}}'])
def test_malformed_index(tmp_path, content):
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(content)
    expect("K0309", path)


# ---------------------------------------------------------------- dtypes

def test_dtype_table_and_spellings():
    assert {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8",
            "BOOL"} <= DTYPES.keys()
    assert DTYPES["BF16"].itemsize == 2 and DTYPES["BF16"].is_float and not DTYPES["I8"].is_float
    assert nbytes("F4", (4,)) == 2 and nbytes("F4", (3,)) is None and nbytes("X", (1,)) is None
    with pytest.raises(ValueError):
        DTYPES["F4"].itemsize
    for spelled, want in [("fp16", "F16"), ("half", "F16"), ("BF16", "BF16"),
                          ("torch.bfloat16", "BF16"), ("float", "F32"), ("fp32", "F32"),
                          ("double", "F64"), ("fp64", "F64"), ("fp8_e4m3fn", "F8_E4M3"),
                          ("float8_e5m2", "F8_E5M2"), (" Float16 ", "F16")]:
        assert parse_user_dtype(spelled) == want
    assert parse_user_dtype("int8") is None and parse_user_dtype("fp17") is None


def test_safetensors_itself_agrees_on_the_dtype_names(tmp_path):
    # numpy covers the non-float half of the table; names must match what safetensors writes.
    for np_dtype in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                     np.uint8, np.bool_, np.uint16, np.uint32, np.uint64):
        path = str(tmp_path / f"{np.dtype(np_dtype).name}.safetensors")
        save_file({"x": np.zeros(3, np_dtype)}, path)
        t = read_checkpoint(path).tensors["x"]
        assert DTYPES[t.dtype].bits == np.dtype(np_dtype).itemsize * 8


# ---------------------------------------------------------------- fuzzing

def _valid_header_bytes() -> bytes:
    return json.dumps({"__metadata__": {"k": "v"}, "a": tensor("F32", (2,), 0, 8),
                       "b": tensor("F16", (2, 2), 8, 16)}).encode()


_FUZZ_DIR = tempfile.mkdtemp(prefix="kmx-fuzz-")
_FUZZ_N = itertools.count()


def _read_or_kmx_error(content: bytes) -> None:
    # A new name each time: rewriting one path faster than mtime ticks could hit the cache.
    path = os.path.join(_FUZZ_DIR, f"{next(_FUZZ_N)}.safetensors")
    with open(path, "wb") as f:
        f.write(content)
    try:
        read_checkpoint(path)
    except KmxError as e:
        assert e.diagnostics[0].code in {"K0302", "K0308"}
    finally:
        os.unlink(path)
        header_mod._CACHE.clear()


@settings(max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(content):
    _read_or_kmx_error(content)


@settings(max_examples=fuzz_examples(400), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(-3, 3), st.integers(0, 40))
def test_mutated_headers_never_crash(flips, length_delta, data_len):
    body = bytearray(_valid_header_bytes())
    for pos, byte in flips:
        body[pos % len(body)] = byte
    length = (len(body) + length_delta).to_bytes(8, "little")
    _read_or_kmx_error(length + bytes(body) + b"\0" * data_len)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-5, 50) | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                        st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "x"]),
                        kids, max_size=4), max_leaves=12))
def test_structurally_odd_headers_never_crash(obj):
    body = json.dumps({"x": obj}).encode()
    _read_or_kmx_error(len(body).to_bytes(8, "little") + body + b"\0" * 16)
