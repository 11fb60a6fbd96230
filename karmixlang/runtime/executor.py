"""`kmx run`: execute a compiled plan key by key.

Each key is one job (see schedule.KeyJob): its inputs are read, the graph is evaluated in the
planned order, values are dropped after their last use, and the results are written at their
planned offsets. Jobs run on a thread pool; admission keeps the estimated memory of the keys in
flight under the limit. Results never depend on scheduling: every key is computed alone, and
intra-op threads are fixed at one so reductions always add in the same order.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from ..api import Compiled
from ..builtins import BUILTINS
from ..diagnostics import KmxError, error, located
from ..ir import KeyMap, Node
from ..machine import default_threads
from ..schedule import ALIAS_OPS, COMPUTE_ITEMSIZE, LINEAR_OPS, KeyJob, Output, plan_out_of_core
from . import ops
from .chunked import Streamed, run_chunked
from .nonfinite import (BadResult, NonFinite, checked_bytes, copied_as_stored,
                        fallback_inputs, on_input, on_result)
from .outputs import OutputSet
from .tensors import COMPUTE, Reader, Scratch, finite, part

_KERNELS = {b.kernel: b for b in BUILTINS.values() if b.kernel}
CHECKPOINT_SECONDS = 2.0


@dataclass
class RunOptions:
    threads: int = 0  # 0: one per core, at most 8
    device: str = "cpu"
    compute_dtype: str = "fp32"
    memory_limit: int | None = None  # bytes; None: half of the available memory
    resume: bool = False
    force: bool = False
    strict: bool = False
    nonfinite: str = "error"  # or "fallback"
    executor: str = "local"  # or "ray"
    address: str | None = None  # the Ray cluster to join; None starts a local one


@dataclass
class RunResult:
    outputs: list[str]
    keys: int
    skipped: int  # finished by an earlier, interrupted run
    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss_delta: int  # measured growth of resident memory during the run
    nothing_to_do: bool = False
    fallbacks: list[str] = field(default_factory=list)  # keys copied for non-finite inputs


def _tune_allocator() -> None:
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


class _RssSampler:
    """Peak resident memory during the run, above what the process held when it started
    (ru_maxrss is a lifetime maximum, useless for a second run in one process)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.base = self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kmx-rss")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _current_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Evaluator:
    """Evaluates one key's job. Stateless between keys, so any thread may run any key."""

    def __init__(self, compiled: Compiled, reader: Reader, opts: RunOptions):
        self.c = compiled
        self.reader = reader
        self.opts = opts
        self.compute = COMPUTE[opts.compute_dtype]
        self.device = torch.device(opts.device)
        self.headers = compiled.schedule.headers
        self.scratch = Scratch()

    def run(self, job: KeyJob) -> list[tuple[Output, torch.Tensor]]:
        """The job's outputs. They may live in this thread's scratch buffers: write them out
        before this thread runs its next job."""
        values: dict[int, object] = {}
        raw_ok = _raw_loads(job)
        into = output_buffers(job)
        for i, n in enumerate(job.steps):
            values[id(n)] = self.step(n, job.key, values, id(n) in raw_ok, job, into)
            for m in job.free_after[i]:
                values.pop(id(m), None)
        return [(o, values[id(o.node)]) for o in job.outputs]

    def step(self, n: Node, key: str, values: dict, raw: bool, job: KeyJob, into: dict,
             span: tuple[int, int] | None = None):
        """One node's value: of the whole key, or of flat elements [a, b) when `span` is given
        (element-wise steps only: runtime/chunked.py decides which)."""
        if n.op == "union":  # the schedule activated exactly one side for this key
            return values[id(job.union_choice[id(n)])]
        if n.op == "load":
            return self.load(n, key, raw, span)
        if n.op in LINEAR_OPS:
            return self.linear(n, key, values, job, into.get(id(n)), span)
        ins = [values[id(i)] for i in n.inputs]
        if n.op in ("select", "exclude"):
            return ins[0]
        if n.op == "pick":
            return ins[0][n.attr("index")]
        return self.kernel(n, key, ins, span)

    def fresh(self) -> "_Evaluator":
        """An evaluator on the same inputs with buffers of its own: what it computes leaves
        this one's results (and their cast bytes) alone."""
        return _Evaluator(self.c, self.reader, self.opts)

    def copies(self, job: KeyJob) -> set[int]:
        return copied_as_stored(job, _raw_loads(job))

    def read(self, n: Node, key: str, span, into: torch.Tensor | None = None) -> torch.Tensor:
        """Input n's tensor for `key` (flat elements `span` of it); a failure to read points
        at the recipe line that names the input."""
        info = self.headers[n].tensors[key]
        spans = self.c.graph.origins.get(n) or [None]
        with located(spans[0], "this input"):
            return self.reader.read(part(info, span) if span else info, into)

    def load(self, n: Node, key: str, raw: bool = False, span=None):
        """An input tensor: as stored (`raw`, for copies), or on the device in the compute
        dtype, checked finite."""
        t = self.read(n, key, span)
        if raw or not t.is_floating_point():
            return t
        t = t.to(device=self.device, dtype=self.compute)
        self.check_finite(t, n, key)
        return t

    def check_finite(self, t: torch.Tensor, n: Node, key: str) -> None:
        if not finite(t):
            raise NonFinite(n, key)

    def check_streamed(self, job: KeyJob, span=None) -> None:
        """Raise NonFinite for the first deferred input that holds NaN or Inf."""
        for n in job.loads:
            if id(n) in job.deferred:
                self.load_widened(n, job.key, span)

    def load_widened(self, n: Node, key: str, span=None, check: bool = True) -> torch.Tensor:
        """A deferred input, read and widened through this thread's reused buffers (valid
        until its next call): streaming a weighted sum then allocates nothing per input."""
        info = self.headers[n].tensors[key]
        raw = self.read(n, key, span, self.scratch.get("read", (part(info, span) if span else
                                                                info).nbytes))
        if raw.dtype == self.compute or not raw.is_floating_point() or \
                self.device.type != "cpu":
            t = raw.to(device=self.device, dtype=self.compute)
        else:
            wide = self.scratch.get("wide", raw.numel() * self.compute.itemsize)
            t = wide.view(self.compute).view(raw.shape).copy_(raw)
        if check:
            self.check_finite(t, n, key)
        return t

    def linear(self, n: Node, key: str, values: dict, job: KeyJob, scratch: str | None,
               span=None, depth: int = 0):
        """Σ cᵢxᵢ accumulated in input order (as ops.combine does); deferred inputs (loads,
        and combinations used only here) are evaluated here one at a time, and `scratch`
        names the reused buffer of a result that is only written out or summed at once."""
        if n.op == "lincomb":
            coeffs = [c.at(key) if isinstance(c, KeyMap) else c for c in n.attr("coeffs")]
        else:
            ws = list(n.attr("weights"))
            total = math.fsum(ws) if n.op == "mean" else 1.0
            coeffs = [w / total for w in ws]
        coeffs = [self.scalar(c) for c in coeffs]
        acc, streamed = None, []
        for x, c in zip(n.inputs, coeffs):
            if id(x) not in job.deferred:
                t = values[id(x)]
            elif x.op == "load":
                # Checked through the result: a NaN or Inf in any term (whatever its
                # coefficient, as 0·Inf is NaN) makes the sum non-finite.
                t = self.load_widened(x, key, span, check=False)
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
        # A result only written out is tested as it is written (nonfinite.py); any other is
        # tested here, before it is computed with: name the input (or it was an overflow).
        written_only = depth == 0 and scratch is not None
        if streamed and not written_only and not finite(acc):
            for x in streamed:
                self.load_widened(x, key, span)
        return acc

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

    def call_args(self, n: Node, key: str, ins: list, span=None) -> tuple[list, dict]:
        """The positional and keyword arguments of n's kernel, from its input values (a
        random filter on a chunk also gets the chunk's place, for its random stream)."""
        b = _KERNELS[n.op]
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
        if "member" in attrs:
            kwargs.update(key=key, member=attrs.pop("member"))
            if span:
                kwargs["offset"] = span[0]
        return args, kwargs

    def kernel(self, n: Node, key: str, ins: list, span=None):
        args, kwargs = self.call_args(n, key, ins, span)
        return getattr(ops, n.op)(*args, **kwargs)


def output_buffers(job: KeyJob) -> dict[int, str]:
    """A linear combination that is only written out accumulates in a reused buffer."""
    used = {id(i) for n in job.steps for i in n.inputs}
    return {id(o.node): f"out{k}" for k, o in enumerate(job.outputs)
            if o.node.op in LINEAR_OPS and id(o.node) not in used}


def _raw_loads(job: KeyJob) -> set[int]:
    """Loads whose value is only written out (through aliases), never computed with: these
    keep their stored dtype, so a copied key is bit-exact whatever the compute dtype."""
    def used(n: Node):
        return (job.union_choice[id(n)],) if n.op == "union" else n.inputs

    computed = set()
    stack = [n for n in job.steps if n.op not in ALIAS_OPS]
    while stack:  # through deferred combinations too: what they read is computed with
        n = stack.pop()
        for i in used(n):
            computed.add(id(i))
            if id(i) in job.deferred:
                stack.append(i)
    # Follow aliases down to their loads.
    for n in reversed(job.steps):
        if n.op in ALIAS_OPS and id(n) in computed:
            computed.update(id(i) for i in used(n))
    return {id(n) for n in job.steps if n.op == "load" and id(n) not in computed}


class _Interrupted(Exception):
    pass


class RunSession:
    """What an executor needs from a run: compute a key's results, deliver them to the
    writers, and a periodic tick (journal checkpoints). `spec` lets another process rebuild
    the same computation from the recipe (see runtime/ray_exec.py)."""

    def __init__(self, compiled: Compiled, opts: RunOptions, writers, progress, stop,
                 threads: int = 1):
        self.compiled, self.opts, self.writers = compiled, opts, writers
        self.threads = threads
        self.progress, self.stop = progress, stop
        self.evaluator = _Evaluator(compiled, Reader(), opts)
        self.fallbacks: list[str] = []
        self._last_checkpoint = time.monotonic()

    @property
    def spec(self) -> "RunSpec":
        return RunSpec(self.compiled.path, self.compiled.overrides, self.opts,
                       self.compiled.schedule.memory_limit, self.threads)

    def compute(self, job: KeyJob):
        """compute_key for this run: what deliver() takes."""
        return compute_key(self.compiled, self.evaluator, self.opts, job, self.fallbacks)

    def deliver(self, job: KeyJob, results) -> None:
        saves = self.compiled.graph.saves
        if isinstance(results, Streamed):
            # A spill that fails names no save: it points at the key's first.
            with located(saves[job.outputs[0].save].span, "this save"):
                for k, start, data in results:
                    with located(saves[job.outputs[k].save].span, "this save"):
                        self.writers[job.outputs[k].save].write(job.key, data, start)
            return
        for out, data in results:
            with located(saves[out.save].span, "this save"):
                self.writers[out.save].write(job.key, data)

    def finished(self, job: KeyJob) -> None:
        if self.progress:
            self.progress.advance(1, job.read_bytes)

    def tick(self) -> None:
        if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self) -> None:
        for w, save in zip(self.writers, self.compiled.graph.saves):
            with located(save.span, "this save"):
                w.checkpoint()
        self._last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.evaluator.reader.close()


@dataclass(frozen=True)
class RunSpec:
    """Enough to rebuild a run's computation in another process: the recipe is compiled
    again there (compilation is deterministic), so no graph object crosses processes."""
    path: str
    overrides: dict[str, str] | None
    opts: RunOptions
    memory_limit: int  # as the driver planned: the same keys out of core, in the same chunks
    threads: int


def compute_key(compiled: Compiled, ev: "_Evaluator", opts: RunOptions, job: KeyJob,
                fallbacks: list[str]):
    """The job's outputs as [(Output, bytes)] (valid until this thread's next job), or, for
    an out-of-core key, as Streamed pieces computed while they are written. A key with
    non-finite inputs or results is copied from the fallback, or fails, per --nonfinite
    (nonfinite.py)."""
    if job.ooc is not None:
        return Streamed(_pieces(compiled, ev, opts, job, fallbacks))
    try:
        return _whole(compiled, ev, job, fallbacks)
    except NonFinite as nf:
        copy = on_input(compiled, opts, job, nf, fallbacks)
    with fallback_inputs(compiled):
        return _whole(compiled, ev, copy, fallbacks)


def _whole(compiled, ev, job, fallbacks):
    results = ev.run(job)
    copies = ev.copies(job)
    out = []
    # Each output is cast into its own reused buffer: all of them are delivered afterwards.
    for k, (o, value) in enumerate(results):
        try:
            data = checked_bytes(ev, job, k, value, k in copies,
                                 buffer="read" if k == 0 else f"cast{k}")
        except BadResult as bad:
            data = on_result(compiled, ev, job, bad, fallbacks)
        out.append((o, data))
    return out


def _pieces(compiled, ev, opts, job, fallbacks):
    # Filtered members spill next to the output (the disk meant for big files); on a machine
    # that lacks that folder (a Ray worker), into the system's temporary folder.
    spill_root = os.path.dirname(os.path.abspath(compiled.graph.saves[0].path))
    if not os.path.isdir(spill_root):
        spill_root = tempfile.gettempdir()
    copies, replaced = ev.copies(job), set()
    try:
        for k, a, value in run_chunked(ev, job, _raw_loads(job), output_buffers(job),
                                       spill_root):
            if k in replaced:
                continue
            try:
                data = checked_bytes(ev, job, k, value, k in copies, (a, a + value.numel()),
                                     "read" if k == 0 else f"cast{k}")
            except BadResult as bad:  # the fallback's whole key replaces what was written
                replaced.add(k)
                yield k, 0, on_result(compiled, ev, job, bad, fallbacks)
                continue
            yield k, a * (data.nbytes // value.numel()), data
    except NonFinite as nf:
        copy = on_input(compiled, opts, job, nf, fallbacks)
    else:
        return
    # Pieces already written are overwritten by the fallback's whole key.
    with fallback_inputs(compiled):
        results = _whole(compiled, ev, copy, fallbacks)
    for k, (_, data) in enumerate(results):
        yield k, 0, data


class LocalExecutor:
    """Keys on a thread pool in this process. Admission keeps the estimated memory of the
    keys in flight under `limit` (a key larger than the limit runs alone)."""

    name = "local"

    def __init__(self, threads: int, limit: int):
        self.threads, self.limit = threads, limit

    def run(self, jobs: list[KeyJob], session: RunSession) -> None:
        stop = session.stop

        def work(job: KeyJob):
            if not stop.is_set():
                session.deliver(job, session.compute(job))
            return job

        in_flight: dict[Future, int] = {}
        budget = 0
        pending = list(reversed(jobs))  # pop() from the end keeps key order
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kmx") as pool:
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < self.threads and (
                            not in_flight or budget + pending[-1].est_bytes <= self.limit):
                        job = pending.pop()
                        in_flight[pool.submit(work, job)] = job.est_bytes
                        budget += job.est_bytes
                    finished, _ = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in finished:
                        budget -= in_flight.pop(f)
                        session.finished(f.result())
                    session.tick()
            except BaseException:
                stop.set()
                for f in in_flight:
                    f.cancel()
                wait(in_flight)
                raise

    def close(self) -> None:
        pass


def make_executor(opts: RunOptions, threads: int, limit: int):
    if opts.executor == "ray":
        from .ray_exec import RayExecutor

        return RayExecutor(opts.address, limit)
    return LocalExecutor(threads, limit)


def execute(compiled: Compiled, opts: RunOptions, progress=None) -> RunResult:
    """Run a compiled recipe. Raises KmxError; never leaves a partial file under a final name."""
    if opts.threads < 0:
        raise ValueError(f"threads must be 0 (one per core) or more, not {opts.threads}")
    if opts.executor == "ray":
        from .ray_exec import check_address

        check_address(opts.address)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise KmxError([error("K0406", "--device cuda: no CUDA device is available",
                              help="run with --device cpu")])
    threads = opts.threads or default_threads()
    limit = opts.memory_limit or compiled.schedule.memory_limit
    if limit != compiled.schedule.memory_limit:  # compiled for another limit: plan again
        plan_out_of_core(compiled.graph, compiled.schedule.jobs, limit,
                         COMPUTE_ITEMSIZE[opts.compute_dtype], compiled.schedule.headers)
        compiled.schedule.memory_limit = limit
    torch.set_num_threads(1)
    _tune_allocator()
    start = time.monotonic()
    outputs = OutputSet(compiled, opts)
    if outputs.complete():
        return RunResult(outputs.final_paths(), 0, 0, 0.0, 0, 0, 0, nothing_to_do=True)
    executor = make_executor(opts, threads, limit)
    try:
        return _run(compiled, opts, executor, outputs, threads, progress, start)
    finally:
        executor.close()


def _run(compiled, opts, executor, outputs, threads, progress, start) -> RunResult:
    writers = outputs.open()
    done = outputs.done_keys(writers)
    jobs = [j for j in compiled.schedule.jobs if j.key not in done]
    if progress:
        progress.start(len(compiled.schedule.jobs), len(done),
                       sum(j.read_bytes for j in compiled.schedule.jobs),
                       sum(j.read_bytes for j in compiled.schedule.jobs if j.key in done))
    session = RunSession(compiled, opts, writers, progress, threading.Event(), threads)
    old_term = _on_sigterm()
    try:
        with _RssSampler() as rss:
            try:
                executor.run(jobs, session)
            except BaseException:
                _checkpoint_quietly(session)
                raise
        outputs.commit(writers)
    except (KeyboardInterrupt, _Interrupted):
        session.stop.set()
        outputs.keep_partial(writers)
        raise KmxError([error("K0403", "run interrupted; finished keys are saved",
                              help="run the same command with --resume to continue")])
    except BaseException:
        session.stop.set()
        outputs.keep_partial(writers)
        raise
    finally:
        session.close()
        _restore_sigterm(old_term)
        if progress:
            progress.finish()
    return RunResult(outputs.final_paths(), len(compiled.schedule.jobs), len(done),
                     time.monotonic() - start, sum(j.read_bytes for j in jobs),
                     sum(compiled.schedule.bytes_written), rss.growth,
                     fallbacks=session.fallbacks)


def _checkpoint_quietly(session: RunSession) -> None:
    """Keys already written stay usable by --resume, whatever stopped the run."""
    try:
        session.checkpoint()
    except (KmxError, RuntimeError, OSError):
        pass


def _on_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Interrupted()

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)



