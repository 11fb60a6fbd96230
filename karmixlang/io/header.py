"""Header-only reading of safetensors checkpoints: single files, HF sharded indexes, folders.

Planning needs every input's keys, shapes and dtypes but none of its tensor data, so this reads
the 8-byte length and the JSON header only, and validates them strictly: a bad file is reported
here, as a diagnostic pointing at the recipe line that named it, not as a crash mid-run.
Nothing is ever unpickled; pickle checkpoints are refused by name (K0308), with the
`kmx convert` command that rewrites one as safetensors in the help line.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shlex
import stat
from dataclasses import dataclass, replace
from typing import NoReturn

from karmixlang.diagnostics import KmxError, Span, did_you_mean, error
from karmixlang.io.dtypes import DTYPES

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a bigger length means a corrupt file
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_NUMEL = 2**63  # torch counts elements in int64

_HELP_CORRUPT = "the file is truncated or corrupt; download or convert it again"


def _help_pickle(path: str) -> str:
    """The exact command that converts `path` (beside it, `.safetensors` for its suffix)."""
    stem, suffix = os.path.splitext(path)
    out = stem + ".safetensors" if suffix.lower() in PICKLE_SUFFIXES else path + ".safetensors"
    return (f"convert it to safetensors: `kmx convert {shlex.quote(path)} {shlex.quote(out)}` "
            "(it rebuilds tensors only and runs none of the pickle's code), then name the "
            ".safetensors file")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor an input presents. A stored tensor is `file[begin:end]` read as `shape`
    (a view may give it another name, or another shape of the same size). A virtual one
    (io/views.py) is the bytes of `parts` (stored tensors of this dtype) concatenated — a
    concatenation along dim 0 — read as `shape`, or, with `transpose`, as the transpose of
    the 2-D tensor of shape `shape[::-1]` they hold. A row gather (plan/vocab.py) is the
    tensor of `parts` read whole and its rows picked: `gather` lists runs `(first source row,
    count)`, a run from row -1 repeating the mean of the source rows that `mean`'s runs list."""

    name: str  # the key's name in its file
    dtype: str  # a key of dtypes.DTYPES
    shape: tuple[int, ...]
    file: str  # the file holding the data (a shard, for a sharded checkpoint)
    begin: int  # absolute byte offsets in `file`
    end: int
    parts: tuple["TensorInfo", ...] = ()
    transpose: bool = False
    gather: tuple[tuple[int, int], ...] = ()
    mean: tuple[tuple[int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) if self.parts else self.end - self.begin

    @property
    def segments(self) -> tuple["TensorInfo", ...]:
        """The stored byte ranges to read, in order."""
        return self.parts or (self,)

    @property
    def virtual(self) -> bool:
        return bool(self.parts) or self.transpose

    @property
    def flat(self) -> bool:
        """Whether its elements are its stored bytes in order (so a flat range of them can be
        read alone: out-of-core chunks); a transpose or a row gather is not."""
        return not (self.transpose or self.gather)


@dataclass(frozen=True)
class CheckpointHeader:
    """What planning knows about one input. Shared through the cache: do not mutate the dicts."""

    path: str  # the file read: as given, or the index/.safetensors file found in a given folder
    tensors: dict[str, TensorInfo]  # sorted by key
    metadata: dict[str, str]  # `__metadata__`; for a sharded checkpoint, the first shard's
    files: tuple[str, ...]  # the files holding data, sorted
    total_bytes: int  # tensor data bytes, i.e. what reading every key costs


def _fail(code: str, message: str, span: Span | None, help: str | None = None) -> NoReturn:
    raise KmxError([error(code, message, span, help=help)])


# ---------------------------------------------------------------- cache

# (kind, path as given) -> (stamp, header). Keyed by the spelling too because TensorInfo.file
# embeds it; one entry per path, so a file that changes replaces its entry instead of piling up.
_CACHE: dict[tuple[str, str], tuple[tuple, CheckpointHeader]] = {}


def _stamp(st: os.stat_result) -> tuple:
    # dev+ino instead of realpath: the same identity without resolving every path component.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------- opening files safely

def _stat(path: str, span: Span | None) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        os_fail(e, path, span)


TOO_MANY_FILES_HELP = ("kmx keeps one descriptor open per input file and a few per output: "
                       "raise this shell's limit (`ulimit -n 4096`), or merge fewer files at once")


def os_fail(e: OSError, path: str, span: Span | None) -> NoReturn:
    """The diagnostic for an OSError met while finding or reading `path`."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        _fail("K0301", f"checkpoint `{path}` not found", span, help=_missing_help(path))
    if isinstance(e, PermissionError):
        _fail("K0302", f"cannot read `{path}`: permission denied", span,
              help="check the permissions of the file and of the folders above it")
    if e.errno in (errno.EMFILE, errno.ENFILE):
        _fail("K0302", f"cannot open `{path}`: too many open files", span,
              help=TOO_MANY_FILES_HELP)
    _fail("K0302", f"cannot read `{path}`: {e.strerror or e}", span)


def _missing_help(path: str) -> str:
    folder, name = os.path.split(path)
    try:
        near = did_you_mean(name, os.listdir(folder or "."))
    except OSError:
        near = None
    return f"did you mean `{os.path.join(folder, near)}`?" if near else "check the path"


def _open_regular(path: str, span: Span | None, st: os.stat_result) -> int:
    """Open a file already stat-ed as regular. O_NONBLOCK and the fstat re-check mean a file
    swapped for a FIFO in between can neither block us nor be read as a checkpoint."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        os_fail(e, path, span)
    try:
        now = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        os_fail(e, path, span)
    if _stamp(now) != _stamp(st) or not stat.S_ISREG(now.st_mode):
        os.close(fd)
        _fail("K0302", f"`{path}` changed while it was being read", span,
              help="run again once the file is no longer being written")
    return fd


def open_regular(path: str, span: Span | None = None) -> tuple[int, os.stat_result]:
    """A descriptor on the regular file `path` and its stat (K0301/K0302 otherwise).
    The caller closes it."""
    st = _stat(path, span)
    _check_regular(path, st, span)
    return _open_regular(path, span, st), st


def _check_regular(path: str, st: os.stat_result, span: Span | None) -> None:
    if stat.S_ISDIR(st.st_mode):
        _fail("K0302", f"`{path}` is a directory, not a safetensors file", span)
    if not stat.S_ISREG(st.st_mode):
        _fail("K0302", f"`{path}` is not a regular file (a FIFO, socket or device)", span,
              help="name a .safetensors file on disk")


def read_tensor_bytes(info: TensorInfo, span: Span | None = None) -> bytes:
    """The stored bytes of one tensor (for the few small buffers planning compares)."""
    try:
        fd = os.open(info.file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os_fail(e, info.file, span)
    try:
        return pread_exact(fd, info.nbytes, info.begin, info.file, span)
    finally:
        os.close(fd)


def pread_exact(fd: int, n: int, offset: int, path: str, span: Span | None) -> bytes:
    chunks, got = [], 0
    try:
        while got < n:
            chunk = os.pread(fd, n - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        os_fail(e, path, span)
    if got < n:
        _fail("K0302", f"invalid safetensors file `{path}`: truncated (ends {n - got} bytes early)",
              span, help=_HELP_CORRUPT)
    return b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key `{dup}` appears twice")
    return d


def _load_json(raw: bytes, path: str, span: Span | None, code: str) -> object:
    try:
        # Decode first: json.loads(bytes) would also accept UTF-16/32, which safetensors does not.
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        _fail(code, f"invalid header in `{path}`: not UTF-8 text", span, help=_HELP_CORRUPT)
    except (ValueError, RecursionError) as e:
        _fail(code, f"invalid header in `{path}`: malformed JSON ({e})", span, help=_HELP_CORRUPT)


# ---------------------------------------------------------------- one .safetensors file

def _read_file(path: str, span: Span | None) -> CheckpointHeader:
    st = _stat(path, span)
    _check_regular(path, st, span)
    hit = _CACHE.get(("file", path))
    if hit and hit[0] == _stamp(st):
        return hit[1]
    fd = _open_regular(path, span, st)
    gc_was_on = gc.isenabled()
    # A header becomes ~10k long-lived objects; with the collector on, each file's parse
    # re-scans all the headers kept before it, which made 50 inputs 4x slower. JSON has no cycles.
    gc.disable()
    try:
        header = _parse_file(path, fd, st.st_size, span)
    finally:
        os.close(fd)
        if gc_was_on:
            gc.enable()
    _CACHE[("file", path)] = (_stamp(st), header)
    return header


def _parse_file(path: str, fd: int, size: int, span: Span | None) -> CheckpointHeader:
    def bad(why: str, help: str = _HELP_CORRUPT) -> NoReturn:
        _fail("K0302", f"invalid safetensors file `{path}`: {why}", span, help=help)

    if size < 8:
        bad(f"only {size} bytes long, shorter than the 8-byte header length")
    first = pread_exact(fd, 8, 0, path, span)
    # torch.save writes a zip ("PK\3\4") or, before torch 1.6, a bare pickle (\x80, protocol).
    # A real header always starts with "{", which tells a coincidental length apart.
    if (first.startswith(b"PK\x03\x04") or (first[0] == 0x80 and 2 <= first[1] <= 5)) and (
            pread_exact(fd, 1, 8, path, span) != b"{"):
        _fail("K0308", f"`{path}` is a PyTorch pickle checkpoint, not safetensors", span,
              help=_help_pickle(path))
    n = int.from_bytes(first, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        bad(f"header length {n} " + ("is absurdly large" if n > MAX_HEADER_BYTES
                                     else f"runs past the end of the file ({size} bytes)"))
    obj = _load_json(pread_exact(fd, n, 8, path, span), path, span, "K0302")
    if not isinstance(obj, dict):
        bad(f"the header is a JSON {type(obj).__name__}, not an object")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad("`__metadata__` must map strings to strings")

    try:  # JSON can spell lone surrogates ("\ud800"), which no UTF-8 output could hold
        "".join([*obj, *metadata, *metadata.values()]).encode()
    except UnicodeEncodeError:
        bad("a tensor name or metadata string is not valid Unicode")

    data_start, data_size = 8 + n, size - 8 - n
    bits_of = {name: dt.bits for name, dt in DTYPES.items()}
    infos: list[TensorInfo] = []
    # The hot loop of planning (thousands of keys times dozens of inputs): inline checks only.
    for name, entry in obj.items():
        if type(entry) is not dict:
            bad(f"tensor `{name}` is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = bits_of.get(dtype) if type(dtype) is str else None
        if bits is None:
            bad(f"tensor `{name}` has unknown dtype {json.dumps(dtype)}",
                help=f"known dtypes: {', '.join(DTYPES)}")
        if type(shape) is not list:
            bad(f"tensor `{name}` has an invalid shape {json.dumps(shape)}")
        numel = extent = 1  # extent: the element count were no dimension 0
        for d in shape:
            # type() rather than isinstance: JSON true is not a dimension.
            if type(d) is not int or d < 0:
                bad(f"tensor `{name}` has an invalid shape {json.dumps(shape)}")
            numel *= d
            extent *= d or 1
        if extent >= _MAX_NUMEL:  # torch sizes and strides are int64, even for an empty tensor
            bad(f"tensor `{name}` has a shape {json.dumps(shape)} too large for any tensor")
        if type(offsets) is not list or len(offsets) != 2:
            bad(f"tensor `{name}` has invalid data_offsets {json.dumps(offsets)}")
        b, e = offsets
        if type(b) is not int or type(e) is not int or not 0 <= b <= e:
            bad(f"tensor `{name}` has invalid data_offsets {json.dumps(offsets)}")
        if e > data_size:
            bad(f"tensor `{name}` ends at byte {e}, outside the data region ({data_size} bytes)")
        if numel * bits != (e - b) * 8:
            bad(f"tensor `{name}` holds {e - b} bytes but {dtype}{shape} needs "
                f"{numel * bits / 8:g}")  # a float: numel < 2**63 here
        infos.append(TensorInfo(name, dtype, tuple(shape), path, data_start + b, data_start + e))

    _check_overlaps(infos, bad)
    infos.sort(key=lambda t: t.name)
    return CheckpointHeader(path, {t.name: t for t in infos}, metadata, (path,),
                            sum(t.nbytes for t in infos))


def _check_overlaps(infos: list[TensorInfo], bad) -> None:
    # Gaps are tolerated (other writers pad), shared bytes are not: they would alias tensors.
    last: TensorInfo | None = None  # the tensor reaching furthest so far
    for t in sorted(infos, key=lambda t: (t.begin, t.end)):
        if last is not None and t.begin < last.end and t.nbytes:
            bad(f"tensors `{last.name}` and `{t.name}` overlap in the data region")
        if last is None or t.end > last.end:
            last = t


# ---------------------------------------------------------------- sharded index

def _read_index(path: str, span: Span | None) -> CheckpointHeader:
    st = _stat(path, span)
    _check_regular(path, st, span)
    hit = _CACHE.get(("index", path))
    if hit and hit[0] == _index_stamp(st, hit[1].files):
        return hit[1]
    header = _parse_index(path, st, span)
    _CACHE[("index", path)] = (_index_stamp(st, header.files), header)
    return header


def _index_stamp(st: os.stat_result, shards: tuple[str, ...]) -> tuple:
    try:
        return (_stamp(st),) + tuple(_stamp(os.stat(f)) for f in shards)
    except OSError:
        return ()  # a shard vanished: no match, so the index is read again and reports it


def _parse_index(path: str, st: os.stat_result, span: Span | None) -> CheckpointHeader:
    def bad(why: str, help: str | None = None) -> NoReturn:
        _fail("K0309", f"invalid sharded index `{path}`: {why}", span, help=help)

    if st.st_size > MAX_HEADER_BYTES:
        bad(f"{st.st_size} bytes is far too large for an index")
    fd = _open_regular(path, span, st)
    try:
        obj = _load_json(pread_exact(fd, st.st_size, 0, path, span), path, span, "K0309")
    finally:
        os.close(fd)
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        bad("expected an object with a `weight_map` from tensor names to shard file names")

    folder = os.path.dirname(path)
    real_folder = os.path.realpath(folder or ".")
    for shard in set(weight_map.values()):
        # Checked on the resolved path too, so a symlink cannot lead outside the folder either.
        if not shard or "\0" in shard or os.path.isabs(shard) or os.path.commonpath(
                [os.path.realpath(os.path.join(real_folder, shard)), real_folder]) != real_folder:
            bad(f"shard `{shard}` is outside the index's folder",
                help="shard names must be plain file names relative to the index")
    # normpath: `a.safetensors` and `./a.safetensors` are one shard, read (and hashed) once.
    shard_of = {key: os.path.normpath(shard) for key, shard in weight_map.items()}
    by_shard: dict[str, list[str]] = {}
    for key, shard in shard_of.items():
        by_shard.setdefault(shard, []).append(key)

    shards: dict[str, CheckpointHeader] = {}
    for shard in sorted(by_shard):
        h = shards[shard] = _read_shard(os.path.join(folder, shard), path, span)
        for key in by_shard[shard]:
            if key not in h.tensors:
                bad(f"tensor `{key}` is listed in shard `{shard}` but the shard does not hold it",
                    help="the index and its shards are from different versions; download again")
    # Tensors a shard holds but the weight map does not list are ignored, as HF loaders do.
    tensors = {key: shards[shard_of[key]].tensors[key] for key in sorted(shard_of)}
    first = next(iter(shards.values()), None)
    return CheckpointHeader(path, tensors, dict(first.metadata) if first else {},
                            tuple(h.path for h in shards.values()),
                            sum(t.nbytes for t in tensors.values()))


def _read_shard(shard_path: str, index_path: str, span: Span | None) -> CheckpointHeader:
    if not os.path.lexists(shard_path):
        _fail("K0301", f"shard `{shard_path}` listed in `{index_path}` not found", span,
              help="the download is incomplete; fetch every shard the index lists")
    try:
        return _read_file(shard_path, span)
    except KmxError as e:  # say which index the shard belongs to: the recipe names only that
        raise KmxError([replace(d, message=f"{d.message} (a shard of `{index_path}`)")
                        for d in e.diagnostics]) from None


# ---------------------------------------------------------------- entry points

def read_checkpoint(path: str, span: Span | None = None) -> CheckpointHeader:
    """The header of a checkpoint: a `.safetensors` file, a `*.safetensors.index.json` (HF
    sharded), or a folder holding exactly one index (or, failing that, one .safetensors file).

    Raises KmxError (K0301, K0302, K0308, K0309) whose diagnostic names the file and carries
    `span`, the recipe place that named it. Results are cached per file identity and mtime.
    """
    st = _stat(path, span)
    if stat.S_ISDIR(st.st_mode):
        path = _resolve_folder(path, span)
    elif path.lower().endswith(PICKLE_SUFFIXES):
        _fail("K0308", f"`{path}` is a pickle checkpoint; kmx reads only safetensors", span,
              help=_help_pickle(path))
    if path.endswith(INDEX_SUFFIX):
        return _read_index(path, span)
    return _read_file(path, span)


def _resolve_folder(path: str, span: Span | None) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        os_fail(e, path, span)
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1 or (not indexes and len(files) == 1):
        return os.path.join(path, (indexes or files)[0])
    if indexes or files:
        several = indexes or files
        listed = ", ".join(f"`{os.path.join(path, n)}`" for n in several[:5])
        _fail("K0302", f"folder `{path}` holds {len(several)} "
              f"{'indexes' if indexes else '.safetensors files and no index'}", span,
              help=f"name one of them: {listed}")
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        _fail("K0308", f"folder `{path}` holds only pickle checkpoints "
              f"({', '.join(pickles[:3])}); kmx reads only safetensors", span,
              help=_help_pickle(os.path.join(path, pickles[0])))
    _fail("K0301", f"folder `{path}` holds no .safetensors file or {INDEX_SUFFIX}", span,
          help="name the checkpoint file itself, or the folder it was downloaded to")
