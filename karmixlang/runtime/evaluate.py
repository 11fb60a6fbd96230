"""Evaluating one key of an executable schedule (plan/executable.py): its inputs are read,
its steps evaluated in the planned order, values dropped after their last use. Used by the
local executor's threads and by Ray workers alike; needs nothing but the schedule and the
input files.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import torch
from threadpoolctl import threadpool_limits

from karmixlang.builtins import BY_OP
from karmixlang.diagnostics import located
from karmixlang.ir.graph import KeyMap
from karmixlang.ops import OPS
from karmixlang.plan.executable import Executable, KeyJob, Output, Step
from karmixlang.runtime.chunked import Streamed, run_chunked
from karmixlang.runtime.kernels.lora import factor, lora_delta
from karmixlang.runtime.kernels.table import KERNELS
from karmixlang.runtime.nonfinite import (FALLBACK_TOO, BadResult, NonFinite, checked_bytes,
                                          copied_as_stored, fallback_inputs, on_input,
                                          on_result, result_error)
from karmixlang.runtime.allocator import tune_allocator
from karmixlang.runtime.rebasin import Applier
from karmixlang.runtime.tensors import COMPUTE, TORCH_DTYPES, Reader, Scratch, finite, part


def prepare_process() -> None:
    """What every process that evaluates keys sets first: one intra-op thread for torch and
    for the BLAS numpy calls (kernels/base.GramSum), so reductions add in one order and
    results are bit-exact whoever computes them, and key threads do not oversubscribe the
    cores; the allocator tuned."""
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
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
        self.permute = Applier(exe)

    def fresh(self) -> Evaluator:
        """An evaluator on the same inputs with buffers of its own: what it computes leaves
        this one's results (and their cast bytes) alone."""
        return Evaluator(self.exe, self.reader, str(self.device))

    def copies(self, job: KeyJob) -> set[int]:
        """The job's outputs that are an input written as stored."""
        return copied_as_stored(self.nodes, job, raw_loads(self.nodes, job))

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
        svd: dict = {}
        return [(o, values[o.node] if o.factor is None else
                 factor(values[o.node], o.factor, o.shape, svd)) for o in job.outputs]

    def step(self, i: int, key: str, values: dict, raw: bool, job: KeyJob, into: dict,
             span: tuple[int, int] | None = None):
        """Node i's value: of the whole key, or of flat elements [a, b) when `span` is given
        (element-wise steps only: runtime/chunked.py decides which)."""
        n = self.nodes[i]
        if n.op == "union":  # the schedule activated exactly one side for this key
            return values[job.union_choice[i]]
        if n.op == "load":
            return self.load(i, job, raw, span)
        if n.op == "lora":
            return self.lora(i, job, span)
        spec = OPS[n.op]
        if spec.linear:
            return self.linear(i, key, values, job, into.get(i), span)
        ins = [values[x] for x in n.inputs]
        if n.op == "pick":
            return ins[0][n.attr("index")]
        if spec.alias:  # select, exclude: the input's tensor
            return ins[0]
        return self.kernel(n, key, ins, span)

    def read(self, i: int, job: KeyJob, span, into: torch.Tensor | None = None) -> torch.Tensor:
        """Input i's tensor (flat elements `span` of it); a failure to read points at the
        recipe line that declares the input."""
        info = job.tensors[i]
        with located(self.exe.origins.get(i), "this input"):
            return self.reader.read(part(info, span) if span else info, into)

    def load(self, i: int, job: KeyJob, raw: bool = False, span=None):
        """An input tensor: as stored (`raw`, for copies), or on the device in the compute
        dtype, checked finite."""
        t = self.read(i, job, span)
        if raw or not t.is_floating_point():
            return t
        t = t.to(device=self.device, dtype=self.compute)
        self.check_finite(t, i, job.key)
        return t

    def lora(self, i: int, job: KeyJob, span=None) -> torch.Tensor:
        """A LoRA's delta of the key, from the modules that change it (a chunk of it is cut
        from the whole key's delta: LoRA targets are at most tens of megabytes)."""
        shape, terms = job.lora[i]
        like = torch.empty((), dtype=self.compute, device=self.device)
        with located(self.exe.origins.get(i), "this input"):
            tensors = [{r: self.reader.read(x).to(device=self.device, dtype=self.compute)
                        for r, x in term.tensors} for term in terms]
        t = lora_delta(tuple(shape), terms, tensors, like)
        self.check_finite(t, i, job.key)
        return t.reshape(-1)[span[0]:span[1]] if span else t

    def check_finite(self, t: torch.Tensor, i: int, key: str) -> None:
        if not finite(t):
            raise NonFinite(i, key)

    def check_streamed(self, job: KeyJob, span=None) -> None:
        """Raise NonFinite for the first deferred input that holds NaN or Inf."""
        for i in job.loads:
            if i in job.deferred:
                self.load_widened(i, job, span)

    def load_widened(self, i: int, job: KeyJob, span=None, check: bool = True,
                     dest: torch.Tensor | None = None) -> torch.Tensor:
        """A deferred input, read and widened through this thread's reused buffers (valid
        until its next call): streaming a weighted sum then allocates nothing per input.
        `dest` (flat, on the CPU, of the compute dtype and the input's size), where given,
        receives it instead, for the caller to keep: read straight into it where the input
        is stored in the compute dtype, else widened into it from the read buffer."""
        info = part(job.tensors[i], span) if span else job.tensors[i]
        if dest is not None and info.flat and TORCH_DTYPES.get(info.dtype) == self.compute:
            t = self.read(i, job, span, dest.view(torch.uint8))
        elif dest is not None:
            raw = self.read(i, job, span, self.scratch.get("read", info.nbytes))
            t = dest.view(raw.shape).copy_(raw)
        else:
            t = self._widened(i, job, span, info)
        if check:
            self.check_finite(t, i, job.key)
        return t

    def _widened(self, i: int, job: KeyJob, span, info) -> torch.Tensor:
        raw = self.read(i, job, span, self.scratch.get("read", info.nbytes))
        if raw.dtype == self.compute or not raw.is_floating_point() or \
                self.device.type != "cpu":
            return raw.to(device=self.device, dtype=self.compute)
        wide = self.scratch.get("wide", raw.numel() * self.compute.itemsize)
        return wide.view(self.compute).view(raw.shape).copy_(raw)

    def linear(self, i: int, key: str, values: dict, job: KeyJob, scratch: str | None,
               span=None, depth: int = 0):
        """Σ cᵢxᵢ accumulated in input order (as kernels.combine does); deferred inputs
        (loads, and combinations used only here) are evaluated here one at a time, and
        `scratch` names the reused buffer of a result that is only written out or summed at
        once."""
        n = self.nodes[i]
        coeffs = [self.scalar(c) for c in OPS[n.op].coefficients(n, key)]
        acc, streamed = None, []
        for x, c in zip(n.inputs, coeffs):
            dest = None
            if x not in job.deferred:
                t = values[x]
            elif self.nodes[x].op == "load":
                if acc is None and self.device.type == "cpu":  # the sum starts in place
                    info = part(job.tensors[x], span) if span else job.tensors[x]
                    dest = self.accumulator(scratch, math.prod(info.shape))
                # Checked through the result: a NaN or Inf in any term (whatever its
                # coefficient, as 0·Inf is NaN) makes the sum non-finite.
                t = self.load_widened(x, job, span, check=False, dest=dest)
                streamed.append(x)
            else:
                t = self.linear(x, key, values, job, f"nested{depth + 1}", span, depth + 1)
            if acc is None:  # never an input itself: the first input may be shared
                if dest is not None:
                    acc = t if c == 1 else t.mul_(c)  # x·1 is x, bit for bit
                elif t.device.type == "cpu":
                    acc = self.accumulator(scratch, t.numel()).view(t.shape).copy_(t).mul_(c)
                else:
                    acc = t * c
            else:
                acc.add_(t, alpha=c)
            del t
        # A result only written out is tested as it is written (nonfinite.py); any other is
        # tested here, before it is computed with: name the input (or it was an overflow).
        written_only = depth == 0 and scratch is not None
        if streamed and not written_only and not finite(acc):
            for x in streamed:
                self.load_widened(x, job, span)
        return acc

    def accumulator(self, scratch: str | None, numel: int) -> torch.Tensor:
        """A flat CPU tensor of the compute dtype for a sum: the thread's reused buffer named
        `scratch`, or a fresh one."""
        if scratch is None:
            return torch.empty(numel, dtype=self.compute)
        return self.scratch.get(scratch, numel * self.compute.itemsize).view(self.compute)

    def scalar(self, c):
        """torch refuses a float scalar past the compute dtype's range: there it is ±Inf (a
        bound that bounds nothing, or a result that is not finite: K0411), not a crash."""
        if isinstance(c, float) and abs(c) > torch.finfo(self.compute).max:
            return math.copysign(math.inf, c)
        return c

    def weights(self, ws) -> list[float]:
        """A cluster's weights, scaled into the compute dtype's range if they are past it:
        every cluster kernel (means, medians, elections) depends only on their ratios. A
        weight too small to express beside the largest stays the smallest positive one."""
        ws = list(ws)
        big = max((abs(w) for w in ws), default=0.0)
        if big > torch.finfo(self.compute).max:
            ws = [max(w / big, sys.float_info.min) for w in ws]
        return ws

    def call_args(self, n: Step, key: str, ins: list, span=None) -> tuple[list, dict]:
        """The positional and keyword arguments of n's kernel, from its input values (a
        random filter on a chunk also gets the chunk's place, for its random stream)."""
        b = BY_OP[n.op]
        attrs = {k: (v.at(key) if isinstance(v, KeyMap) else v) for k, v in n.attrs}
        args, kwargs, pos = [], {}, 0
        for p in b.params:
            if p.type.endswith("cluster"):
                w = self.weights(attrs.pop("weights"))
                args += [ins[pos:pos + len(w)], w]
                pos += len(w)
            elif p.type in ("space", "model", "delta"):
                args.append(ins[pos])
                pos += 1
            elif p.name in attrs:
                kwargs[p.name] = self.scalar(attrs.pop(p.name))
        if OPS[n.op].seeded:
            kwargs.update(key=key, member=attrs.pop("member"))
            if span:
                kwargs["offset"] = span[0]
        return args, kwargs

    def kernel(self, n: Step, key: str, ins: list, span=None):
        if n.op == "permute":  # a whole-key gather with phase one's permutations
            return self.permute(n, key, ins[0])
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
    computed = set()
    stack = [i for i in job.steps if not OPS[nodes[i].op].alias]
    while stack:  # through deferred combinations too: what they read is computed with
        i = stack.pop()
        for x in job.reads(nodes, i):
            computed.add(x)
            if x in job.deferred:
                stack.append(x)
    # Follow aliases down to their loads.
    for i in reversed(job.steps):
        if OPS[nodes[i].op].alias and i in computed:
            computed.update(job.reads(nodes, i))
    return {i for i in job.steps if nodes[i].op == "load" and i not in computed}


def compute_key(ev: Evaluator, job: KeyJob, nonfinite: str, fallbacks: list[str]):
    """The job's outputs as [(Output, bytes)] (valid until this thread's next job), or, for
    an out-of-core key, as Streamed pieces computed while they are written. A key with
    non-finite inputs or results is copied from the fallback (`nonfinite` "fallback") or
    fails (nonfinite.py)."""
    if job.ooc is not None:
        return Streamed(_pieces(ev, job, nonfinite, fallbacks))
    try:
        return _whole(ev, job, nonfinite, fallbacks)
    except NonFinite as nf:
        copy = on_input(ev.exe, job, nf, nonfinite, fallbacks)
    return _copied(ev, copy)


def _whole(ev: Evaluator, job: KeyJob, nonfinite: str, fallbacks: list[str]):
    """The job's outputs, each tested (nonfinite.py); `nonfinite` None: the job is a
    fallback copy, and a bad result of it stops the run."""
    results = ev.run(job)
    copies = ev.copies(job)
    out = []
    # Each output is cast into its own reused buffer: all of them are delivered afterwards.
    for k, (o, value) in enumerate(results):
        try:
            data = checked_bytes(ev, job, k, value, k in copies,
                                 buffer="read" if k == 0 else f"cast{k}")
        except BadResult as bad:
            if nonfinite is None:
                raise result_error(ev.exe, job, bad, FALLBACK_TOO) from None
            data = on_result(ev, job, bad, nonfinite, fallbacks)
        out.append((o, data))
    return out


def _copied(ev: Evaluator, copy: KeyJob):
    """The key copied from its fallback (planned), in place of a key with a bad input."""
    with fallback_inputs(ev.exe):
        return _whole(ev, copy, None, [])


def _pieces(ev: Evaluator, job: KeyJob, nonfinite: str, fallbacks: list[str]):
    # Filtered members spill next to the output (the disk meant for big files); on a machine
    # that lacks that folder (a Ray worker), into the system's temporary folder.
    spill_root = os.path.dirname(os.path.abspath(ev.exe.saves[0].path))
    if not os.path.isdir(spill_root):
        spill_root = tempfile.gettempdir()
    copies, replaced = ev.copies(job), set()
    try:
        for k, a, value in run_chunked(ev, job, raw_loads(ev.nodes, job),
                                       output_buffers(ev.nodes, job), spill_root):
            if k in replaced:
                continue
            try:
                data = checked_bytes(ev, job, k, value, k in copies, (a, a + value.numel()),
                                     "read" if k == 0 else f"cast{k}")
            except BadResult as bad:  # the fallback's whole key replaces what was written
                replaced.add(k)
                yield k, 0, on_result(ev, job, bad, nonfinite, fallbacks)
                continue
            yield k, a * (data.nbytes // value.numel()), data
    except NonFinite as nf:
        copy = on_input(ev.exe, job, nf, nonfinite, fallbacks)
    else:
        return
    # Pieces already written are overwritten by the fallback's whole key.
    for k, (_, data) in enumerate(_copied(ev, copy)):
        yield k, 0, data
