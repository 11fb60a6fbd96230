"""Per-key fingerprints: a short, stable hash of everything that decides the bytes one output
writes for one key — the ops of the key's steps, their attributes as they apply to that key
(a block weight contributes its value at the key, so editing one block changes only that
block's keys), seeds, the output dtype and shape, the compute dtype, the kmx version, and
each input's identity.

Names never enter it (lets, defs, labels, recipe lines), nor anything that only decides how a
key is evaluated (deferred inputs, chunking, threads): two recipes that differ by formatting,
comments or renames give the same fingerprints. Ops that pass their input through (`select`,
`exclude`, and the side of a `union` the key comes from) are transparent, as they change no
value.

What an input's identity is depends on the question (`Identity`):
- `kmx diff` (header only): the input's path as planned and the tensor's header entry;
- a re-merge (runtime/reuse.py): the content hash of the file holding the tensor and the
  tensor's place in it, so an input that changed on disk changes every key it feeds.

A permute step also depends on what its Permutation was computed from: the groups of its spec
as sized, and the identity of every tensor phase one reads of both models — so a `to=` model
that changed on disk changes every key the permutation moves, though no save reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from karmixlang import __version__
from karmixlang.io.hashes import FileHashes
from karmixlang.io.header import TensorInfo
from karmixlang.ir.graph import KeyMap
from karmixlang.plan.executable import Executable, KeyJob, Output
from karmixlang.plan.rebasin import ident

FP_HEX = 16  # hex digits kept per key: 64 bits, ~40 kB of header for an SDXL
NO_FINGERPRINT = "0" * FP_HEX  # never matches: a key whose bytes are not the recipe's

# Ops whose value is their input's tensor, unchanged (`pick` is an alias too, but of one
# member of its input: it is not transparent).
PASS_THROUGH = ("select", "exclude")

# (load node index, this key's tensor in it) -> a string that identifies the tensor's bytes
Identity = Callable[[int, TensorInfo], str]


def header_identity(exe: Executable) -> Identity:
    """What `kmx diff` can know without reading tensor data: the path as planned and the
    header entry."""
    def identity(i: int, t: TensorInfo) -> str:
        return f"{exe.nodes[i].attr('path')}|{t.name}|{t.dtype}|{list(t.shape)}{_rows(t)}"
    return identity


def content_identity(file_hashes: dict[str, FileHashes]) -> Identity:
    """What a re-merge trusts: for each stored range the tensor is read from (one, or the
    parts of a view's virtual tensor), the data hash of its file (not the whole file's:
    metadata edits change no tensor) and its place; and how the bytes are read."""
    def identity(i: int, t: TensorInfo) -> str:
        where = ";".join(f"{file_hashes[s.file].data_hash}|{s.begin}|{s.end}"
                         for s in t.segments)
        return f"{t.name}|{t.dtype}|{list(t.shape)}|{t.transpose}|{where}{_rows(t)}"
    return identity


def _rows(t: TensorInfo) -> str:
    """A row gather's rows (which token each row is), hashed: empty for every other read."""
    if not t.gather:
        return ""
    return "|" + hashlib.sha256(repr((t.gather, t.mean)).encode()).hexdigest()[:16]


def at_key(value, key: str):
    """An attribute as it applies to one key: per-key numbers evaluated there."""
    if isinstance(value, KeyMap):
        try:
            return value.at(key)
        except KeyError:  # no rule for this key: the run never evaluates it here
            return value.describe()
    if isinstance(value, tuple):
        return tuple(at_key(v, key) for v in value)
    return value


class KeyDigests:
    """The digests of one key's nodes (full sha256 hex), memoized."""

    def __init__(self, exe: Executable, job: KeyJob, identity: Identity,
                 perms: dict[tuple, str] | None = None):
        self.exe, self.job, self.identity = exe, job, identity
        self._memo: dict[int, str] = {}
        # Permutation ident -> the digest of what it is computed from; shared by the jobs of
        # one executable, as it is the same for every key.
        self._perms = {} if perms is None else perms

    def resolve(self, i: int) -> int:
        """The node whose value node i is for this key (through transparent ops)."""
        while True:
            step = self.exe.nodes[i]
            if step.op == "union":
                i = self.job.union_choice[i]
            elif step.op in PASS_THROUGH:
                i = step.inputs[0]
            else:
                return i

    def reads(self, i: int) -> tuple[int, ...]:
        return self.job.reads(self.exe.nodes, i)

    def attrs(self, i: int) -> tuple[tuple[str, object], ...]:
        """Node i's attributes at this key (a load's say where it is, not what it holds)."""
        step = self.exe.nodes[i]
        if step.op == "load":
            return ()
        return tuple((k, at_key(v, self.job.key)) for k, v in step.attrs)

    def node(self, i: int) -> str:
        i = self.resolve(i)
        if i in self._memo:
            return self._memo[i]
        # Iterative: a long chain of combinations must not exhaust the Python stack.
        stack = [i]
        while stack:
            n = stack[-1]
            if n in self._memo:
                stack.pop()
                continue
            ins = [self.resolve(x) for x in self.reads(n)]
            todo = [x for x in ins if x not in self._memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            self._memo[n] = _sha(self._payload(n, ins))
        return self._memo[i]

    def _payload(self, i: int, ins: list[int]) -> str:
        step = self.exe.nodes[i]
        if step.op == "load":
            return f"load|{self.identity(i, self.job.tensors[i])}"
        if step.op == "lora":  # the key's modules (none: a zero delta of the key's shape)
            shape, terms = self.job.lora[i]
            return repr(("lora", list(shape), [
                (t.kind, t.rank, t.rows, [(r, self.identity(i, x)) for r, x in t.tensors])
                for t in terms]))
        if step.op == "permute":
            return repr((step.op, self.attrs(i), [self._memo[x] for x in ins],
                         self._permutation(i)))
        return repr((step.op, self.attrs(i), [self._memo[x] for x in ins]))

    def _permutation(self, i: int) -> str:
        """What permute step i's Permutation is computed from: its groups and the tensors
        phase one reads of both models."""
        key = ident(self.exe.nodes[i])
        if key not in self._perms:
            plan = next(p for p in self.exe.permutations if p.ident == key)
            self._perms[key] = _sha(repr((plan.groups, [
                [self.identity(i, t) for _, t in side] for side in (plan.model, plan.to)])))
        return self._perms[key]

    def output(self, o: Output) -> str:
        """The fingerprint of one output of this key (FP_HEX hex digits)."""
        text = repr((__version__, self.exe.compute, o.dtype, list(o.shape), self.node(o.node)))
        return _sha(text)[:FP_HEX]


def key_fingerprints(exe: Executable, identity: Identity) -> list[dict[str, str]]:
    """Per save (in save order): key -> its fingerprint, for every key the save writes."""
    out: list[dict[str, str]] = [{} for _ in exe.saves]
    perms: dict[tuple, str] = {}
    for job in exe.jobs:
        digests = KeyDigests(exe, job, identity, perms)
        for o in job.outputs:
            if o.factor is None:  # a LoRA's factors are never reused: no fingerprint
                out[o.save][job.key] = digests.output(o)
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
