"""Re-basin specs: which axes of which keys each permutation group moves (docs/rebasin.md).

A spec is JSON, `{"permutations": {NAME: [[KEY, AXIS], ...]}, "constraints": {NAME: {"blocks":
G, "inner": "free"|"fixed"}}, "description": TEXT}`. This module reads and validates it —
first on its own (`parse_spec`), then against the models' shapes (`check_shapes`) — and
derives the spec of a plain chain of linear layers (`auto_spec`). Names and shapes only: no
tensor is read here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from karmixlang.diagnostics import KmxError, Span, did_you_mean, error

INNER = ("free", "fixed")
MAX_SPEC_BYTES = 64 << 20  # a spec lists key names: even Flux's is far below this
_TOP_FIELDS = ("permutations", "constraints", "description")
_BUILTIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class Axis:
    key: str
    axis: int


@dataclass(frozen=True)
class Group:
    """One permutation: `size` units, moved together on every axis of `axes`.

    blocks > 1: the units are `blocks` contiguous blocks of size // blocks that the
    permutation maps onto whole blocks (GroupNorm groups, attention heads); `inner` says
    whether units may also move inside a block ("free") or keep their order ("fixed")."""

    name: str
    axes: tuple[Axis, ...]
    blocks: int = 1
    inner: str = "free"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.key for a in self.axes))


@dataclass(frozen=True)
class Spec:
    source: str  # "sd1" for a built-in, the path for a file, "auto" for a derived one
    groups: tuple[Group, ...]
    description: str = ""

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for g in self.groups for k in g.keys))

    def select(self, names: Sequence[str]) -> "Spec":
        """The spec with only the named groups (the others keep the identity)."""
        wanted = set(names)
        return Spec(self.source, tuple(g for g in self.groups if g.name in wanted), self.description)


def _fail(code: str, message: str, span: Span | None, help: str | None = None):
    raise KmxError([error(code, message, span, help=help)])


# ------------------------------------------------------------------ finding a spec

def builtin_names() -> list[str]:
    """The specs packaged as karmixlang/data/rebasin/NAME.json."""
    folder = resources.files("karmixlang").joinpath("data", "rebasin")
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def resolve(ref: str, relative_to: Path, span: Span | None = None) -> tuple[str, str]:
    """(source label, JSON text) of SPEC: a built-in's name, else a path relative to the
    recipe's folder. K0116 when it is neither."""
    if _BUILTIN_NAME.fullmatch(ref) and ref in builtin_names():
        text = resources.files("karmixlang").joinpath("data", "rebasin", f"{ref}.json")
        return ref, text.read_text(encoding="utf-8")
    path = Path(ref)
    if not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        names = builtin_names()
        hint = did_you_mean(ref, names)
        _fail("K0116", f"no re-basin spec `{ref}`: neither a built-in spec nor a file", span,
              help=f"did you mean \"{hint}\"?" if hint else
              f"built-in specs: {', '.join(names) or 'none'}; \"auto\" derives one for a "
              "chain of linear layers; or give a path to a JSON spec (docs/rebasin.md)")
    if path.stat().st_size > MAX_SPEC_BYTES:
        _fail("K0223", f"re-basin spec {path} is larger than 64 MiB", span)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail("K0223", f"cannot read re-basin spec {path}: {exc}", span)
    raise AssertionError("unreachable")


def load_spec(ref: str, relative_to: Path, span: Span | None = None) -> Spec:
    """Find SPEC (built-in name or path) and validate it on its own (not yet against shapes)."""
    source, text = resolve(ref, relative_to, span)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail("K0223", f"re-basin spec {source} is not JSON: {exc}", span)
    return parse_spec(data, source, span)


# ------------------------------------------------------------------ validation on its own

def parse_spec(data: object, source: str, span: Span | None = None) -> Spec:
    """A Spec from decoded JSON; K0223 on the first thing that is not the documented format."""
    def bad(what: str, help: str | None = None):
        _fail("K0223", f"re-basin spec {source}: {what}", span,
              help=help or "the format is in docs/rebasin.md")

    if not isinstance(data, dict):
        bad("the top level must be an object")
    for name in data:
        if name not in _TOP_FIELDS:
            bad(f"unknown field \"{name}\"", help=f"fields: {', '.join(_TOP_FIELDS)}")
    perms = data.get("permutations")
    if not isinstance(perms, dict) or not perms:
        bad("\"permutations\" must be an object with at least one permutation")
    description = data.get("description", "")
    if not isinstance(description, str):
        bad("\"description\" must be a string")
    constraints = data.get("constraints", {})
    if not isinstance(constraints, dict):
        bad("\"constraints\" must be an object")
    for name in constraints:
        if name not in perms:
            bad(f"constraints name \"{name}\", which is not a permutation")
    owner: dict[tuple[str, int], str] = {}
    groups = []
    for name, entries in perms.items():
        axes = _axes(name, entries, bad)
        for a in axes:
            seen = owner.setdefault((a.key, a.axis), name)
            if seen != name:
                bad(f"axis {a.axis} of \"{a.key}\" is in two permutations, \"{seen}\" and "
                    f"\"{name}\"", help="an axis can be permuted by one permutation only")
        groups.append(Group(name, axes, *_constraint(name, constraints.get(name, {}), bad)))
    return Spec(source, tuple(groups), description)


def _axes(name: str, entries: object, bad) -> tuple[Axis, ...]:
    if not isinstance(entries, list) or not entries:
        bad(f"permutation \"{name}\" must be a non-empty list of [KEY, AXIS] pairs")
    axes = []
    for entry in entries:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], int) or isinstance(entry[1], bool) or entry[1] < 0):
            bad(f"permutation \"{name}\": {json.dumps(entry)[:80]} is not a [KEY, AXIS] pair "
                "with AXIS a whole number from 0")
        axis = Axis(entry[0], entry[1])
        if axis in axes:
            bad(f"permutation \"{name}\" lists [\"{axis.key}\", {axis.axis}] twice")
        axes.append(axis)
    return tuple(axes)


def _constraint(name: str, c: object, bad) -> tuple[int, str]:
    if not isinstance(c, dict) or set(c) - {"blocks", "inner"}:
        bad(f"the constraint of \"{name}\" must be an object with \"blocks\" and \"inner\"")
    blocks, inner = c.get("blocks", 1), c.get("inner", "free")
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        bad(f"\"blocks\" of \"{name}\" must be a whole number from 1")
    if inner not in INNER:
        bad(f"\"inner\" of \"{name}\" must be \"free\" or \"fixed\"")
    return blocks, inner


# ------------------------------------------------------------------ validation against shapes

@dataclass(frozen=True)
class Sized:
    """A group whose keys all exist: its size (units) and the shapes it reads."""

    group: Group
    size: int


def check_shapes(spec: Spec, shapes: Mapping[str, tuple[int, ...]],
                 span: Span | None = None) -> tuple[list[Sized], list[str]]:
    """Each group's size from the shapes of the model it is matched on; (sized groups, names of
    groups none of whose keys the model has). A group some of whose keys are missing is K0360
    (permuting the rest would change the function); an axis past the key's rank K0361; keys
    whose axes disagree on the size K0362; blocks that do not divide the size K0363."""
    sized, absent = [], []
    for g in spec.groups:
        missing = [k for k in g.keys if k not in shapes]
        if len(missing) == len(g.keys):
            absent.append(g.name)
            continue
        if missing:
            hint = did_you_mean(missing[0], shapes)
            _fail("K0360", f"re-basin spec {spec.source}: permutation \"{g.name}\" names "
                  f"\"{missing[0]}\", which the model does not have"
                  + (f" ({len(missing)} keys missing)" if len(missing) > 1 else ""), span,
                  help=f"did you mean \"{hint}\"?" if hint else
                  "every key of a permutation must exist, or none (the group is then skipped)")
        sizes = {}
        for a in g.axes:
            shape = tuple(shapes[a.key])
            if a.axis >= len(shape):
                _fail("K0361", f"re-basin spec {spec.source}: \"{a.key}\" has {len(shape)} "
                      f"axes (shape {list(shape)}), so it has no axis {a.axis}", span,
                      help="axes count from 0")
            sizes.setdefault(shape[a.axis], a)
        if len(sizes) > 1:
            (n1, a1), (n2, a2) = list(sizes.items())[:2]
            _fail("K0362", f"re-basin spec {spec.source}: permutation \"{g.name}\" moves "
                  f"{n1} units on axis {a1.axis} of \"{a1.key}\" but {n2} on axis {a2.axis} "
                  f"of \"{a2.key}\"", span,
                  help="the axes of one permutation must have the same size")
        size = next(iter(sizes))
        if size % g.blocks:
            _fail("K0363", f"re-basin spec {spec.source}: permutation \"{g.name}\" has "
                  f"{size} units, which {g.blocks} blocks do not divide", span)
        sized.append(Sized(g, size))
    return sized, absent


# ------------------------------------------------------------------ spec="auto"

def auto_spec(shapes: Mapping[str, tuple[int, ...]], span: Span | None = None) -> Spec:
    """The spec of a plain chain of linear layers: `P.weight` [out, in] (+ `P.bias` [out]) in
    key order, each layer's out coupled to the next one's in; the last layer's out is the
    output and stays. K0364 when the keys are not such a chain."""
    layers: list[tuple[str, tuple[int, ...]]] = []
    biases = {}
    for key, shape in shapes.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and len(shape) == 2:
            layers.append((prefix, tuple(shape)))
        elif leaf == "bias" and len(shape) == 1:
            biases[prefix] = tuple(shape)
        else:
            _fail("K0364", f"spec=\"auto\" needs a chain of linear layers, but \"{key}\" "
                  f"(shape {list(shape)}) is not a 2-D weight or 1-D bias", span,
                  help="write a spec file for this architecture (docs/rebasin.md)")
    layers.sort(key=lambda item: _natural(item[0]))
    if len(layers) < 2:
        _fail("K0364", "spec=\"auto\" needs at least two linear layers to permute between",
              span)
    for prefix in biases:
        if prefix not in dict(layers):
            _fail("K0364", f"spec=\"auto\": \"{prefix}.bias\" has no \"{prefix}.weight\"", span)
    groups = []
    for i, ((p, (out, _)), (q, (_, nxt_in))) in enumerate(zip(layers, layers[1:])):
        if out != nxt_in or (p in biases and biases[p] != (out,)):
            _fail("K0364", f"spec=\"auto\": \"{p}.weight\" has {out} outputs but "
                  f"\"{q}.weight\" takes {nxt_in} inputs, so they are not a chain", span)
        axes = [Axis(f"{p}.weight", 0)] + ([Axis(f"{p}.bias", 0)] if p in biases else [])
        groups.append(Group(f"P{i}", (*axes, Axis(f"{q}.weight", 1))))
    return Spec("auto", tuple(groups), "derived: a chain of linear layers")


def _natural(text: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def to_json(spec: Spec) -> dict:
    """The spec in its file format (what `auto` derived, or a spec as read)."""
    out: dict = {"permutations": {g.name: [[a.key, a.axis] for a in g.axes] for g in spec.groups}}
    constraints = {g.name: {"blocks": g.blocks, "inner": g.inner}
                   for g in spec.groups if g.blocks > 1 or g.inner != "free"}
    if constraints:
        out["constraints"] = constraints
    if spec.description:
        out["description"] = spec.description
    return out
