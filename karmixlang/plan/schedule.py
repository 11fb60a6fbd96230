"""The schedule: from the optimized graph and the inputs' safetensors headers (never tensor
data), decide for every save and every key what happens — computed, copied from the fallback
(and why), or an error — and the per-key evaluation order with liveness, which gives the
estimate of peak memory.

The contract's key rule: a key is computed when every input of the expression has it with one
shape and a floating dtype; otherwise it is copied from the fallback; with no fallback that has
it, planning fails naming the key and the models involved.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from karmixlang.diagnostics import Diagnostic, KmxError, error
from karmixlang.io.dtypes import DTYPES, nbytes
from karmixlang.io.hffolder import FolderSave
from karmixlang.io.header import CheckpointHeader, read_checkpoint, read_tensor_bytes
from karmixlang.io.layouts import detect
from karmixlang.io.views import ViewReport
from karmixlang.ir.graph import Graph, KeyMap, Node, match_key, reachable
from karmixlang.ops import OPS, RAW_READ
from karmixlang.machine import available_memory
from karmixlang.plan.executable import Executable, KeyJob, Output, SaveTarget, Step
from karmixlang.plan.extract import Extraction, factor_outputs
from karmixlang.plan.loras import PlannedLora, plan_loras
from karmixlang.plan.outofcore import chunking_for, slice_step
from karmixlang.plan.rebasin import plan_permutations
from karmixlang.plan.views import apply_views
from karmixlang.plan.vocab import SaveVocab, plan_vocabularies

COMPUTE_ITEMSIZE = {"fp32": 4, "fp64": 8}
# Blocks below this come from glibc's heap, which keeps them for reuse (the runtime raises the
# mmap threshold to this maximum); larger ones are mapped and unmapped (runtime/allocator.py).
HEAP_BLOCK_LIMIT = 32 << 20
# Freed heap blocks stay resident for reuse, and a heap that the next key's blocks do not fit
# exactly keeps them beside the new ones (measured: up to one earlier key's worth per thread).
# After a key whose estimate is above this, the runtime hands every heap's free pages back
# (runtime/allocator.release_free_memory), so what a thread keeps is at most one such key's.
HEAP_RELEASE_ABOVE = 256 << 20
# A worker thread's own memory beside its keys' (its heap's bookkeeping, torch's and numpy's
# thread-local state): a few MiB; this much keeps the estimate at or above every bench run.
THREAD_OVERHEAD = 4 << 20
# A non-float key every input holds is copied as is when its copies are identical; planning
# reads and compares copies up to this size (position_ids, a few KB); a larger one is treated
# as before (the fallback's, or K0310).
IDENTICAL_READ_LIMIT = 1 << 20
IDENTICAL = "identical non-float in every input"


@dataclass(frozen=True)
class KeyInfo:
    shape: tuple[int, ...]
    dtype: str  # stored dtype of the first input holding the key (the default output dtype)


@dataclass
class NodeKeys:
    """What one node can produce: keys it computes, and keys it has but cannot compute."""
    ok: dict[str, KeyInfo]
    bad: dict[str, tuple]  # key -> ("missing", node) | ("shape", {name: shape}) | ("dtype", ...)

    def has(self, key: str) -> bool:
        return key in self.ok or key in self.bad


@dataclass
class Schedule:
    headers: dict[Node, CheckpointHeader]
    executable: Executable  # what the runtime runs: nodes by index, one KeyJob per key
    copied: list[dict[str, str]]  # per save: key -> reason
    save_keys: list[int]
    bytes_read: int
    bytes_written: list[int]
    peak_key: str | None
    peak_bytes: int
    loras: dict[Node, PlannedLora] = field(default_factory=dict)
    warnings: list[Diagnostic] = field(default_factory=list)
    extractions: dict[int, Extraction] = field(default_factory=dict)  # save -> its LoRA
    views: dict[Node, ViewReport] = field(default_factory=dict)  # loads read through a view
    vocab: dict[int, SaveVocab] = field(default_factory=dict)  # saves matching rows by token
    # save -> the side files of a save into a folder (plan/folders.py; set when compiling)
    folders: dict[int, FolderSave] = field(default_factory=dict)
    # The inputs only the permutation phase reads (plan/rebasin.py): in `headers`, not in
    # the graph.
    phase_one: tuple[Node, ...] = ()

    @property
    def jobs(self) -> list[KeyJob]:
        return self.executable.jobs

    @property
    def memory_limit(self) -> int:
        return self.executable.memory_limit


# ------------------------------------------------------------------ headers

def read_inputs(graph: Graph) -> dict[Node, CheckpointHeader]:
    headers, diags = {}, []
    for n in graph.topo():
        if n.op not in ("load", "lora"):
            continue
        spans = graph.origins.get(n) or [None]
        try:
            headers[n] = read_checkpoint(n.attr("path"), spans[0])
        except KmxError as exc:
            diags.extend(exc.diagnostics)
    if diags:
        raise KmxError(diags)
    return headers


# ------------------------------------------------------------------ key sets per node

def node_keys(graph: Graph, headers: dict[Node, CheckpointHeader],
              loras: dict[Node, PlannedLora] | None = None) -> dict[Node, NodeKeys]:
    out: dict[Node, NodeKeys] = {}
    # Inputs with the same float keys, shapes and dtypes (fine-tunes of one model) share one
    # `ok` table, so combining them is a lookup rather than a walk over every key.
    tables: dict[tuple, dict[str, KeyInfo]] = {}
    for n in graph.topo():
        if n.op == "load":
            ok, bad = {}, {}
            for k, t in headers[n].tensors.items():
                if DTYPES[t.dtype].is_float:
                    ok[k] = KeyInfo(t.shape, t.dtype)
                else:
                    bad[k] = ("dtype", n, t.dtype)
            ok = tables.setdefault(tuple(sorted((k, v.shape, v.dtype) for k, v in ok.items())),
                                   ok)
            out[n] = NodeKeys(ok, bad)
        elif n.op == "lora":  # every key of its partners: a key no module changes is zero
            out[n] = NodeKeys({k: KeyInfo(shape, dtype) for k, (shape, dtype)
                               in loras[n].shapes.items()}, {})
        elif n.op in ("select", "exclude"):
            src = out[n.inputs[0]]
            pats = n.attr("patterns")
            keep = (lambda k: any(match_key(p, k) for p in pats)) if n.op == "select" else \
                (lambda k: not any(match_key(p, k) for p in pats))
            out[n] = NodeKeys({k: v for k, v in src.ok.items() if keep(k)},
                              {k: v for k, v in src.bad.items() if keep(k)})
        elif n.op == "union":
            x, y = out[n.inputs[0]], out[n.inputs[1]]
            ok = {k: v for k, v in x.ok.items() if not y.has(k)}
            bad = {k: v for k, v in x.bad.items() if not y.has(k)}
            ok.update(y.ok)
            bad.update(y.bad)
            out[n] = NodeKeys(ok, bad)
        else:  # the keys every input has with one shape (one input: its table as is)
            out[n] = _combine([out[i] for i in n.inputs], n.inputs)
    return out


def _combine(ins: list[NodeKeys], nodes: tuple[Node, ...]) -> NodeKeys:
    if len({id(i) for i in ins}) == 1:  # every input has the same key table (the common case)
        return ins[0]
    if len({id(i.ok) for i in ins}) == 1:  # the same float keys: only the others differ
        bad = {}
        for i in ins:
            for k in i.bad:
                bad.setdefault(k, ins[0].bad.get(k) or ("missing", nodes[0]))
        return NodeKeys(ins[0].ok, bad)
    universe = set()
    for i in ins:
        universe.update(i.ok)
        universe.update(i.bad)
    ok, bad = {}, {}
    for k in universe:
        first, reason = None, None
        for i, node in zip(ins, nodes):
            info = i.ok.get(k)
            if info is None:
                reason = i.bad.get(k) or ("missing", node)
                break
            if first is None:
                first = info
            elif info.shape != first.shape:
                reason = ("shape", nodes, k)
                break
        if reason is None:
            ok[k] = first
        else:
            bad[k] = reason
    return NodeKeys(ok, bad)


def describe_reason(reason: tuple, graph: Graph, headers, key: str) -> str:
    kind = reason[0]
    if kind == "dtype":
        return f"not a float ({reason[2]}) in {graph.display_name(reason[1])}"
    if kind == "missing":
        lacking = [graph.display_name(n) for n in _loads(reason[1]) if key not in headers[n].tensors]
        return "missing in " + (", ".join(lacking) or graph.display_name(reason[1]))
    shapes = {}
    for node in reason[1]:
        for leaf in _loads(node):
            t = headers[leaf].tensors.get(key)
            if t is not None:
                shapes.setdefault(tuple(t.shape), graph.display_name(leaf))
    return "shapes differ: " + ", ".join(f"{name} {list(s)}" for s, name in shapes.items())


def _loads(n: Node) -> list[Node]:
    return sorted((x for x in reachable([n]) if x.op == "load"), key=lambda m: m.attr("path"))


# ------------------------------------------------------------------ per-key jobs

def _active(root: Node, key: str, keys: dict[Node, NodeKeys], acc: dict[int, Node],
            choices: dict[Node, Node]) -> None:
    """The nodes evaluated for `key`: a union follows only the side the key comes from
    (recorded in `choices`)."""
    stack = [root]
    while stack:
        n = stack.pop()
        if id(n) in acc:
            continue
        acc[id(n)] = n
        if n.op == "union":
            x, y = n.inputs
            choices[n] = y if keys[y].has(key) else x
            stack.append(choices[n])
        else:
            stack.extend(n.inputs)


class Jobs:
    """Makes the KeyJobs of one graph: nodes are referred to by their index in `order` (the
    graph's topological order, the executable's node table)."""

    def __init__(self, order: list[Node], keys: dict[Node, NodeKeys], headers, item: int,
                 loras: dict[Node, PlannedLora] | None = None):
        self.order, self.keys, self.headers, self.item = order, keys, headers, item
        self.loras = loras or {}
        self.index = {n: i for i, n in enumerate(order)}
        self.unions = tuple(n for n in order if n.op == "union")
        self.cache: dict[tuple, _Template] = {}
        # id(job) -> peak bytes per element of one chunk of it (plan/outofcore.py)
        self.chunk_per_element: dict[int, float] = {}

    def make(self, key: str, outputs: list[Output], shape: tuple[int, ...] | None = None
             ) -> KeyJob:
        """`shape`: the key's (when the outputs are not the key itself: LoRA factors)."""
        sig = (tuple(o.node for o in outputs),
               tuple(self.keys[u.inputs[1]].has(key) for u in self.unions))
        t = self.cache.get(sig)
        if t is None:
            t = self.cache[sig] = _template(outputs, key, self)
        numel = math.prod(shape or outputs[0].shape)
        read, tensors = 0, {}
        for i in t.loads:
            info = self.headers[self.order[i]].tensors.get(key)
            if info is not None:
                tensors[i] = info
                read += info.nbytes
        lora = {}
        for i in t.steps:
            planned = self.loras.get(self.order[i])
            if planned is not None:
                terms = planned.terms.get(key, ())
                lora[i] = (planned.shapes[key][0], terms)
                read += sum(x.nbytes for term in terms for _, x in term.tensors)
        out_bytes = sum(nbytes(o.dtype, o.shape) or 0 for o in outputs)
        if any(o.factor for o in outputs):  # the SVD: the key, U and Vh, in fp64
            out_bytes += 3 * numel * 8
        # An output narrower than fp32 is tested finite by summing it widened (a copy of
        # fp32 entries, one output at a time: runtime/tensors.finite).
        check = numel * 4 if any(DTYPES[o.dtype].itemsize < 4 for o in outputs
                                 if o.dtype in DTYPES) else 0
        end = t.end_per_element * numel + out_bytes + check
        job = KeyJob(key, t.steps, t.choices, t.deferred, t.loads, t.free_after, outputs,
                     int(max(t.peak(numel), end)), read, tensors=tensors, lora=lora,
                     scratch_bytes=int(t.scratch_per_element * numel))
        self.chunk_per_element[id(job)] = max(t.peak(1), end / max(1, numel))
        return job

    def add_fallback(self, job: KeyJob, graph: Graph) -> None:
        """The job that copies the same key from each save's fallback that holds it (for
        --nonfinite=fallback), and the first save that has none. A non-finite input needs
        every save's copy; a non-finite result only its own save's."""
        outputs = []
        for o in job.outputs:
            fb = graph.saves[o.save].fallback
            if fb is None or o.factor is not None or not self.keys[fb].has(job.key):
                if job.no_fallback is None:
                    job.no_fallback = o.save
                continue
            outputs.append(Output(o.save, self.index[fb], o.dtype, o.shape, "non-finite input"))
        if outputs:
            job.fallback = self.make(job.key, outputs)


def build_jobs(graph: Graph, headers, keys, jobs: Jobs, strict: bool = False,
               extractions: dict[int, Extraction] | None = None):
    per_key: dict[str, list[Output]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    copied: list[dict[str, str]] = []
    diags: list[Diagnostic] = []
    extractions = {} if extractions is None else extractions
    for si, save in enumerate(graph.saves):
        if save.lora is not None:
            extractions[si] = Extraction(save.lora, save.lora_conv)
        ek = keys[save.expr]
        fb = save.fallback
        fk = keys[fb] if fb is not None else None
        universe = set(ek.ok) | set(ek.bad) | (set(fk.ok) | set(fk.bad) if fk else set())
        copied.append({})
        if si in extractions:
            extractions[si].arch = detect(dict.fromkeys(universe, ())).arch
        failures = []
        for k in sorted(universe):
            if k in ek.ok:
                info = ek.ok[k]
                stored = _fallback_dtype(fb, headers, k) or info.dtype
                dtype = save.dtype or stored
                shapes[k] = info.shape
                got = [Output(si, jobs.index[save.expr], dtype, info.shape, None)] \
                    if si not in extractions else \
                    factor_outputs(si, jobs.index[save.expr], k, info.shape, dtype,
                                   extractions[si])
                if isinstance(got, str):
                    extractions[si].left_out[k] = got
                else:
                    per_key.setdefault(k, []).extend(got)
                continue
            reason = describe_reason(ek.bad[k], graph, headers, k) if k in ek.bad else \
                "not produced by the expression"
            if si in extractions:  # a LoRA holds changes: nothing is copied into it
                extractions[si].left_out[k] = "not computed: " + reason
                continue
            src = _copy_source(fb, keys, headers, k)
            same = _identical_nonfloat(save.expr, ek.bad.get(k), headers, k) if src is None \
                else None
            if same is not None:  # not a fallback copy: allowed under --strict too
                node, t = same
                per_key.setdefault(k, []).append(Output(si, jobs.index[node], t.dtype, t.shape,
                                                        f"{IDENTICAL} ({t.dtype})"))
                copied[si][k] = f"{IDENTICAL} ({t.dtype})"
                continue
            if src is None or strict:
                failures.append((k, reason))
                continue
            shape, stored = src
            dtype = save.dtype if save.dtype and DTYPES[stored].is_float else stored
            per_key.setdefault(k, []).append(Output(si, jobs.index[fb], dtype, shape, reason))
            copied[si][k] = reason
        if failures:
            diags.append(_fallback_error(save, failures, strict))
    if diags:
        raise KmxError(diags)
    out = [jobs.make(k, per_key[k], shapes.get(k)) for k in sorted(per_key)]
    for job in out:
        jobs.add_fallback(job, graph)
    return out, copied


def _fallback_dtype(fb, headers, key):
    if fb is not None and fb.op == "load":
        t = headers[fb].tensors.get(key)
        return t.dtype if t is not None else None
    return None


def _identical_nonfloat(expr: Node, reason, headers, key: str):
    """(input node, TensorInfo) when `key` is an integer/bool buffer that every input of
    `expr` holds with one dtype, shape and content, so it can be copied as is; else None.
    One input needs no reading; several are compared byte for byte up to
    IDENTICAL_READ_LIMIT (copies at one file offset are the same bytes)."""
    if reason is None or reason[0] != "dtype":
        return None
    loads = _loads(expr)
    infos = [headers[n].tensors.get(key) for n in loads]
    if not infos or any(t is None or (t.dtype, t.shape) != (infos[0].dtype, infos[0].shape)
                        for t in infos):
        return None
    if DTYPES[infos[0].dtype].is_float:
        return None
    stored = {(t.file, t.begin): t for t in infos}
    if len(stored) > 1:
        if infos[0].nbytes > IDENTICAL_READ_LIMIT:
            return None
        data = {read_tensor_bytes(t) for t in stored.values()}
        if len(data) > 1:
            return None
    return loads[0], infos[0]


def _copy_source(fb, keys, headers, key):
    """(shape, dtype) of `key` as the fallback gives it, or None. A fallback that is a file,
    or key selection over files (select/exclude/|), copies anything the file has, integer
    buffers included; a computed fallback gives what it can compute."""
    if fb is None:
        return None
    node = fb
    while node.op in ("select", "exclude", "union") and keys[node].has(key):
        x = node.inputs[0]
        node = node.inputs[1] if node.op == "union" and keys[node.inputs[1]].has(key) else x
    if node.op == "load" and keys[fb].has(key):
        t = headers[node].tensors.get(key)
        return (t.shape, t.dtype) if t is not None else None
    info = keys[fb].ok.get(key)
    return (info.shape, info.dtype) if info is not None else None


def _fallback_error(save, failures, strict: bool) -> Diagnostic:
    shown = "; ".join(f"`{k}` ({why})" for k, why in failures[:3])
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    code = "K0405" if strict else _code_for(failures[0][1])
    if strict:
        msg = f"--strict: {len(failures)} key(s) would be copied from the fallback: {shown}{more}"
        help_ = "fix the inputs, or run without --strict to copy these keys"
    else:
        msg = f"{len(failures)} key(s) cannot be computed and have no fallback: {shown}{more}"
        help_ = ("add `with fallback=MODEL` (a model that has these keys), or exclude(...) them; "
                 "a save whose expression uses exactly one base falls back to it")
    return error(code, msg, save.span, label="in this save", help=help_)


def _code_for(reason: str) -> str:
    if reason.startswith("shapes"):
        return "K0303"
    if reason.startswith("not a float"):
        return "K0310"
    return "K0304"


@dataclass(frozen=True)
class _Template:
    """The per-key plan shared by every key with the same outputs and union choices; sizes
    are per element (everything a key holds scales with its element count)."""
    steps: tuple[int, ...]
    choices: dict[int, int]
    deferred: frozenset[int]
    free_after: tuple[tuple[int, ...], ...]
    loads: tuple[int, ...]
    # per step that can hold the key's peak: (bytes per element of the key, bytes per element
    # of a kernel slice, the slice's length): the second part stops growing at one slice
    peaks: tuple[tuple[float, float, int], ...]
    end_per_element: float
    scratch_per_element: float  # of the above, the thread's reused read buffers

    def peak(self, numel: int) -> float:
        """At `numel` elements (1: per element of a piece within one slice)."""
        return max((whole * numel + sliced * min(numel, step)
                    for whole, sliced, step in self.peaks), default=0)


def _template(outputs: list[Output], key: str, jobs: Jobs) -> _Template:
    order, index, item = jobs.order, jobs.index, jobs.item
    acc: dict[int, Node] = {}
    choices: dict[Node, Node] = {}
    for out in outputs:
        _active(order[out.node], key, jobs.keys, acc, choices)
    steps = sorted(index[n] for n in acc.values())
    choice = {index[u]: index[x] for u, x in choices.items()}
    inputs = {i: tuple(index[x] for x in order[i].inputs) for i in steps}

    def used(i: int):
        return (choice[i],) if order[i].op == "union" else inputs[i]

    # A load or linear combination whose only use is one linear combination is evaluated
    # inside it, accumulated, and dropped: a weighted sum of N models, or Σ wᵢ(mᵢ − base),
    # then holds one input at a time, not N (same arithmetic, in reused buffers).
    uses: dict[int, int] = {}
    for i in steps:
        for x in used(i):
            uses[x] = uses.get(x, 0) + 1
    outs = {o.node for o in outputs}
    deferred = frozenset(x for i in steps if OPS[order[i].op].linear for x in inputs[i]
                         if (OPS[order[x].op].linear or order[x].op == "load") and uses[x] == 1
                         and x not in outs)
    steps = [i for i in steps if i not in deferred]

    def feeds(x: int):
        """The values a deferred subtree reads (depth-first through deferred nodes)."""
        for y in inputs[x]:
            if y in deferred:
                yield from feeds(y)
            else:
                yield y

    def depth(x: int) -> int:  # nesting of deferred combinations: one buffer per level
        return max((1 + depth(y) for y in inputs[x] if y in deferred and order[y].op != "load"),
                   default=0)

    last = {i: k for k, i in enumerate(steps)}
    for k, i in enumerate(steps):
        for x in used(i):
            for y in (feeds(x) if x in deferred else (x,)):
                last[y] = max(last[y], k)
    end = len(steps)
    for out in outputs:
        last[out.node] = end
    # An alias (select, union, pick...) shares its input's tensor: keep the input alive as long.
    for i in reversed(steps):
        if OPS[order[i].op].alias:
            for x in used(i):
                last[x] = max(last[x], last[i])
    free_after: list[list[int]] = [[] for _ in range(end + 1)]
    for i in steps:
        free_after[last[i]].append(i)
    size = {i: OPS[order[i].op].tensors(len(inputs[i])) * item for i in steps}
    # A combination with deferred inputs reads them through the thread's reused buffers
    # (runtime Scratch: the read buffer, one widened input unless only a first input is
    # widened, into the sum itself, and one per nested combination):
    # allocated once, they stay for the rest of the key (and the cast of its output lands
    # in the read buffer), not only while the combination runs.
    live, scratch = 0, 0
    peaks: set[tuple[float, float, int]] = set()
    for k, i in enumerate(steps):
        n = order[i]
        live += size[i]
        work, sliced, step = 0, 0, 0
        if any(x in deferred for x in inputs[i]):
            widened = widens(i, lambda y: inputs[y], lambda y: order[y].op, deferred)
            scratch = max(scratch, RAW_READ + item * (widened + depth(i)))
        else:  # (a load's is its read buffer)
            spec = OPS[n.op].workspace
            work = spec(len(n.inputs), item)
            sliced = spec.per_slice_element(len(n.inputs), item)
            step = slice_step(len(n.inputs))
        peaks.add((live + scratch + work, sliced, step))
        live -= sum(size[m] for m in free_after[k])
    loads = tuple(index[n] for n in acc.values() if n.op == "load")
    return _Template(tuple(steps), choice, deferred, tuple(tuple(f) for f in free_after), loads,
                     _pareto(peaks), live + scratch, scratch)


def _pareto(peaks: set[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """The steps' peaks that can be the largest at some key size (others are dominated)."""
    return tuple(p for p in peaks
                 if not any(q != p and q[0] >= p[0] and q[1] * q[2] >= p[1] * p[2]
                            and q[1] >= p[1] for q in peaks))


def _keymaps(n: Node) -> list[KeyMap]:
    out = []
    for _, v in n.attrs:
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, KeyMap):
                out.append(x)
    return out


def check_keymaps(graph: Graph, order: list[Node], jobs: list[KeyJob]) -> None:
    """Every per-key number must have a value for every key it is used at: found now, from
    the headers, rather than as a crash in the middle of a run."""
    failures: dict[int, tuple[Node, KeyMap, list[str]]] = {}
    mapped = {i: kms for i, n in enumerate(order) if (kms := _keymaps(n))}
    if not mapped:
        return
    for job in jobs:
        for i in job.steps:
            for km in mapped.get(i, ()):
                try:
                    km.at(job.key)
                except KeyError:
                    failures.setdefault(id(km), (order[i], km, []))[2].append(job.key)
    diags = []
    for n, km, keys in failures.values():
        spans = graph.origins.get(n) or [None]
        shown = ", ".join(f"`{k}`" for k in keys[:3]) + (f" and {len(keys) - 3} more"
                                                          if len(keys) > 3 else "")
        diags.append(error("K0204", f"{km.describe()} has no value for {len(keys)} key(s): "
                           f"{shown}", spans[0], help='end by_key with a "*" rule, or give '
                           "blocks() a default="))
    if diags:
        raise KmxError(diags)


def widens(x: int, inputs_of, op_of, deferred) -> bool:
    """Whether combination x reads a deferred load through the thread's widening buffer: one
    past its first input, here or in a nested deferred combination (a first input is widened
    straight into the sum: runtime Evaluator.linear)."""
    return any(y in deferred and (k if op_of(y) == "load" else widens(y, inputs_of, op_of,
                                                                        deferred))
               for k, y in enumerate(inputs_of(x)))


def chunk_large_keys(graph: Graph, nodes: tuple[Step, ...], jobs: list[KeyJob], limit: int,
                     item: int, chunk_per_element: dict[int, float]) -> None:
    """Keys whose in-memory estimate exceeds the limit run in chunks (outofcore.py), and so do
    large keys where that saves memory; their estimate becomes the chunked one. A key that
    cannot fit even so is an error."""
    def whole_per_element(n: Step, numel: int) -> float:
        # the filtered member's inputs read and widened (a fourth tensor where one goes
        # through the widening buffer), the result, and the filter's workspace at this key's
        # size (ties: the trim of one member)
        member = OPS[n.op].split or n.op
        wide = any(widens(x, lambda y: job.reads(nodes, y), lambda y: nodes[y].op,
                          job.deferred) for x in n.inputs)
        return 2 * RAW_READ + (3 + wide) * item + OPS[member].workspace.whole_key(1, item,
                                                                                  numel)

    failures = []
    for job in jobs:
        job.mem_bytes = job.mem_bytes or job.est_bytes
        job.ooc, job.est_bytes = None, job.mem_bytes
        if any(o.factor for o in job.outputs):  # an SVD needs the whole key: never chunked
            continue
        per_element = job.mem_bytes / max(1, math.prod(job.outputs[0].shape))
        ooc = chunking_for(job, nodes, per_element, limit, item, whole_per_element,
                           chunk_per_element[id(job)])
        if ooc is None:
            continue
        if ooc.whole_bytes > limit:
            failures.append((job, ooc.whole_bytes))
            continue
        job.ooc = ooc
        job.est_bytes = max(ooc.chunk_bytes, ooc.whole_bytes)
    if failures:
        job, need = max(failures, key=lambda f: f[1])
        more = f" (and {len(failures) - 1} more key(s))" if len(failures) > 1 else ""
        raise KmxError([error(
            "K0408", f"key `{job.key}` needs ~{need:,} bytes even out of core, over the memory "
            f"limit of {limit:,} bytes{more}", graph.saves[job.outputs[0].save].span,
            label="in this save",
            help="a whole-key filter (della, breadcrumbs, iso; trim in fp64) holds one "
                 "member of the key in memory: raise --memory-limit")])


def executable(graph: Graph, order: list[Node], headers, jobs: list[KeyJob], compute: str,
               limit: int, permutations=()) -> Executable:
    """What the runtime runs, with nothing of the compiler in it: the node table, the names
    messages give the inputs, the outputs, every data file's size, the jobs."""
    index = {n: i for i, n in enumerate(order)}
    nodes = tuple(Step(n.op, tuple(index[x] for x in n.inputs), n.attrs) for n in order)
    labels = {i: str(graph.names.get(n, n.attr("path"))) for i, n in enumerate(order)
              if n.op in ("load", "lora")}
    origins = {i: graph.origins[n][0] for i, n in enumerate(order)
               if n.op in ("load", "lora") and graph.origins.get(n)}
    saves = tuple(SaveTarget(str(s.path), str(s.written), s.span) for s in graph.saves)
    return Executable(nodes, labels, saves, compute, limit, _file_sizes(headers), jobs, origins,
                      permutations)


def _file_sizes(headers) -> dict[str, int]:
    """So that a Ray worker can tell that it sees the files the driver planned with."""
    sizes = {}
    for h in headers.values():
        for f in h.files:
            try:
                sizes[f] = os.stat(f).st_size
            except OSError as exc:  # gone since its header was read
                raise KmxError([error("K0301", f"cannot open `{f}`: {exc.strerror}")]) from None
    return sizes


def schedule(graph: Graph, compute: str = "fp32", strict: bool = False,
             headers: dict[Node, CheckpointHeader] | None = None,
             memory_limit: int | None = None) -> Schedule:
    """`memory_limit`: bytes (None: half of the available memory), which decides the keys
    that run out of core."""
    headers, views = apply_views(graph, headers if headers is not None else read_inputs(graph))
    headers, vocab = plan_vocabularies(graph, headers)
    loras, warnings = plan_loras(graph, headers)
    keys = node_keys(graph, headers, loras)
    order = graph.topo()
    extractions: dict[int, Extraction] = {}
    maker = Jobs(order, keys, headers, COMPUTE_ITEMSIZE[compute], loras)
    jobs, copied = build_jobs(graph, headers, keys, maker, strict, extractions)
    check_keymaps(graph, order, jobs)
    limit = memory_limit or available_memory() // 2
    permutations, phase_one = plan_permutations(graph, order, headers, keys, limit)
    headers = {**headers, **phase_one}
    exe = executable(graph, order, headers, jobs, compute, limit, permutations)
    chunk_large_keys(graph, exe.nodes, jobs, limit, COMPUTE_ITEMSIZE[compute],
                     maker.chunk_per_element)
    read_once: dict[tuple[str, str], int] = {}
    for job in jobs:
        for t in job.tensors.values():
            read_once[(t.file, t.name)] = t.nbytes
        for _, terms in job.lora.values():
            for term in terms:
                for _, t in term.tensors:
                    read_once[(t.file, t.name)] = t.nbytes
    written = [0] * len(graph.saves)
    counts = [0] * len(graph.saves)
    for job in jobs:
        for o in job.outputs:
            written[o.save] += nbytes(o.dtype, o.shape) or 0
            counts[o.save] += 1
    peak_job = max(jobs, key=lambda j: j.est_bytes, default=None)
    return Schedule(headers, exe, copied, counts, sum(read_once.values()), written,
                    peak_job.key if peak_job else None, peak_job.est_bytes if peak_job else 0,
                    loras, warnings, extractions, views, vocab, phase_one=tuple(phase_one))
