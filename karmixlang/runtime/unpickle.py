"""Reading a PyTorch pickle checkpoint (`torch.save`: the zip format, and the legacy one of
torch < 1.6) without running any of its code, for `kmx convert`.

A pickle is a program: every global it names is looked up and may be called. This unpickler
looks globals up in a short allow-list of its own and never imports a module the file names:
- the tensor rebuilders torch writes (`torch._utils._rebuild_tensor_v2` and its older and
  Parameter forms) become *our* functions, which return a `PickledTensor` (storage, offset,
  shape, stride) without touching torch;
- `torch.*Storage` types become `StorageType` markers that carry only a dtype;
- `collections.OrderedDict`, `builtins.set`/`frozenset`/`bytearray`/`slice`/`complex` and a
  latin-1/UTF-8-only `_codecs.encode` (plain data constructors);
- globals of numpy, torch (its dtypes, `torch.Size`, ...) and (pytorch_)lightning — the
  training metadata Lightning checkpoints carry — become `Opaque` placeholders: recorded,
  never imported, never called, and skipped by the conversion;
- any other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) refuses the whole
  file with K0330, before anything it names could run.
Tensor data is not read here: `StorageRef.read()` reads one storage when the converter needs
it, so converting holds one storage at a time, not the whole model.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NoReturn

from karmixlang.diagnostics import KmxError, error

# torch's storage class names -> safetensors dtypes (UntypedStorage holds bytes)
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3", "Float8_e5m2Storage": "F8_E5M2",
    "UntypedStorage": "U8",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Modules whose globals are training metadata: kept as inert placeholders, never imported.
OPAQUE_MODULES = ("numpy", "torch", "pytorch_lightning", "lightning")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_HELP_CORRUPT = "the file is truncated, corrupt or not written by torch.save; get it again"


def _fail(code: str, msg: str, help: str | None = None) -> NoReturn:
    raise KmxError([error(code, msg, help=help)])


@dataclass(frozen=True)
class StorageType:
    dtype: str  # safetensors name


@dataclass
class StorageRef:
    """One storage of the file: `numel` elements of `dtype`, read on demand."""
    key: str
    dtype: str
    numel: int
    _read: object = field(repr=False)  # () -> bytes

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def read(self) -> bytes:
        data = self._read()
        if len(data) != self.nbytes:
            _fail("K0331", f"storage `{self.key}` holds {len(data)} bytes, not the "
                  f"{self.nbytes} its tensors need", _HELP_CORRUPT)
        return data


@dataclass(frozen=True)
class PickledTensor:
    """A tensor as the file describes it: a strided view of (part of) a storage."""
    storage: StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Opaque:
    """A value built from a global kmx does not rebuild: what was named, never run. Each
    such global becomes a subclass (a type, so that NEWOBJ accepts it) naming it."""
    global_name = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<{self.global_name}>"


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, StorageRef) or not isinstance(offset, int) or not all(
            isinstance(x, int) and x >= 0 for x in (*size, *stride)) or len(size) != len(stride):
        _fail("K0331", "a tensor record of the pickle is malformed", _HELP_CORRUPT)
    return PickledTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *rest):
    return data  # a Parameter is its tensor; requires_grad and hooks do not matter here


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        _fail("K0330", "the pickle calls `_codecs.encode` with arguments kmx does not allow")
    return text.encode(encoding)


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("_codecs", "encode"): _codecs_encode,
}
ALLOWED.update({("__builtin__", name): f for (m, name), f in ALLOWED.items() if m == "builtins"})


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storage):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storage = storage  # persistent id -> StorageRef

    def find_class(self, module, name):
        if isinstance(module, str) and isinstance(name, str):
            found = ALLOWED.get((module, name))
            if found is not None:
                return found
            if module == "torch" and name in STORAGE_DTYPES:
                return StorageType(STORAGE_DTYPES[name])
            if module.split(".")[0] in OPAQUE_MODULES:
                return type("Opaque", (Opaque,), {"global_name": f"{module}.{name}"})
        _fail("K0330", f"`{self._path}` calls `{module}.{name}` when unpickled, which could run "
              "code; kmx refused the file and ran nothing",
              help="kmx convert rebuilds tensors and plain containers only; if you trust the "
                   "file, load it with torch and save its state dict with "
                   "safetensors.torch.save_file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], StorageType) and isinstance(pid[4], int)
                and pid[4] >= 0):
            _fail("K0331", f"`{self._path}`: a storage record of the pickle is malformed",
                  _HELP_CORRUPT)
        return self._storage(pid)


def _unpickle(file, path: str, storage=None):
    """One pickle from `file` (left just after it); `storage` resolves persistent ids."""
    def no_storage(pid):
        _fail("K0331", f"`{path}`: unexpected storage record", _HELP_CORRUPT)

    try:
        return _Unpickler(file, path, storage or no_storage).load()
    except KmxError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeError, OverflowError, MemoryError,
            RecursionError) as exc:
        _fail("K0331", f"`{path}` is not a readable torch checkpoint: {exc}", _HELP_CORRUPT)


def load(path: str):
    """The object a `torch.save` file holds, with PickledTensors for its tensors. Raises
    KmxError: K0330 (a global kmx does not allow), K0331 (not a torch.save file it can read),
    K0301 (cannot open it)."""
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            return _load_legacy(f, path)
    except OSError as exc:
        _fail("K0301", f"cannot read `{path}`: {exc.strerror or exc}")
    except zipfile.BadZipFile as exc:
        _fail("K0331", f"`{path}` is not a readable torch checkpoint: {exc}", _HELP_CORRUPT)


def _load_zip(path: str):
    zf = zipfile.ZipFile(path)  # kept open by the storages' readers until they are freed
    names = set(zf.namelist())
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        _fail("K0331", f"`{path}` is a zip archive but not one torch.save wrote (no single "
              "`<name>/data.pkl`)", _HELP_CORRUPT)
    prefix = pkl[0][:-len("data.pkl")]
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder") != b"little":
        _fail("K0331", f"`{path}` was saved on a big-endian machine, which kmx does not read",
              help="load and save it again with torch on a little-endian machine")
    storages: dict[str, StorageRef] = {}

    def storage(pid):
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                _fail("K0331", f"`{path}` lacks the storage record `{member}`", _HELP_CORRUPT)
            storages[key] = StorageRef(key, stype.dtype, numel, lambda: zf.read(member))
        return _same(storages[key], stype, numel, path)

    return _unpickle(io.BytesIO(zf.read(pkl[0])), path, storage)


def _same(ref: StorageRef, stype: StorageType, numel: int, path: str) -> StorageRef:
    if (ref.dtype, ref.numel) != (stype.dtype, numel):
        _fail("K0331", f"`{path}`: storage `{ref.key}` is described twice, differently",
              _HELP_CORRUPT)
    return ref


def _load_legacy(f, path: str):
    """torch < 1.6: pickles of the magic number, the protocol, system info and the object,
    then the list of storage keys, then each storage as its element count (int64) and bytes.
    (Old storage views, a 6th persistent-id field, are not read: K0331.)"""
    if _unpickle(f, path) != LEGACY_MAGIC:
        _fail("K0331", f"`{path}` is neither a zip nor a legacy torch.save file",
              "kmx reads PyTorch checkpoints written by torch.save (zip or the pre-1.6 format)")
    if _unpickle(f, path) != LEGACY_PROTOCOL:
        _fail("K0331", f"`{path}`: unknown legacy torch.save protocol", _HELP_CORRUPT)
    _unpickle(f, path)  # system info: byte order and sizes of C types
    storages: dict[str, StorageRef] = {}

    def storage(pid):
        if len(pid) > 5 and pid[5] is not None:
            _fail("K0331", f"`{path}` uses storage views of torch < 0.4, which kmx does not "
                  "read", help="load and save it again with a newer torch")
        key = str(pid[2])
        storages.setdefault(key, StorageRef(key, pid[1].dtype, pid[4], None))
        return _same(storages[key], pid[1], pid[4], path)

    obj = _unpickle(f, path, storage)
    keys = _unpickle(f, path)
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        _fail("K0331", f"`{path}`: its storage list does not match its tensors", _HELP_CORRUPT)
    offset = f.tell()
    size = os.fstat(f.fileno()).st_size
    for key in map(str, keys):
        ref = storages[key]
        numel = int.from_bytes(_pread(path, 8, offset), "little", signed=True)
        if numel != ref.numel or offset + 8 + ref.nbytes > size:
            _fail("K0331", f"`{path}`: storage `{key}` is truncated or mislabelled",
                  _HELP_CORRUPT)
        ref._read = lambda at=offset + 8, n=ref.nbytes: _pread(path, n, at)
        offset += 8 + ref.nbytes
    return obj


def _pread(path: str, n: int, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(n)
    if len(data) != n:
        _fail("K0331", f"`{path}` ended early", _HELP_CORRUPT)
    return data
