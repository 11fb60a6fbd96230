"""Evaluating one key of an executable schedule (plan/executable.py): its inputs are read,
its steps evaluated in the planned order, values dropped after their last use. Used by the
local executor's threads and by Ray workers alike; needs nothing but the schedule and the
input files.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from karmixlang.builtins import BY_OP
from karmixlang.diagnostics import KmxError, error
from karmixlang.ir.graph import KeyMap
from karmixlang.ops import OPS
from karmixlang.plan.executable import Executable, KeyJob, Output, Step
from karmixlang.runtime.chunked import Streamed, run_chunked
from karmixlang.runtime.kernels.table import KERNELS
from karmixlang.runtime.tensors import COMPUTE, Reader, Scratch, part, to_bytes

class NonFinite(Exception):
    def __init__(self, node: int, key: str):
        self.node, self.key = node, key


def tune_allocator() -> None:
    """Let glibc reuse freed tensor memory for the next key instead of returning it at once.
    By default any block above a dynamic threshold is a fresh mmap, whose pages the kernel
    zero-fills on first touch and whose unmapping interrupts every thread: on a 2-core TIES
    merge that was two thirds of the run time (20 s of system time). The mmap threshold is
    raised to its maximum (32 MB) and the heap is trimmed only past 64 MB free, so resident
    memory stays bounded by the keys in flight plus what the allocator keeps for reuse.
    Harmless where mallopt is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def prepare_process() -> None:
    """What every process that evaluates keys sets first: one intra-op thread, so reductions
    add in one order and results are bit-exact whoever computes them; the allocator tuned."""
    torch.set_num_threads(1)
    tune_allocator()


class Evaluator:
    """Evaluates one key's job. Stateless between keys, so any thread may run any key."""

    def __init__(self, exe: Executable, reader: Reader, device: str = "cpu"):
        self.exe = exe
        self.nodes = exe.nodes
        self.reader = reader
        self.compute = COMPUTE[exe.compute]
        self.device = torch.device(device)
        self.scratch = Scratch()

    def run(self, job: KeyJob) -> list[tuple[Output, torch.Tensor]]:
        """The job's outputs. They may live in this thread's scratch buffers: write them out
        before this thread runs its next job."""
        values: dict[int, object] = {}
        raw_ok = raw_loads(self.nodes, job)
        into = output_buffers(self.nodes, job)
        for k, i in enumerate(job.steps):
            values[i] = self.step(i, job.key, values, i in raw_ok, job, into)
            for m in job.free_after[k]:
                values.pop(m, None)
        return [(o, values[o.node]) for o in job.outputs]

    def step(self, i: int, key: str, values: dict, raw: bool, job: KeyJob, into: dict,
             span: tuple[int, int] | None = None):
        """Node i's value: of the whole key, or of flat elements [a, b) when `span` is given
        (element-wise steps only: runtime/chunked.py decides which)."""
        n = self.nodes[i]
        if n.op == "union":  # the schedule activated exactly one side for this key
            return values[job.union_choice[i]]
        if n.op == "load":
            return self.load(i, job, raw, span)
        spec = OPS[n.op]
        if spec.linear:
            return self.linear(i, key, values, job, into.get(i), span)
        ins = [values[x] for x in n.inputs]
        if n.op == "pick":
            return ins[0][n.attr("index")]
        if spec.alias:  # select, exclude: the input's tensor
            return ins[0]
        return self.kernel(n, key, ins, span)

    def read(self, i: int, job: KeyJob, span) -> torch.Tensor:
        info = job.tensors[i]
        return self.reader.read(part(info, span) if span else info)

    def load(self, i: int, job: KeyJob, raw: bool = False, span=None):
        """An input tensor: as stored (`raw`, for copies), or on the device in the compute
        dtype, checked finite."""
        t = self.read(i, job, span)
        if raw or not t.is_floating_point():
            return t
        t = t.to(device=self.device, dtype=self.compute)
        self.check_finite(t, i, job.key)
        return t

    @staticmethod
    def finite(t: torch.Tensor) -> bool:
        # A NaN or Inf anywhere makes the sum non-finite, and a plain sum is ~20x cheaper than
        # isfinite(); only a non-finite sum (or an overflow) needs the exact test.
        return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())

    def check_finite(self, t: torch.Tensor, i: int, key: str) -> None:
        if not self.finite(t):
            raise NonFinite(i, key)

    def load_widened(self, i: int, job: KeyJob, span=None, check: bool = True) -> torch.Tensor:
        """A deferred input, read and widened through this thread's reused buffers (valid
        until its next call): streaming a weighted sum then allocates nothing per input."""
        info = job.tensors[i]
        if span:
            info = part(info, span)
        raw = self.reader.read(info, self.scratch.get("read", info.nbytes))
        if raw.dtype == self.compute or not raw.is_floating_point() or \
                self.device.type != "cpu":
            t = raw.to(device=self.device, dtype=self.compute)
        else:
            wide = self.scratch.get("wide", raw.numel() * self.compute.itemsize)
            t = wide.view(self.compute).view(raw.shape).copy_(raw)
        if check:
            self.check_finite(t, i, job.key)
        return t

    def linear(self, i: int, key: str, values: dict, job: KeyJob, scratch: str | None,
               span=None, depth: int = 0):
        """Σ cᵢxᵢ accumulated in input order (as kernels.combine does); deferred inputs
        (loads, and combinations used only here) are evaluated here one at a time, and
        `scratch` names the reused buffer of a result that is only written out or summed at
        once."""
        n = self.nodes[i]
        coeffs = OPS[n.op].coefficients(n, key)
        acc, streamed = None, []
        for x, c in zip(n.inputs, coeffs):
            if x not in job.deferred:
                t = values[x]
            elif self.nodes[x].op == "load":
                # Checked through the result: a NaN or Inf in any term (whatever its
                # coefficient, as 0·Inf is NaN) makes the sum non-finite.
                t = self.load_widened(x, job, span, check=False)
                streamed.append(x)
            else:
                t = self.linear(x, key, values, job, f"nested{depth + 1}", span, depth + 1)
            if acc is None:  # never an input itself: the first input may be shared
                if scratch is not None and t.device.type == "cpu":
                    nbytes = t.numel() * self.compute.itemsize
                    acc = self.scratch.get(scratch, nbytes).view(self.compute)
                    acc = acc.view(t.shape).copy_(t).mul_(c)
                else:
                    acc = t * c
            else:
                acc.add_(t, alpha=c)
            del t
        if streamed and not self.finite(acc):  # name the input (or it was an overflow)
            for x in streamed:
                self.load_widened(x, job, span)
        return acc

    def call_args(self, n: Step, key: str, ins: list, span=None) -> tuple[list, dict]:
        """The positional and keyword arguments of n's kernel, from its input values (a
        random filter on a chunk also gets the chunk's place, for its random stream)."""
        b = BY_OP[n.op]
        attrs = {k: (v.at(key) if isinstance(v, KeyMap) else v) for k, v in n.attrs}
        args, kwargs, pos = [], {}, 0
        for p in b.params:
            if p.type.endswith("cluster"):
                w = list(attrs.pop("weights"))
                args += [ins[pos:pos + len(w)], w]
                pos += len(w)
            elif p.type in ("space", "model", "delta"):
                args.append(ins[pos])
                pos += 1
            elif p.name in attrs:
                kwargs[p.name] = attrs.pop(p.name)
        if OPS[n.op].seeded:
            kwargs.update(key=key, member=attrs.pop("member"))
            if span:
                kwargs["offset"] = span[0]
        return args, kwargs

    def kernel(self, n: Step, key: str, ins: list, span=None):
        args, kwargs = self.call_args(n, key, ins, span)
        return KERNELS[OPS[n.op].kernel](*args, **kwargs)


def output_buffers(nodes: tuple[Step, ...], job: KeyJob) -> dict[int, str]:
    """A linear combination that is only written out accumulates in a reused buffer."""
    used = {x for i in job.steps for x in nodes[i].inputs}
    return {o.node: f"out{k}" for k, o in enumerate(job.outputs)
            if OPS[nodes[o.node].op].linear and o.node not in used}


def raw_loads(nodes: tuple[Step, ...], job: KeyJob) -> set[int]:
    """Loads whose value is only written out (through aliases), never computed with: these
    keep their stored dtype, so a copied key is bit-exact whatever the compute dtype."""
    def used(i: int):
        return (job.union_choice[i],) if nodes[i].op == "union" else nodes[i].inputs

    computed = set()
    stack = [i for i in job.steps if not OPS[nodes[i].op].alias]
    while stack:  # through deferred combinations too: what they read is computed with
        i = stack.pop()
        for x in used(i):
            computed.add(x)
            if x in job.deferred:
                stack.append(x)
    # Follow aliases down to their loads.
    for i in reversed(job.steps):
        if OPS[nodes[i].op].alias and i in computed:
            computed.update(used(i))
    return {i for i in job.steps if nodes[i].op == "load" and i not in computed}


def compute_key(ev: Evaluator, job: KeyJob, nonfinite: str, fallbacks: list[str]):
    """The job's outputs as [(Output, bytes)] (valid until this thread's next job), or, for
    an out-of-core key, as Streamed pieces computed while they are written. A key with
    non-finite inputs is copied from the fallback (`nonfinite` "fallback") or fails."""
    if job.ooc is not None:
        return Streamed(_pieces(ev, job, nonfinite, fallbacks))
    try:
        results = ev.run(job)
    except NonFinite as nf:
        results = ev.run(_on_nonfinite(ev.exe, job, nf, nonfinite, fallbacks))
    # Each output is cast into its own reused buffer: all of them are delivered afterwards.
    return [(out, to_bytes(value, out.dtype, ev.scratch, "read" if i == 0 else f"cast{i}"))
            for i, (out, value) in enumerate(results)]


def _pieces(ev: Evaluator, job: KeyJob, nonfinite: str, fallbacks: list[str]):
    # Filtered members spill next to the output (the disk meant for big files); on a machine
    # that lacks that folder (a Ray worker), into the system's temporary folder.
    spill_root = os.path.dirname(os.path.abspath(ev.exe.saves[0].path))
    if not os.path.isdir(spill_root):
        spill_root = tempfile.gettempdir()
    try:
        yield from run_chunked(ev, job, raw_loads(ev.nodes, job), output_buffers(ev.nodes, job),
                               spill_root)
    except NonFinite as nf:
        # Pieces already written are overwritten by the fallback's whole key.
        fallback = _on_nonfinite(ev.exe, job, nf, nonfinite, fallbacks)
        for k, (out, value) in enumerate(ev.run(fallback)):
            yield k, 0, to_bytes(value, out.dtype, ev.scratch)


def _on_nonfinite(exe: Executable, job: KeyJob, nf: NonFinite, nonfinite: str,
                  fallbacks: list[str]) -> KeyJob:
    """The job planned for this key's fallback copy, or K0401."""
    if nonfinite != "fallback":
        raise KmxError([error(
            "K0401", f"`{exe.labels[nf.node]}` has NaN or Inf values in key `{nf.key}`",
            help="continue with --resume --nonfinite=fallback to copy such keys from the "
                 "save's fallback; or fix the input and run again with --force (the finished "
                 "keys are discarded)")]) from None
    if job.fallback is None:
        raise KmxError([error("K0401", f"key `{job.key}` has non-finite values and save "
                              f"`{exe.saves[job.no_fallback].written}` has no fallback with it")])
    fallbacks.append(job.key)
    return job.fallback
