"""Views: an input's header as another naming presents it, without touching its data.

A view maps every stored key to the key it is read as: renamed, reshaped (same bytes), several
stored tensors concatenated along dim 0 (fused q/k/v), a 2-D tensor transposed, or its rows
gathered in another vocabulary's order — a `TensorInfo` with `parts`/`transpose`/`gather`
that runtime/tensors.Reader reads. Views are built at
plan time from headers (plan/views.py decides which input is read through which).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from karmixlang.diagnostics import KmxError, Span, error
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.header import CheckpointHeader, TensorInfo
from karmixlang.io.layouts import Naming, Piece, pieces
from karmixlang.io.layouts.llm import Slice, containers, split_layer_key


@dataclass(frozen=True)
class ViewReport:
    """What reading an input through a view does, for the plan."""
    source: str  # the input's naming, in words
    target: str  # the naming it is read as
    renamed: int = 0  # keys read under another name
    fused: int = 0  # keys concatenated from several stored tensors
    reshaped: int = 0
    transposed: int = 0
    dropped: tuple[str, ...] = ()  # stored keys with no place in the target naming


def _with(header: CheckpointHeader, tensors: dict[str, TensorInfo]) -> CheckpointHeader:
    tensors = dict(sorted(tensors.items()))
    return CheckpointHeader(header.path, tensors, header.metadata, header.files,
                            sum(t.nbytes for t in tensors.values()))


def rename(header: CheckpointHeader, pattern: str, replacement: str,
           span: Span | None) -> CheckpointHeader:
    """Every key `re.sub(pattern, replacement, key)`; two keys onto one is K0314."""
    rx, out, source = re.compile(pattern), {}, {}
    for key, info in header.tensors.items():
        new = rx.sub(replacement, key)
        if new in out:
            raise KmxError([error(
                "K0314", f"rename(\"{pattern}\", \"{replacement}\") renames both `{source[new]}` "
                f"and `{key}` of `{header.path}` to `{new}`", span, label="in this rename",
                help="make the pattern more specific, or select the keys you need first")])
        out[new], source[new] = info, key
    return _with(header, out)


def slice_layers(header: CheckpointHeader, step: Slice, span: Span | None) -> CheckpointHeader:
    """The header through a layer step (`layers`, `stack`): renamed, no tensor copied. A slice
    (`layers(x, start, end)`) is checked against the input's layers first."""
    if step.others and step.end is not None and step.end > step.start:
        _check_range(header, step, span)
    out = {}
    for key, info in header.tensors.items():
        new = step.key(key)
        if new is not None:
            out[new] = info
    return _with(header, out)


def _check_range(header: CheckpointHeader, step: Slice, span: Span | None) -> None:
    """K0351-K0353 and K0350: the range names layers the input has, in one container."""
    call = f"layers(..., {step.start}, {step.end})"

    def fail(code: str, why: str, help_: str):
        raise KmxError([error(code, f"{call}: `{header.path}` {why}", span,
                              label="in this slice", help=help_)])

    stacks = containers(header.tensors)
    if not stacks:
        fail("K0351", "has no numbered layer keys", "a slice needs keys like "
             "`model.layers.N.*` or `transformer.h.N.*` (docs/language.md, \"Layer slices\")")
    if len(stacks) > 1:
        fail("K0352", "has layers under " + " and ".join(f"`{s}`" for s in stacks),
             "leave the other container out first: `layers(exclude(x, \"encoder.*\"), ...)`")
    present = {lk.index for lk in map(split_layer_key, header.tensors) if lk is not None}
    count = max(present) + 1
    if step.end > count:
        fail("K0350", f"has {count} layers (`{stacks[0]}.0` to `{stacks[0]}.{count - 1}`)",
             f"the range is half-open: `layers(x, 0, {count})` is every layer")
    missing = sorted(set(range(step.start, step.end)) - present)
    if missing:
        fail("K0353", f"has no key of layer {missing[0]} (`{stacks[0]}.{missing[0]}.*`)",
             "the file is incomplete, or a select before the slice removed that layer")


def keep(header: CheckpointHeader, test: Callable[[str], bool]) -> CheckpointHeader:
    return _with(header, {k: t for k, t in header.tensors.items() if test(k)})


def gather_rows(header: CheckpointHeader, keys: list[str], gather: tuple[tuple[int, int], ...],
                mean: tuple[tuple[int, int], ...]) -> CheckpointHeader:
    """The keys read as the rows `gather` picks (TensorInfo's row gather): each becomes a
    tensor of sum(count) rows, the rest of its shape kept."""
    rows = sum(n for _, n in gather)
    out = dict(header.tensors)
    for key in keys:
        info = out[key]
        out[key] = TensorInfo(info.name, info.dtype, (rows,) + info.shape[1:], info.file, 0, 0,
                              info.segments, gather=gather,
                              mean=mean if any(first < 0 for first, _ in gather) else ())
    return _with(header, out)


def canonical(header: CheckpointHeader, naming: Naming, arch: str, span: Span | None,
              strip: str = "") -> tuple[CheckpointHeader, ViewReport]:
    """The input read in `arch`'s single-file naming (without `strip`, the prefix of a
    prefix-less reference, whose other keys are left out)."""
    groups: dict[str, list[tuple[Piece, TensorInfo]]] = {}
    dropped = []
    for name, info in header.tensors.items():
        found = pieces(naming, name, arch)
        if found is None or not found[0].key.startswith(strip):
            dropped.append(name)
            continue
        for p in found:
            groups.setdefault(p.key, []).append((p, info))
    out, counts = {}, {"renamed": 0, "fused": 0, "reshaped": 0, "transposed": 0}
    for key, items in groups.items():
        info, kind = _build(key, items, header.path, span)
        out[key[len(strip):]] = info
        if kind:
            counts[kind] += 1
        elif key[len(strip):] != info.name:
            counts["renamed"] += 1
    target = naming_text(arch, strip)
    return _with(header, out), ViewReport(naming.describe(), target, dropped=tuple(dropped),
                                          **counts)


def naming_text(arch: str, strip: str) -> str:
    what = Naming(arch, "single-file").describe()
    return f"{what} without `{strip}`" if strip else what


def _build(key: str, items: list[tuple[Piece, TensorInfo]], path: str,
           span: Span | None) -> tuple[TensorInfo, str | None]:
    """One canonical key from its pieces, and what kind of view it is (None: a rename)."""
    p, info = items[0]
    if len(items) == 1 and p.units == (1,) and p.src is None:
        if p.transpose and len(info.shape) == 2:
            return replace(info, shape=info.shape[::-1], transpose=True), "transposed"
        if p.conv and len(info.shape) == 2:
            return replace(info, shape=info.shape + (1, 1)), "reshaped"
        return info, None
    items = sorted(items, key=lambda it: it[0].part)
    units = p.units

    def bad(why: str):
        raise KmxError([error("K0313", f"`{path}`: cannot read `{key}`: {why}", span,
                              help="the file is incomplete or not in the naming detected; "
                                   "see docs/layouts.md")])

    if [it[0].part for it in items] != list(range(len(units))):
        names = ", ".join(f"`{it[1].name}`" for it in items)
        bad(f"it is made of {len(units)} stored tensors, found {names}")
    if len({it[1].dtype for it in items}) != 1:
        bad("its parts have different dtypes")
    segments, rows = [], []
    for piece, part in items:
        seg = _rows_of(part, piece.src)
        if seg is None:
            bad(f"`{part.name}` {list(part.shape)} does not split in {piece.src[1]}")
        segments.append(seg)
        rows.append(seg.shape[0] if seg.shape else 0)
    tail = {seg.shape[1:] for seg in segments}
    unit = rows[0] // units[0] if units[0] else 0
    if len(tail) != 1 or any(r != unit * u for r, u in zip(rows, units)) or not unit:
        bad("its parts' shapes do not fit together: "
            + ", ".join(str(list(s.shape)) for s in segments))
    shape = (sum(rows),) + segments[0].shape[1:]
    return TensorInfo(key, info.dtype, shape, segments[0].file, 0, 0, tuple(segments)), "fused"


def _rows_of(info: TensorInfo, src: tuple[int, int] | None) -> TensorInfo | None:
    """The stored tensor, or its src[0]-th of src[1] equal row blocks (a byte range)."""
    if src is None:
        return info
    i, n = src
    if not info.shape:
        return None
    rows = info.shape[0] // n
    if DTYPES[info.dtype].bits % 8 or rows * n != info.shape[0]:
        return None
    row_bytes = info.nbytes // info.shape[0]
    begin = info.begin + i * rows * row_bytes
    return replace(info, shape=(rows,) + info.shape[1:], begin=begin,
                   end=begin + rows * row_bytes)
