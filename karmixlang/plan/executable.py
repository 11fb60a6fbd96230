"""The executable schedule: everything the runtime needs to compute the keys, and nothing of
the compiler. Nodes are rows of a table, referred to by their index (topological order, inputs
first); every per-key job names nodes by those indices and carries where its inputs' tensors
are stored. It serializes to plain JSON with a format version and a fingerprint (sha256 of the
serialized content), so it can be shipped to another process — a Ray worker — which runs it
without the recipe (docs/ray.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from karmixlang import __version__
from karmixlang.diagnostics import Span
from karmixlang.io.header import TensorInfo
from karmixlang.io.rebasin_spec import Axis, Group, Sized
from karmixlang.ir.graph import KeyMap
from karmixlang.plan.outofcore import OutOfCore

FORMAT = "kmx-executable"
# 2: an out-of-core job holds `candidates` (its trims' bracket size)
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Step:
    """One node of the table: its op, its inputs by index, and its attributes."""
    op: str
    inputs: tuple[int, ...]
    attrs: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        # Plain values only (the compiler's strings remember their folder, for one).
        object.__setattr__(self, "attrs", tuple((k, _plain(v)) for k, v in self.attrs))

    def attr(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default


@dataclass
class Output:
    save: int  # index into the saves
    node: int  # what to write: the save's expression, or its fallback
    dtype: str  # output safetensors dtype
    shape: tuple[int, ...]
    copied: str | None  # None: computed; else why it is copied from the fallback
    # LoRA extraction (docs/lora.md): the tensor written (None: the key itself), and which
    # factor of the key's delta it is: (part "up" | "down" | "alpha", rank, rows or None)
    name: str | None = None
    factor: tuple | None = None

    def written_as(self, key: str) -> str:
        return self.name or key


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA module's change to a key (docs/lora.md): its kind, its tensors by role, the
    rank its `alpha` is divided by (None: scale 1), and the rows of the key it changes (None:
    all of them)."""
    kind: str
    tensors: tuple[tuple[str, TensorInfo], ...]
    rank: int | None
    rows: tuple[int, int] | None = None


@dataclass
class KeyJob:
    """Everything one key needs: evaluation order, when to free, what to write."""
    key: str
    steps: tuple[int, ...]
    union_choice: dict[int, int]  # union node -> the input this key comes from
    deferred: frozenset[int]  # loads and combinations evaluated inside their linear consumer
    loads: tuple[int, ...]  # every input this key reads
    free_after: tuple[tuple[int, ...], ...]  # free_after[i]: values to drop once step i is done
    outputs: list[Output]
    est_bytes: int
    read_bytes: int
    ooc: OutOfCore | None = None  # set when the key runs in chunks (outofcore.py)
    mem_bytes: int = 0  # est_bytes of evaluating the key in memory (est_bytes if not ooc)
    tensors: dict[int, TensorInfo] = field(default_factory=dict)  # load -> this key's tensor
    # --nonfinite=fallback: the same key copied from the fallback of each save whose
    # fallback holds it, decided when planning (None: no save's does); `no_fallback`: the
    # first save whose fallback does not.
    fallback: KeyJob | None = None
    no_fallback: int | None = None
    # lora node -> the key's shape and the modules that change it (none: the delta is zero)
    lora: dict[int, tuple[tuple[int, ...], tuple[LoraTerm, ...]]] = field(default_factory=dict)
    # of est_bytes, the thread's reused read buffers (runtime Scratch), which stay allocated
    # from key to key rather than being freed to the heap
    scratch_bytes: int = 0

    def files(self) -> set[str]:
        """Every file this job reads."""
        return {t.file for t in self.tensors.values()} | \
            {t.file for _, terms in self.lora.values() for term in terms for _, t in term.tensors}

    def reads(self, nodes: tuple[Step, ...], i: int) -> tuple[int, ...]:
        """The inputs node i reads for this key: a union only the side the key comes from."""
        return (self.union_choice[i],) if nodes[i].op == "union" else nodes[i].inputs


@dataclass(frozen=True)
class PermPlan:
    """One Permutation's phase one (plan/rebasin.py): what it is (`ident`: the permute nodes'
    attributes), its groups sized, the tensors of the two models it reads, and how many bytes
    of them stay in memory (0: they are read again at each visit of a group)."""
    ident: tuple
    groups: tuple[Sized, ...]
    skipped: tuple[str, ...]  # groups none of whose keys the models have
    model: tuple[tuple[str, TensorInfo], ...]  # the model permuted
    to: tuple[tuple[str, TensorInfo], ...]  # the model it is aligned to
    cache_bytes: int
    source: str = ""
    description: str = ""


@dataclass(frozen=True)
class SaveTarget:
    path: str  # absolute: out-of-core keys spill next to the first output
    written: str  # as the recipe wrote it, for messages
    span: Span | None = None  # the save's recipe line, where run-time errors point


@dataclass
class Executable:
    nodes: tuple[Step, ...]
    labels: dict[int, str]  # load -> the name a message gives that input
    saves: tuple[SaveTarget, ...]
    compute: str  # "fp32" | "fp64"
    memory_limit: int  # the limit the out-of-core keys were planned for
    files: dict[str, int]  # every data file read -> its size when planned
    jobs: list[KeyJob]
    # load -> the recipe line that declares it, where run-time errors about it point
    origins: dict[int, Span] = field(default_factory=dict)
    # re-basin: what phase one computes, and (once run) its result: plan index -> group ->
    # [block, inner] (runtime/rebasin.Perm.to_list)
    permutations: tuple[PermPlan, ...] = ()
    solved: dict[int, dict[str, list]] = field(default_factory=dict)

    def part(self, jobs: list[KeyJob]) -> Executable:
        """The same schedule for some of its jobs only (one Ray task's group of keys)."""
        used = {f for j in jobs for job in (j, j.fallback) if job for f in job.files()}
        return Executable(self.nodes, self.labels, self.saves, self.compute, self.memory_limit,
                          {f: s for f, s in self.files.items() if f in used}, list(jobs),
                          self.origins, self.permutations, self.solved)

    def to_dict(self) -> dict:
        body = {
            "nodes": [[s.op, list(s.inputs), [[k, _encode(v)] for k, v in s.attrs]]
                      for s in self.nodes],
            "labels": [[i, name] for i, name in sorted(self.labels.items())],
            "saves": [[s.path, s.written, _span_list(s.span)] for s in self.saves],
            "compute": self.compute,
            "memory_limit": self.memory_limit,
            "files": [[f, s] for f, s in sorted(self.files.items())],
            "jobs": [_job_dict(j) for j in self.jobs],
            "origins": [[i, _span_list(s)] for i, s in sorted(self.origins.items())],
        }
        if self.permutations:  # absent otherwise: schedules without re-basin keep their form
            body["permutations"] = [_perm_dict(p) for p in self.permutations]
            body["solved"] = sorted([i, g] for i, g in self.solved.items())
        return {"format": FORMAT, "version": FORMAT_VERSION, "kmx_version": __version__,
                "fingerprint": _digest(body), "body": body}

    def fingerprint(self) -> str:
        return self.to_dict()["fingerprint"]

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @staticmethod
    def from_dict(doc: dict) -> Executable:
        """Raises FormatError when `doc` is not an executable schedule of this kmx version,
        or its content does not match its fingerprint."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError("not an executable schedule")
        if doc.get("version") != FORMAT_VERSION or doc.get("kmx_version") != __version__:
            raise FormatError(f"format {doc.get('version')} of kmx {doc.get('kmx_version')}, "
                              f"expected format {FORMAT_VERSION} of kmx {__version__}")
        body = doc.get("body")
        if _digest(body) != doc.get("fingerprint"):
            raise FormatError("its content does not match its fingerprint")
        try:
            return Executable(
                tuple(Step(op, tuple(ins), tuple((k, _decode(v)) for k, v in attrs))
                      for op, ins, attrs in body["nodes"]),
                {i: name for i, name in body["labels"]},
                tuple(SaveTarget(p, w, _span_from(sp)) for p, w, sp in body["saves"]),
                body["compute"], body["memory_limit"], {f: s for f, s in body["files"]},
                [_job_from(j) for j in body["jobs"]],
                {i: _span_from(sp) for i, sp in body["origins"]},
                tuple(_perm_from(p) for p in body.get("permutations", ())),
                {i: g for i, g in body.get("solved", ())})
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"malformed content ({type(exc).__name__}: {exc})") from None

    @staticmethod
    def loads(text: str) -> Executable:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise FormatError(f"not JSON ({exc})") from None
        return Executable.from_dict(doc)


class FormatError(ValueError):
    """A serialized schedule that this process cannot run as it is."""


def _digest(body) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _span_list(s: Span | None) -> list | None:
    return None if s is None else [s.file, s.line, s.col, s.end_line, s.end_col]


def _span_from(v: list | None) -> Span | None:
    return None if v is None else Span(*v)


# Attribute values: numbers, strings, bools, None, tuples of them, and per-key numbers.
def _plain(v):
    if isinstance(v, KeyMap):
        return KeyMap(_plain(v.kind), _plain(v.rules), _plain(v.arch), v.default)
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, str) and type(v) is not str:
        return str(v)
    return v


def _encode(v):
    if isinstance(v, KeyMap):
        return {"keymap": [v.kind, _encode(v.rules), v.arch, v.default]}
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    return v


def _decode(v):
    if isinstance(v, dict):
        kind, rules, arch, default = v["keymap"]
        return KeyMap(kind, _decode(rules), arch, default)
    if isinstance(v, list):
        return tuple(_decode(x) for x in v)
    return v


def _perm_dict(p: PermPlan) -> dict:
    return {"ident": _encode(p.ident),
            "groups": [[s.group.name, [[a.key, a.axis, a.start, a.stop] for a in s.group.axes],
                        s.group.blocks, s.group.inner, s.size, s.blocks] for s in p.groups],
            "skipped": list(p.skipped),
            "model": [[k] + _info_list(t) for k, t in p.model],
            "to": [[k] + _info_list(t) for k, t in p.to],
            "cache_bytes": p.cache_bytes, "source": p.source, "description": p.description}


def _perm_from(d: dict) -> PermPlan:
    groups = tuple(Sized(Group(name, tuple(Axis(*a) for a in axes), blocks, inner), size, n)
                   for name, axes, blocks, inner, size, n in d["groups"])
    return PermPlan(_decode(d["ident"]), groups, tuple(d["skipped"]),
                    tuple((t[0], _info_from(t[1:])) for t in d["model"]),
                    tuple((t[0], _info_from(t[1:])) for t in d["to"]),
                    d["cache_bytes"], d["source"], d["description"])


def _job_dict(j: KeyJob) -> dict:
    return {
        "key": j.key, "steps": list(j.steps),
        "union_choice": sorted([u, c] for u, c in j.union_choice.items()),
        "deferred": sorted(j.deferred), "loads": list(j.loads),
        "free_after": [list(f) for f in j.free_after],
        "outputs": [[o.save, o.node, o.dtype, list(o.shape), o.copied, o.name,
                     _encode(o.factor)] for o in j.outputs],
        "est_bytes": j.est_bytes, "read_bytes": j.read_bytes,
        "ooc": asdict(j.ooc) if j.ooc is not None else None, "mem_bytes": j.mem_bytes,
        "tensors": [[i] + _info_list(t) for i, t in j.tensors.items()],
        "fallback": _job_dict(j.fallback) if j.fallback is not None else None,
        "no_fallback": j.no_fallback,
        "lora": [[i, list(shape), [[t.kind, [[r, _info_list(x)] for r, x in t.tensors], t.rank,
                                    list(t.rows) if t.rows else None] for t in terms]]
                 for i, (shape, terms) in sorted(j.lora.items())],
        "scratch_bytes": j.scratch_bytes,
    }


def _info_list(t: TensorInfo) -> list:
    out = [t.name, t.dtype, list(t.shape), t.file, t.begin, t.end]
    if t.virtual:  # views only: a stored tensor keeps the short form
        out += [[_info_list(p) for p in t.parts], t.transpose]
    if t.gather:
        out += [[list(r) for r in t.gather], [list(r) for r in t.mean]]
    return out


def _info_from(v: list) -> TensorInfo:
    name, dt, sh, f, b, e = v[:6]
    parts, transpose, gather, mean = (v[6:] + [[], False, [], []][len(v) - 6:])[:4]
    return TensorInfo(name, dt, tuple(sh), f, b, e, tuple(_info_from(p) for p in parts),
                      transpose, tuple(map(tuple, gather)), tuple(map(tuple, mean)))


def _terms_from(terms: list) -> tuple[LoraTerm, ...]:
    return tuple(LoraTerm(kind, tuple((r, _info_from(x)) for r, x in ts), rank,
                          tuple(rows) if rows else None) for kind, ts, rank, rows in terms)


def _job_from(d: dict) -> KeyJob:
    return KeyJob(
        d["key"], tuple(d["steps"]), {u: c for u, c in d["union_choice"]},
        frozenset(d["deferred"]), tuple(d["loads"]), tuple(tuple(f) for f in d["free_after"]),
        [Output(s, n, dt, tuple(sh), c, name, _decode(f))
         for s, n, dt, sh, c, name, f in d["outputs"]],
        d["est_bytes"], d["read_bytes"],
        OutOfCore(**d["ooc"]) if d["ooc"] is not None else None, d["mem_bytes"],
        {t[0]: _info_from(t[1:]) for t in d["tensors"]},
        _job_from(d["fallback"]) if d["fallback"] is not None else None, d["no_fallback"],
        {i: (tuple(shape), _terms_from(terms)) for i, shape, terms in d["lora"]},
        d["scratch_bytes"])
