"""Re-basin specs: which axes of which keys each permutation group moves (docs/rebasin.md).

A spec is JSON, `{"permutations": {NAME: [[KEY, AXIS], ...]}, "constraints": {NAME: {"blocks":
G, "inner": "free"|"fixed"}}, "description": TEXT}`. This module reads and validates it —
first on its own (`parse_spec`), then against the models' shapes (`check_shapes`) — and
derives the spec of a plain chain of linear layers (`auto_spec`). Names and shapes only: no
tensor is read here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from karmixlang.diagnostics import KmxError, Span, did_you_mean, error

INNER = ("free", "fixed")
MAX_SPEC_BYTES = 64 << 20  # a spec lists key names: even Flux's is far below this
_TOP_FIELDS = ("permutations", "constraints", "description")
_BUILTIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


LAYER = "{layer}"  # in a permutation's name and keys: one permutation per layer of the model


@dataclass(frozen=True)
class Axis:
    """An axis of a key, or the range [start, stop) of it (a fused tensor's part). With `of`,
    the range is written for an axis `of` long and scales with the axis (`resolve`)."""

    key: str
    axis: int
    start: int | None = None
    stop: int | None = None
    of: int | None = None

    def bounds(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (self.start or 0, shape[self.axis] if self.stop is None else self.stop)

    def overlaps(self, other: "Axis") -> bool:
        if (self.key, self.axis) != (other.key, other.axis):
            return False
        if self.start is None or other.start is None:
            return True
        if (self.of is None) != (other.of is None):
            return True  # one in units, one in proportions: cannot be told apart before sizes
        # in proportions of the axis (the same test as in units when neither has `of`)
        mine, theirs = self.of or 1, other.of or 1
        return self.start * theirs < other.stop * mine and other.start * mine < self.stop * theirs

    def text(self) -> str:
        of = "" if self.of is None else f" of {self.of}"
        where = "" if self.start is None else f" [{self.start}:{self.stop}{of}]"
        return f"axis {self.axis}{where} of \"{self.key}\""


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


def locate(ref: str, relative_to: Path) -> str:
    """SPEC as the plan names it: "auto", a built-in's name, or an absolute path (relative to
    the recipe's folder). A built-in wins over a file of the same name."""
    if ref == "auto" or (_BUILTIN_NAME.fullmatch(ref) and ref in builtin_names()):
        return ref
    return str(Path(os.path.abspath(Path(relative_to) / ref)))


def resolve(ref: str, relative_to: Path, span: Span | None = None) -> tuple[str, str]:
    """(source label, JSON text) of SPEC: a built-in's name, else a path relative to the
    recipe's folder. K0116 when it is neither."""
    located = locate(ref, relative_to)
    if located == ref and not os.path.isabs(ref):
        text = resources.files("karmixlang").joinpath("data", "rebasin", f"{ref}.json")
        return ref, text.read_text(encoding="utf-8")
    path = Path(located)
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
    owner: dict[tuple[str, int], list[tuple[Axis, str]]] = {}
    groups = []
    for name, entries in perms.items():
        axes = _axes(name, entries, bad)
        if any(LAYER in a.key for a in axes) != (LAYER in name):
            bad(f"permutation \"{name}\": {LAYER} must be in its name and its keys, or in "
                "neither", help=f"\"mlp.{LAYER}\": [[\"layers.{LAYER}.fc1.weight\", 0], ...]")
        for a in axes:
            listed = owner.setdefault((a.key, a.axis), [])
            for b, seen in listed:
                if a.overlaps(b):
                    bad(f"{a.text()} is permuted twice, by \"{seen}\" and \"{name}\""
                        if seen != name else f"permutation \"{name}\" lists {a.text()} twice",
                        help="an axis (or a range of it) can be permuted by one permutation only")
            listed.append((a, name))
        groups.append(Group(name, axes, *_constraint(name, constraints.get(name, {}), bad)))
    return Spec(source, tuple(groups), description)


def _axes(name: str, entries: object, bad) -> tuple[Axis, ...]:
    if not isinstance(entries, list) or not entries:
        bad(f"permutation \"{name}\" must be a non-empty list of [KEY, AXIS] pairs")
    axes = []
    for entry in entries:
        if (not isinstance(entry, list) or len(entry) not in (2, 4, 5)
                or not isinstance(entry[0], str) or not all(_whole(v) for v in entry[1:])
                or (len(entry) >= 4 and not entry[2] < entry[3])
                or (len(entry) == 5 and not entry[3] <= entry[4])):
            bad(f"permutation \"{name}\": {json.dumps(entry)[:80]} is not [KEY, AXIS], "
                "[KEY, AXIS, START, STOP] or [KEY, AXIS, START, STOP, OF] with whole numbers "
                "from 0 and START < STOP <= OF")
        axes.append(Axis(*entry))
    return tuple(axes)


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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
    """A group whose keys all exist, in `blocks` blocks (a group without constraint: one
    block per unit) of `inner` units each on its first axis. With `"inner": "fixed"` another
    axis may have blocks of another length (grouped-query attention: a query block holds
    several heads, a key block one); every other group has one length on every axis."""

    group: Group
    size: int  # units on the first axis
    blocks: int

    @property
    def free_inner(self) -> bool:
        return self.group.blocks > 1 and self.group.inner == "free"


def expand_layers(spec: Spec, keys) -> Spec:
    """Each permutation written with {layer} made concrete for every layer number its first
    key has in the model (`mlp.{layer}` -> `mlp.0`, `mlp.1`, ...)."""
    out = []
    for g in spec.groups:
        if LAYER not in g.name:
            out.append(g)
            continue
        pattern = re.compile(re.escape(g.axes[0].key).replace(re.escape(LAYER), r"(\d+)"))
        layers = sorted({int(m[1]) for k in keys if (m := pattern.fullmatch(k))})
        for n in layers:
            axes = tuple(replace(a, key=a.key.replace(LAYER, str(n)))
                         for a in g.axes)
            out.append(Group(g.name.replace(LAYER, str(n)), axes, g.blocks, g.inner))
    return Spec(spec.source, tuple(out), spec.description)


def check_shapes(spec: Spec, shapes: Mapping[str, tuple[int, ...]],
                 span: Span | None = None) -> tuple[list[Sized], list[str]]:
    """Each group sized from the shapes of the model it is matched on ({layer} expanded);
    (sized groups, names of groups none of whose keys the model has). A group some of whose
    keys are missing is K0360 (permuting the rest would change the function); an axis past
    the key's rank, or a range past the axis's end, K0361; axes that disagree on the size
    K0362; blocks that do not divide it K0363."""
    sized, absent = [], []
    for g in expand_layers(spec, shapes).groups:
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
        g = replace(g, axes=tuple(_resolve(spec, a, tuple(shapes[a.key]), span) for a in g.axes))
        lengths = [stop - start for start, stop in
                   (a.bounds(tuple(shapes[a.key])) for a in g.axes)]
        varied = g.blocks > 1 and g.inner == "fixed"
        for a, n in zip(g.axes, lengths):
            if n != lengths[0] and not varied:
                _fail("K0362", f"re-basin spec {spec.source}: permutation \"{g.name}\" moves "
                      f"{lengths[0]} units on {g.axes[0].text()} but {n} on {a.text()}", span,
                      help="the axes of one permutation must have the same size")
            if n % g.blocks:
                _fail("K0363", f"re-basin spec {spec.source}: permutation \"{g.name}\" has "
                      f"{n} units on {a.text()}, which {g.blocks} blocks do not divide", span,
                      help=f"\"blocks\" is a count (GroupNorm groups, attention heads) and does not "
                      f"scale with the widths; {_OWN_SPEC}")
        sized.append(Sized(g, lengths[0], g.blocks if g.blocks > 1 else lengths[0]))
    return sized, absent


_OWN_SPEC = ("for a checkpoint of other widths, write a spec of its sizes: python "
             "tools/make_rebasin_specs.py NAME --from CHECKPOINT [--heads N] -o spec.json")


def _resolve(spec: Spec, a: Axis, shape: tuple[int, ...], span) -> Axis:
    """`a` in units of this key's shape: a range written for an axis `of` long scaled by
    length/of (K0361 unless it comes out whole); K0361 for an axis or range past the shape."""
    if a.axis >= len(shape):
        _fail("K0361", f"re-basin spec {spec.source}: \"{a.key}\" has {len(shape)} "
              f"axes (shape {list(shape)}), so it has no axis {a.axis}", span,
              help="axes count from 0")
    if a.start is None:
        return a
    length = shape[a.axis]
    start, stop = a.bounds(shape)
    if a.of is not None:
        if (start * length) % a.of or (stop * length) % a.of:
            _fail("K0361", f"re-basin spec {spec.source}: the range [{start}:{stop}] of "
                  f"{a.of} of axis {a.axis} of \"{a.key}\" scaled to its length {length} "
                  f"is [{start * length / a.of:g}:{stop * length / a.of:g}], not whole units",
                  span, help=f"its parts are not in the proportions the spec was written for; "
                  f"{_OWN_SPEC}")
        start, stop = start * length // a.of, stop * length // a.of
    if stop > length:
        _fail("K0361", f"re-basin spec {spec.source}: the range [{start}:{stop}] of axis "
              f"{a.axis} of \"{a.key}\" goes past its length {length}", span,
              help=f"a range [KEY, AXIS, START, STOP, OF] scales with the axis; {_OWN_SPEC}")
    return Axis(a.key, a.axis, start, stop)


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


def _entry(a: Axis) -> list:
    return [a.key, a.axis] + ([] if a.start is None else [a.start, a.stop]) + (
        [] if a.of is None else [a.of])


def to_json(spec: Spec) -> dict:
    """The spec in its file format (what `auto` derived, or a spec as read)."""
    out: dict = {"permutations": {g.name: [_entry(a) for a in g.axes] for g in spec.groups}}
    constraints = {g.name: {"blocks": g.blocks, "inner": g.inner}
                   for g in spec.groups if g.blocks > 1 or g.inner != "free"}
    if constraints:
        out["constraints"] = constraints
    if spec.description:
        out["description"] = spec.description
    return out
