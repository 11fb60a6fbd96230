"""`kmx diff`: what a recipe edit does to the merge, not to the text. Two compiled recipes
(header-only) are compared save by save (matched by output path) and key by key through
their fingerprints (plan/fingerprint.py); each changed key is explained by walking both
computations of it side by side down to the nodes that differ (an op, an attribute at that
key, an input), and keys with the same explanation are grouped, by MBW block where the layout
is known and by key prefix otherwise. The result is plain data (`RecipeDiff.to_dict()`, the
`--json` schema of docs/cli.md).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from karmixlang.blocks import SLOTS, OPTIONAL_SLOTS, slot_of
from karmixlang.io.layouts.detect import detect
from karmixlang.plan.compile import Compiled
from karmixlang.plan.executable import KeyJob, Output
from karmixlang.plan.fingerprint import KeyDigests, header_identity, key_fingerprints

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Change:
    """One difference between the two computations of a key."""
    kind: str  # op | attr | input | tensor | inputs | dtype | shape | source
    node: str  # the node as the recipe names it (its op, and its name when it has one)
    old: object
    new: object
    attr: str | None = None
    line: str | None = None  # file:line of the node in the new recipe (the old one if gone)

    def text(self) -> str:
        old, new = _show(self.old), _show(self.new)
        if self.kind == "attr":
            return f"{self.node} {self.attr} {old} → {new}"
        if self.kind == "op":
            return f"method {old} → {new}"
        if self.kind == "input":
            return (f"input {os.path.basename(new)} added" if self.old is None else
                    f"input {os.path.basename(old)} removed" if self.new is None else
                    f"input {os.path.basename(old)} → {os.path.basename(new)}")
        if self.kind == "tensor":
            return f"input {self.node}: {old} → {new}"
        if self.kind == "inputs":
            return f"{self.node}: {old} → {new} inputs"
        return f"{self.kind} {old} → {new}"  # dtype, shape, source


@dataclass
class Group:
    """Keys of one save that change the same way."""
    keys: list[str]
    where: str  # the keys, described: blocks or key prefixes
    changes: list[Change]


@dataclass
class SaveDiff:
    path: str
    written: str
    status: str  # added | removed | changed | unchanged
    keys: int  # the save's keys (the old save's when removed)
    groups: list[Group] = field(default_factory=list)
    added_keys: list[str] = field(default_factory=list)
    removed_keys: list[str] = field(default_factory=list)

    @property
    def changed_keys(self) -> int:
        return sum(len(g.keys) for g in self.groups) + len(self.added_keys) + \
            len(self.removed_keys)


@dataclass
class RecipeDiff:
    old: str
    new: str
    saves: list[SaveDiff]
    inputs_added: list[str]
    inputs_removed: list[str]

    @property
    def changed(self) -> bool:
        return any(s.status != "unchanged" for s in self.saves)

    def to_dict(self) -> dict:
        saves = [{"path": s.path, "written": s.written, "status": s.status, "keys": s.keys,
                  "changed_keys": s.changed_keys, "added_keys": s.added_keys,
                  "removed_keys": s.removed_keys,
                  "groups": [{"where": g.where, "keys": g.keys,
                              "changes": [dict(asdict(c), text=c.text()) for c in g.changes]}
                             for g in s.groups]}
                 for s in self.saves]
        return {"schema_version": SCHEMA_VERSION, "old": self.old, "new": self.new,
                "changed": self.changed,
                "inputs": {"added": self.inputs_added, "removed": self.inputs_removed},
                "saves": saves}


class _Side:
    """One compiled recipe, as the diff reads it."""

    def __init__(self, compiled: Compiled | None):
        self.c = compiled
        if compiled is None:  # a file that does not exist on this side (git: added, deleted)
            self.exe, self.saves, self.fps, self.jobs, self.names = None, {}, [], {}, {}
            return
        self.exe = compiled.schedule.executable
        self.identity = header_identity(self.exe)
        self.saves = {s.path: i for i, s in enumerate(self.exe.saves)}
        self.fps = key_fingerprints(self.exe, self.identity)
        self.jobs = {j.key: j for j in self.exe.jobs}
        graph = compiled.graph
        self.names = {}  # node index -> (how to name it, file:line)
        for i, n in enumerate(graph.topo()):
            name = graph.names.get(n)
            spans = graph.origins.get(n) or []
            line = f"{os.path.basename(spans[0].file)}:{spans[0].line}" if spans else None
            self.names[i] = (f"{n.op} `{name}`" if name and n.op != "load" else n.op, line)

    def inputs(self) -> set[str]:
        if self.exe is None:
            return set()
        return {s.attr("path") for s in self.exe.nodes if s.op == "load"}

    def output(self, key: str, save: int) -> tuple[KeyJob, Output]:
        job = self.jobs[key]
        return job, next(o for o in job.outputs if o.save == save)


def diff(old: Compiled | None, new: Compiled | None, old_name: str, new_name: str) -> RecipeDiff:
    a, b = _Side(old), _Side(new)
    saves = []
    for path in sorted(set(a.saves) | set(b.saves)):
        if path not in b.saves:
            i = a.saves[path]
            saves.append(SaveDiff(path, a.exe.saves[i].written, "removed", len(a.fps[i])))
        elif path not in a.saves:
            i = b.saves[path]
            saves.append(SaveDiff(path, b.exe.saves[i].written, "added", len(b.fps[i])))
        else:
            saves.append(_save_diff(a, b, path))
    return RecipeDiff(old_name, new_name, saves, sorted(b.inputs() - a.inputs()),
                      sorted(a.inputs() - b.inputs()))


def _save_diff(a: _Side, b: _Side, path: str) -> SaveDiff:
    i, j = a.saves[path], b.saves[path]
    fa, fb = a.fps[i], b.fps[j]
    by_change: dict[tuple[Change, ...], list[str]] = defaultdict(list)
    for key in sorted(set(fa) & set(fb)):
        if fa[key] != fb[key]:
            by_change[tuple(explain(a, b, key, i, j))].append(key)
    arch = _arch(b, j)
    groups = [Group(keys, describe_keys(keys, arch), list(changes))
              for changes, keys in sorted(by_change.items(), key=lambda kv: _order(kv[1], arch))]
    added, removed = sorted(set(fb) - set(fa)), sorted(set(fa) - set(fb))
    status = "changed" if groups or added or removed else "unchanged"
    return SaveDiff(path, b.exe.saves[j].written, status, len(fb), groups, added, removed)


def explain(a: _Side, b: _Side, key: str, save_a: int, save_b: int) -> list[Change]:
    """Why key `key` of a save differs: the nodes that differ, walked from the output down
    (below a node whose op or inputs differ, nothing is compared)."""
    ja, oa = a.output(key, save_a)
    jb, ob = b.output(key, save_b)
    changes = []
    if oa.dtype != ob.dtype:
        changes.append(Change("dtype", "output", oa.dtype, ob.dtype))
    if oa.shape != ob.shape:
        changes.append(Change("shape", "output", tuple(oa.shape), tuple(ob.shape)))
    if (oa.copied is None) != (ob.copied is None):
        changes.append(Change("source", "output", _source(oa), _source(ob)))
        return changes
    da, db = KeyDigests(a.exe, ja, a.identity), KeyDigests(b.exe, jb, b.identity)
    stack = [(oa.node, ob.node)]
    while stack:
        x, y = stack.pop()
        if da.node(x) == db.node(y):
            continue
        x, y = da.resolve(x), db.resolve(y)
        changes.extend(_node_changes(a, b, da, db, x, y, stack))
    return list(dict.fromkeys(changes))


def _node_changes(a, b, da: KeyDigests, db: KeyDigests, x: int, y: int, stack) -> list[Change]:
    sx, sy = a.exe.nodes[x], b.exe.nodes[y]
    name, line = b.names[y]
    if sx.op != sy.op:
        return [Change("op", name, sx.op, sy.op, line=line)]
    if sx.op == "load":
        px, py = sx.attr("path"), sy.attr("path")
        if px != py:
            return [Change("input", name, px, py, line=line)]
        tx, ty = da.job.tensors[x], db.job.tensors[y]
        return [Change("tensor", os.path.basename(py), f"{tx.dtype}{list(tx.shape)}",
                       f"{ty.dtype}{list(ty.shape)}", line=line)]
    ax, ay = dict(da.attrs(x)), dict(db.attrs(y))
    out = [_attr_change(name, k, ax.get(k), ay.get(k), line)
           for k in sorted(set(ax) | set(ay)) if ax.get(k) != ay.get(k)]
    rx, ry = da.reads(x), db.reads(y)
    if len(rx) == len(ry):
        stack.extend(reversed(list(zip(rx, ry))))
        return out
    out.append(Change("inputs", name, len(rx), len(ry), line=line))
    lx, ly = _loads(a, da, rx), _loads(b, db, ry)
    out += [Change("input", name, None, p, line=line) for p in sorted(ly - lx)]
    out += [Change("input", name, p, None, line=line) for p in sorted(lx - ly)]
    return out


def _attr_change(node: str, attr: str, old, new, line: str | None) -> Change:
    """One attribute that differs; of two tuples of one length that differ in one place,
    that place (`coeffs[1] 0.5 → 0.6`)."""
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        places = [i for i, (p, q) in enumerate(zip(old, new)) if p != q]
        if len(places) == 1:
            i = places[0]
            return Change("attr", node, old[i], new[i],
                          attr=attr if len(old) == 1 else f"{attr}[{i}]", line=line)
    return Change("attr", node, old, new, attr=attr, line=line)


def _loads(side: _Side, digests: KeyDigests, roots) -> set[str]:
    seen, stack, paths = set(), list(roots), set()
    while stack:
        i = digests.resolve(stack.pop())
        if i in seen:
            continue
        seen.add(i)
        step = side.exe.nodes[i]
        if step.op == "load":
            paths.add(step.attr("path"))
        stack.extend(digests.reads(i))
    return paths


def _source(o: Output) -> str:
    return "computed" if o.copied is None else f"copied from the fallback ({o.copied})"


def _show(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return "none" if v is None else str(v)


# -- describing a set of keys

def _arch(side: _Side, save: int) -> str | None:
    """The block layout a save's keys follow (io/layouts' detection), if blocks.py has one."""
    shapes = {k: side.output(k, save)[1].shape for k in side.fps[save]}
    arch = detect(shapes).arch
    return arch if arch in SLOTS else None


def _slots(arch: str) -> list[str]:
    return list(SLOTS[arch] + OPTIONAL_SLOTS[arch])


def _order(keys: list[str], arch: str | None):
    slot = slot_of(arch, keys[0]) if arch else None
    return (_slots(arch).index(slot) if slot else len(SLOTS.get(arch, ())) + 1, keys[0]) \
        if arch else (0, keys[0])


def describe_keys(keys: list[str], arch: str | None) -> str:
    """`IN04–IN05, first_stage_model.decoder.*`: runs of consecutive blocks where the layout
    is known, and the keys' common prefixes otherwise."""
    slots, rest = set(), []
    for k in keys:
        s = slot_of(arch, k) if arch else None
        if s is None:
            rest.append(k)
        else:
            slots.add(s)
    parts = _runs([s for s in _slots(arch) if s in slots], _slots(arch)) if slots else []
    return ", ".join(parts + _prefixes(rest))


def _runs(present: list[str], order: list[str]) -> list[str]:
    runs: list[list[str]] = []
    for s in present:
        if runs and order.index(runs[-1][-1]) + 1 == order.index(s):
            runs[-1].append(s)
        else:
            runs.append([s])
    return [r[0] if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs]


SHOWN_PREFIXES = 4  # a line names at most this many key groups


def _prefixes(keys: list[str]) -> list[str]:
    """Keys grouped by their first two dotted parts; a group of one key is the key."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        groups[".".join(k.split(".")[:2])].append(k)
    named = [ks[0] if len(ks) == 1 else f"{prefix}.*" for prefix, ks in sorted(groups.items())]
    if len(named) <= SHOWN_PREFIXES:
        return named
    hidden = sum(len(ks) for _, ks in sorted(groups.items())[SHOWN_PREFIXES - 1:])
    return named[:SHOWN_PREFIXES - 1] + [f"{hidden} other keys"]
