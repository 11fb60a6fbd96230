"""`kmx run`: execute a compiled plan key by key.

Each key is one job of the compiled executable schedule (plan/executable.py), evaluated by
runtime/evaluate.py, and its results are written at their planned offsets. Nothing is planned
here: the out-of-core keys and the fallback copies were decided when compiling. Jobs run on a
thread pool; admission keeps the estimated memory of the keys in flight under the limit.
Results never depend on scheduling: every key is computed alone, and intra-op threads are
fixed at one so reductions always add in the same order.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from karmixlang.diagnostics import KmxError, error, located
from karmixlang.io.hashes import FileHashes, file_hashes
from karmixlang.machine import default_threads
from karmixlang.plan.compile import Compiled
from karmixlang.plan.executable import Executable, KeyJob
from karmixlang.plan.schedule import HEAP_RELEASE_ABOVE
from karmixlang.runtime.allocator import release_free_memory
from karmixlang.runtime.chunked import Streamed
from karmixlang.runtime.evaluate import Evaluator, compute_key, prepare_process
from karmixlang.runtime.readahead import Readahead
from karmixlang.runtime.outputs import OutputSet
from karmixlang.runtime.rebasin import solve_all
from karmixlang.runtime.reuse import Reuse
from karmixlang.runtime.tensors import Reader

CHECKPOINT_SECONDS = 2.0


@dataclass
class RunOptions:
    threads: int = 0  # 0: one per core, at most 8
    device: str = "cpu"
    # Options that shape the plan: compile with them. None: as compiled; another value than
    # the compiled one is refused (execute() never plans).
    compute_dtype: str | None = None
    memory_limit: int | None = None  # bytes
    resume: bool = False
    force: bool = False
    nonfinite: str = "error"  # or "fallback"
    executor: str = "local"  # or "ray"
    address: str | None = None  # the Ray cluster to join; None starts a local one
    # Copy the keys whose fingerprint is unchanged from the output being replaced (reuse.py)
    reuse: bool = True
    # modelspec.date of the outputs: None from SOURCE_DATE_EPOCH (none if unset), "" none
    date: str | None = None
    # False: no local path in the outputs' metadata (io/provenance.py, --no-provenance)
    provenance: bool = True


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
    # keys copied from a fallback for non-finite values (--nonfinite=fallback)
    fallbacks: list[str] = field(default_factory=list)
    reused: int = 0  # keys copied from the output this run replaced (unchanged fingerprint)
    # each written data file's hashes (SHA-256, AutoV2, AutoV3), hashed once published
    hashes: dict[str, FileHashes] = field(default_factory=dict)
    # each input file's hashes, as the background hasher computed them during the run
    input_hashes: dict[str, FileHashes] = field(default_factory=dict)


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


class _Interrupted(Exception):
    pass


class RunSession:
    """What an executor needs from a run: the executable schedule, compute a key's results,
    deliver them to the writers, and a periodic tick (journal checkpoints)."""

    def __init__(self, executable: Executable, opts: RunOptions, writers, progress, stop):
        self.executable, self.opts, self.writers = executable, opts, writers
        self.progress, self.stop = progress, stop
        self.evaluator = Evaluator(executable, Reader(), opts.device)
        self.fallbacks: list[str] = []
        self._last_checkpoint = time.monotonic()

    def compute(self, job: KeyJob):
        """compute_key for this run: what deliver() takes."""
        return compute_key(self.evaluator, job, self.opts.nonfinite, self.fallbacks)

    def deliver(self, job: KeyJob, results) -> None:
        if isinstance(results, Streamed):
            # A spill that fails names no save: it points at the key's first.
            with self.at(job.outputs[0].save):
                for k, start, data in results:
                    with self.at(job.outputs[k].save):
                        out = job.outputs[k]
                        self.writers[out.save].write(out.written_as(job.key), data, start)
            return
        for out, data in results:
            with self.at(out.save):
                self.writers[out.save].write(out.written_as(job.key), data)

    def at(self, save: int):
        """Errors about output `save` point at its recipe line."""
        return located(self.executable.saves[save].span, "this save")

    def finished(self, job: KeyJob) -> None:
        if self.progress:
            self.progress.advance(1, job.read_bytes)

    def tick(self) -> None:
        if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self) -> None:
        for i, w in enumerate(self.writers):
            with self.at(i):
                w.checkpoint()
        self._last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.evaluator.reader.close()


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
                if job.est_bytes > HEAP_RELEASE_ABOVE:
                    release_free_memory()
            return job

        in_flight: dict[Future, int] = {}
        budget = 0
        pending = list(reversed(jobs))  # pop() from the end keeps key order
        ahead = Readahead(jobs)
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kmx") as pool:
            try:
                while pending or in_flight:
                    while pending and len(in_flight) < self.threads and (
                            not in_flight or budget + pending[-1].est_bytes <= self.limit):
                        job = pending.pop()
                        in_flight[pool.submit(work, job)] = job.est_bytes
                        budget += job.est_bytes
                        ahead.start(len(jobs) - len(pending) - 1)
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
        from karmixlang.runtime.ray.executor import RayExecutor

        return RayExecutor(opts.address, limit)
    return LocalExecutor(threads, limit)


def execute(compiled: Compiled, opts: RunOptions, progress=None) -> RunResult:
    """Run a compiled recipe as it was planned; changes nothing in `compiled`. Raises
    KmxError; never leaves a partial file under a final name."""
    exe = compiled.schedule.executable
    check_options(exe, opts)
    if opts.threads < 0:
        raise ValueError(f"threads must be 0 (one per core) or more, not {opts.threads}")
    if opts.executor == "ray":
        from karmixlang.runtime.ray.executor import check_address

        check_address(opts.address)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise KmxError([error("K0406", "--device cuda: no CUDA device is available",
                              help="run with --device cpu")])
    threads = opts.threads or default_threads()
    prepare_process()
    start = time.monotonic()
    outputs = OutputSet(compiled, opts)
    if outputs.complete():
        return RunResult(outputs.final_paths(), 0, 0, 0.0, 0, 0, 0, nothing_to_do=True)
    executor = make_executor(opts, threads, exe.memory_limit)
    try:
        return _run(compiled, opts, executor, outputs, progress, start)
    finally:
        executor.close()


def check_options(exe: Executable, opts: RunOptions) -> None:
    """A run option that would change the plan must be the one it was compiled with."""
    for name, planned, given in (("memory_limit", exe.memory_limit, opts.memory_limit),
                                  ("compute_dtype", exe.compute, opts.compute_dtype)):
        if given is not None and given != planned:
            raise ValueError(f"RunOptions.{name}={given!r} but the recipe was compiled with "
                             f"{name}={planned!r}: pass it to compile() (or leave it None)")


def _run(compiled, opts, executor, outputs, progress, start) -> RunResult:
    # Phase one of re-basin: the permutations, before any output is opened (a failure here
    # leaves nothing behind).
    exe = solve_all(compiled.schedule.executable, Reader())
    writers = outputs.open()
    done = outputs.done_keys(writers)
    jobs = in_data_order([j for j in compiled.schedule.jobs if j.key not in done],
                         outputs.layouts)
    try:
        reuse = Reuse(outputs, writers) if opts.reuse else None
    except BaseException:
        outputs.keep_partial(writers)
        raise
    if progress:
        progress.start(len(compiled.schedule.jobs), len(done),
                       sum(j.read_bytes for j in compiled.schedule.jobs),
                       sum(j.read_bytes for j in compiled.schedule.jobs if j.key in done))
    session = RunSession(exe, opts, writers, progress, threading.Event())
    old_term = _on_sigterm()
    try:
        with _RssSampler() as rss:
            try:
                reused = _copy_reused(jobs, reuse, session) if reuse else set()
                executor.run([j for j in jobs if j.key not in reused], session)
            except BaseException:
                _checkpoint_quietly(session)
                raise
        outputs.replaced = _replaced(session.fallbacks, {j.key for j in jobs})
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
        if reuse:
            reuse.close()
        _restore_sigterm(old_term)
        if progress:
            progress.finish()
    return RunResult(outputs.final_paths(), len(compiled.schedule.jobs), len(done),
                     time.monotonic() - start,
                     sum(j.read_bytes for j in jobs if j.key not in reused),
                     sum(compiled.schedule.bytes_written), rss.growth,
                     fallbacks=session.fallbacks, reused=len(reused),
                     hashes=file_hashes(outputs.written_files(),
                                        data_sha256=outputs.data_sha256,
                                        sha256=outputs.file_sha256),
                     input_hashes=dict(sorted(outputs.hashes.items())))


def in_data_order(jobs: list[KeyJob], layouts) -> list[KeyJob]:
    """`jobs` in the order their results lie in the output files (save, file, offset). Each
    file's data hash advances over the contiguous prefix of written keys (io/running_hash.py):
    keys finished in that order are hashed from the writer's own buffer while the next ones
    compute. The schedule lists keys by name, and safetensors lays a file out widest dtype
    first, so the few int64 or fp32 keys of an fp16 output would hold the prefix back to the
    last key and every other key would be read back then. Only the order changes: each key's
    bytes do not depend on it, nor does the memory admitted at once."""
    def position(job: KeyJob) -> tuple[int, int, int]:
        slots = ((o.save, layouts[o.save].slots[o.written_as(job.key)]) for o in job.outputs)
        return min(((save, s.file, s.offset) for save, s in slots), default=(0, 0, 0))

    return sorted(jobs, key=position)


def _copy_reused(jobs: list[KeyJob], reuse: Reuse, session: RunSession) -> set[str]:
    """Copy every key the replaced outputs already hold, in this process (whatever the
    executor); the keys copied. A key that cannot be read back is left to be computed (its
    pieces already written are overwritten whole)."""
    copied = set()
    for job in jobs:
        if not reuse.covers(job):
            continue
        try:
            session.deliver(job, reuse.copy(job))
        except OSError:
            continue
        copied.add(job.key)
        session.finished(job)
        session.tick()
    return copied


def _replaced(fallbacks: list[str], keys: set[str]) -> set[str]:
    """The keys --nonfinite=fallback copied from a fallback (each entry is the key, or the
    key followed by `` (`SAVE`: why)``): their bytes are not what the recipe computes."""
    return {k for e in fallbacks for k in (e, e.split(" (`", 1)[0]) if k in keys}


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



