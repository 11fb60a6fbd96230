"""`kmx convert IN.ckpt OUT.safetensors`: a PyTorch pickle checkpoint rewritten as safetensors.

The pickle is read by `runtime/unpickle.py`, which runs none of its code. The tensors are the
entries of its state dict: the object itself, or what it holds under `state_dict`, `model` or
`module` (followed in that order, level by level, while a dict holds no tensor of its own:
Lightning's `{"state_dict": ...}`, DeepSpeed's `{"module": ...}`). Every other value (a
`global_step`, optimizer states, nested dicts) is skipped and listed. Each tensor is written
as its own contiguous copy (safetensors refuses tensors that share memory; a pickle stores
views of one storage), bit for bit unless `--dtype` casts its floats. The file is written
through the same writer as a run: under a hidden partial name, published by rename, never
over an input, and over an existing file only with --force.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.files import JOURNAL_SUFFIX, hidden_path, not_regular
from karmixlang.io.writer import CheckpointWriter, layout_output
from karmixlang.runtime.tensors import TORCH_DTYPES, as_bytes, cast
from karmixlang.runtime.unpickle import PickledTensor, StorageRef, load

WRAPPERS = ("state_dict", "model", "module")


@dataclass
class Converted:
    path: str
    tensors: int
    nbytes: int
    unwrapped: list[str]  # the wrapper keys followed, outermost first
    skipped: list[str]  # what was not a tensor, by key path


def state_dict(obj) -> tuple[dict[str, PickledTensor], list[str], list[str]]:
    """(tensors by key, wrapper keys followed, skipped entries described)."""
    unwrapped, skipped = [], []
    while isinstance(obj, dict) and not any(isinstance(v, PickledTensor) for v in obj.values()):
        key = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        prefix = "".join(f"{k}." for k in unwrapped)
        skipped += [f"{prefix}{k}" for k in obj if k != key]
        unwrapped.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise KmxError([error("K0332", f"the checkpoint holds a {type(obj).__name__}, not a "
                              "state dict", help="kmx convert reads a dict of tensors (a "
                              "state dict), possibly under `state_dict`, `model` or `module`")])
    prefix = "".join(f"{k}." for k in unwrapped)
    tensors = {}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, PickledTensor) and k != "__metadata__":
            tensors[k] = v
        else:
            skipped.append(f"{prefix}{k}")
    return tensors, unwrapped, skipped


def check_bounds(name: str, t: PickledTensor) -> None:
    """The view stays inside its storage (a corrupt or crafted file could point past it)."""
    if math.prod(t.shape) == 0:
        return
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
    if t.offset < 0 or last >= t.storage.numel:
        raise KmxError([error("K0331", f"tensor `{name}` reaches past the end of its storage "
                              f"({last + 1} > {t.storage.numel} elements)",
                              help="the file is corrupt; get it again")])


def tensor_bytes(t: PickledTensor, data: bytes, dtype: str) -> memoryview:
    """The tensor's bytes in `dtype`: its own copy, contiguous, row-major."""
    torch_dtype = TORCH_DTYPES[t.storage.dtype]
    base = torch.frombuffer(bytearray(data), dtype=torch_dtype) if data else \
        torch.empty(0, dtype=torch_dtype)
    view = torch.as_strided(base, t.shape, t.stride, t.offset) if math.prod(t.shape) else \
        torch.empty(t.shape, dtype=torch_dtype)
    return as_bytes(cast(view, dtype))


def _guard(src: str, dst: str, force: bool) -> None:
    if os.path.realpath(src) == os.path.realpath(dst) or (
            os.path.exists(dst) and os.path.samefile(src, dst)):
        raise KmxError([error("K0305", f"`{dst}` is the input itself",
                              help="name another output file")])
    special = not_regular(dst)
    if special:
        raise KmxError([special])
    if not force and (os.path.lexists(dst) or os.path.exists(hidden_path(dst, JOURNAL_SUFFIX))):
        raise KmxError([error("K0306", f"`{dst}` already exists (or an interrupted run of it "
                              "left its keys behind)",
                              help="pass --force to replace it, or name another output")])


def convert(src: str, dst: str, dtype: str | None = None, force: bool = False,
            metadata: dict[str, str] | None = None) -> Converted:
    """Convert `src` to `dst`; `dtype` (a safetensors name) casts float tensors."""
    if not os.path.isfile(src):
        raise KmxError([error("K0301", f"`{src}` is not a file")])
    _guard(src, dst, force)
    tensors, unwrapped, skipped = state_dict(load(src))
    if not tensors:
        raise KmxError([error("K0332", f"`{src}` holds no tensors"
                              + (f" (skipped: {', '.join(map(str, skipped[:8]))})" if skipped
                                 else ""),
                              help="kmx convert reads a dict of tensors (a state dict), "
                                   "possibly under `state_dict`, `model` or `module`")])
    out_dtype = {}
    for k, t in tensors.items():
        check_bounds(k, t)
        out_dtype[k] = dtype if dtype and DTYPES[t.storage.dtype].is_float else t.storage.dtype
    layout = layout_output(dst, [(k, out_dtype[k], t.shape) for k, t in tensors.items()],
                           {"format": "pt", **(metadata or {})}, None)
    writer = CheckpointWriter(layout)
    try:
        by_storage = sorted(tensors, key=lambda k: (tensors[k].storage.key, k))
        current: tuple[StorageRef | None, bytes] = (None, b"")
        for k in by_storage:
            t = tensors[k]
            if current[0] is not t.storage:  # each storage is read once, then dropped
                current = (t.storage, t.storage.read())
            writer.write(k, tensor_bytes(t, current[1], out_dtype[k]))
        writer.commit()
    finally:
        writer.abort(keep_partial=False)
    return Converted(dst, len(tensors), layout.total_bytes, unwrapped, skipped)
