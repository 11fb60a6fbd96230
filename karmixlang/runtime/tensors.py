"""Tensor I/O for the runtime: read one tensor by its header offsets, turn a result into the
bytes of its output dtype.

Inputs are read with positional reads straight into a fresh torch buffer rather than through a
memory map: mapped pages count toward the process's resident memory until unmapped, so merging
four 2 GB files through mmap would hold 8 GB resident; a read buffer is freed with the key.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.header import TensorInfo, os_fail

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)

COMPUTE = {"fp32": torch.float32, "fp64": torch.float64}


class Reader:
    """Positional reads from input files; one descriptor per file, shared by all threads
    (pread does not move a file offset, so it needs no lock)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    os_fail(exc, path, None)
                self._fds[path] = fd
            return fd

    def read(self, info: TensorInfo, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's bytes read into a fresh buffer, or into `into` (a uint8 scratch buffer
        of exactly info.nbytes that the caller reuses). A virtual tensor's parts are read one
        after the other into the same buffer: a concatenation along dim 0 is one of bytes."""
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise KmxError([error("K0302", f"`{info.file}`: key `{info.name}` has dtype "
                                  f"{info.dtype}, which this torch cannot hold")])
        buf = into if into is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view, at = memoryview(buf.numpy()), 0
            for seg in info.segments:
                self._read_into(seg, view[at:at + seg.nbytes])
                at += seg.nbytes
        if info.transpose:  # a copy: the transpose of the stored 2-D tensor, contiguous
            return buf.view(dtype).reshape(info.shape[::-1]).t().contiguous()
        if info.gather:
            rows = info.nbytes // (DTYPES[info.dtype].itemsize * math.prod(info.shape[1:]) or 1)
            return gather_rows(buf.view(dtype).reshape((rows,) + info.shape[1:]), info)
        return buf.view(dtype).reshape(info.shape)

    def _read_into(self, seg: TensorInfo, view: memoryview) -> None:
        fd, done = self._fd(seg.file), 0
        while done < seg.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], seg.begin + done)
            except OSError as exc:
                raise KmxError([error("K0302", f"cannot read `{seg.file}` (key "
                                      f"`{seg.name}`): {exc.strerror}")])
            if n == 0:
                raise KmxError([error("K0302", f"`{seg.file}` ended early while reading "
                                      f"`{seg.name}`: was it truncated during the run?")])
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _indices(runs: tuple[tuple[int, int], ...], mean_row: int) -> torch.Tensor:
    return torch.cat([torch.arange(first, first + n) if first >= 0
                      else torch.full((n,), mean_row, dtype=torch.int64)
                      for first, n in runs])


def gather_rows(source: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """A row gather's tensor (a copy): the source rows its runs name, and the mean of the
    `mean` rows where a run says -1. The mean is taken in fp64 and stored in the source's
    dtype, like every row read."""
    if info.mean:
        mean = source.index_select(0, _indices(info.mean, 0)).to(torch.float64).mean(0)
        source = torch.cat([source, mean.to(source.dtype)[None]])
    return source.index_select(0, _indices(info.gather, source.shape[0] - 1))


def part(info: TensorInfo, span: tuple[int, int]) -> TensorInfo:
    """Flat elements [a, b) of a tensor, as a 1-D tensor of its own. A concatenation's
    elements are its parts' in order; a transposed tensor or a row gather has no flat byte
    range (the plan never chunks one: plan/outofcore.py)."""
    if not info.flat:
        raise ValueError(f"`{info.name}` is read transposed or by rows and cannot be read in "
                         "pieces")
    a, b = span
    item = DTYPES[info.dtype].itemsize
    pieces, at = [], 0
    for seg in info.segments:
        n = seg.nbytes // item
        lo, hi = max(a, at), min(b, at + n)
        if lo < hi:
            pieces.append(TensorInfo(seg.name, seg.dtype, (hi - lo,), seg.file,
                                     seg.begin + (lo - at) * item, seg.begin + (hi - at) * item))
        at += n
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0] if pieces else info
    return TensorInfo(info.name, info.dtype, (b - a,), first.file, 0, 0, tuple(pieces))


class Scratch:
    """Per-thread byte buffers reused from key to key. A fresh multi-megabyte buffer costs a
    page fault per 4 KB (zero-filled by the kernel): for streaming merges that was most of the
    run time. A buffer only grows, to the largest tensor its thread has handled."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, name, None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            setattr(self._local, name, buf)
        return buf[:nbytes]


def cast(t: torch.Tensor, dtype: str, scratch: Scratch | None = None,
         buffer: str = "read") -> torch.Tensor:
    """The tensor cast once to the output dtype, flat, on the CPU. With `scratch` the cast
    lands in the thread's reused `buffer` (by default the read buffer, free once the inputs
    are consumed): valid until that buffer's next use."""
    target = TORCH_DTYPES[dtype]
    t = t.detach()
    if scratch is None or t.dtype == target or t.device.type != "cpu" or t.numel() == 0:
        return t.to(device="cpu", dtype=target).contiguous().reshape(-1)
    buf = scratch.get(buffer, t.numel() * torch.empty((), dtype=target).element_size())
    return buf.view(target).copy_(t.reshape(-1))


def as_bytes(flat: torch.Tensor) -> memoryview:
    """A cast result's raw little-endian bytes (what is written)."""
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. A NaN or Inf anywhere makes the sum non-finite, and a plain sum is
    ~20x cheaper than isfinite(); only a non-finite sum (or an overflow) needs the exact test.
    Types narrower than fp32 are summed in fp32 (an fp16 sum overflows at 65504; fp8 has no
    sum of its own)."""
    if not t.is_floating_point():
        return True
    wide = t.element_size() < 4
    if math.isfinite(float(t.sum(dtype=torch.float32) if wide else t.sum())):
        return True
    return bool(torch.isfinite(t.float() if wide else t).all())
