"""`kmx run --executor ray`: groups of keys (groups.py) computed by Ray workers; the driver
writes every byte (docs/ray.md).

Each task receives its group's part of the executable schedule, serialized
(plan/executable.py: the node table, the group's jobs with where each input tensor lies, a
format version and a fingerprint), and the run's device and --nonfinite policy. The worker
checks the format and fingerprint, and that it sees every data file at the planned size,
then evaluates the jobs as the local executor does: it never sees the recipe. It reads the
inputs by path, so every worker must see them at the same paths (a shared filesystem), and
returns each key's output bytes. The driver delivers them to the same writers as the local
executor (at planned offsets, in any order), so the file is the same, atomic and resumable.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

from karmixlang.diagnostics import KmxError, error
from karmixlang.plan.executable import Executable, FormatError
from karmixlang.plan.groups import KeyGroup, group_keys
from karmixlang.runtime.chunked import Streamed

INSTALL_HELP = "pip install 'karmixlang[ray]'"
SHARED_HELP = ("every Ray worker must see the inputs at the same paths as the driver (a "
               "shared filesystem) and run the same kmx version (docs/ray.md)")
RESUME_HELP = "the keys already written are kept: run the same command with --resume"
CONNECT_SECONDS = 10.0  # ray.init retries an unreachable address for minutes: probe it first
WAIT_SECONDS = 0.5  # how often the driver loop checkpoints and notices a stop
TASK_RETRIES = 3  # Ray reruns a group whose worker died; a group's result never changes


class RayExecutor:
    """Groups of keys as Ray tasks. Admission keeps the memory of the groups in flight (each
    one's largest key on its worker plus its results on the driver) under `limit`; a group
    larger than the limit runs alone."""

    name = "ray"

    def __init__(self, address: str | None, limit: int):
        # Ray is imported and joined here, before the run opens its outputs: a missing package
        # or a wrong address leaves no partial file behind.
        self.ray = _import_ray()
        self.limit = limit
        self.started = _connect(self.ray, address)

    def run(self, jobs, session) -> None:
        _Dispatch(self.ray, jobs, session, self.limit).run()

    def close(self) -> None:
        if self.started:  # never shut down a Ray the caller had started
            self.ray.shutdown()
            self.started = False


ADDRESS_HELP = ("give host:port of the head node, ray://host:port for Ray Client, or auto; "
                "leave --address out to start a local Ray")


def check_address(address: str | None) -> None:
    """Refuse an --address Ray could never join, before anything starts (K0407)."""
    if address is None or address in ("auto", "local"):
        return
    try:  # urlsplit refuses some malformed hosts ("[::1") itself
        parts = urlsplit(address if "://" in address else f"ray://{address}")
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme != "ray" or not parts.hostname or not port or parts.username
            or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise KmxError([error("K0407", f"--address `{address}` is not a Ray address",
                              help=ADDRESS_HELP)])


def _import_ray():
    try:
        import ray
    except ImportError:
        raise KmxError([error("K0407", "--executor ray needs the `ray` package, which is not "
                              "installed", help=INSTALL_HELP)]) from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; False when this process already
    had one (then it is used as it is)."""
    if ray.is_initialized():
        return False
    if address:
        _probe(address)
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)  # keep stderr for kmx
    try:
        with _own_sigterm():
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at `{address}`" if address else "a local Ray instance"
        raise KmxError([error("K0407", f"cannot start or join {where}: {_first_line(exc)}",
                              help="check --address (host:port of the head node, "
                                   "ray://host:port for Ray Client, or auto)")]) from None
    return True


@contextmanager
def _own_sigterm():
    """ray.init installs a SIGTERM handler of its own and never removes it: keep the one the
    process had (execute() sets kmx's for the run, and the caller's stays theirs after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def _probe(address: str) -> None:
    """A TCP connection to host:port, so an unreachable head node fails in seconds."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        return  # `auto`, `local`: Ray itself says at once whether it finds a cluster
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise KmxError([error("K0407", f"cannot reach the Ray cluster at `{address}`: "
                              f"{exc.strerror or exc}",
                              help="start the head node (`ray start --head`) or check "
                                   "--address")]) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Dispatch:
    """The driver loop of one run: submit groups while they fit, deliver results as they come."""

    def __init__(self, ray, jobs, session, limit: int):
        self.ray, self.session, self.limit = ray, session, limit
        self.jobs = {j.key: j for j in jobs}
        self.pending = list(reversed(group_keys(jobs)))  # pop() from the end keeps key order
        self.in_flight: dict = {}  # ObjectRef -> KeyGroup
        self.budget = 0
        # Two groups per CPU: each worker has its next group queued when it finishes one.
        self.slots = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.task = ray.remote(compute_group).options(
            num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")

    def run(self) -> None:
        stop = self.session.stop
        try:
            while (self.pending or self.in_flight) and not stop.is_set():
                self.submit()
                ready, _ = self.ray.wait(list(self.in_flight), num_returns=1,
                                         timeout=WAIT_SECONDS)
                for ref in ready:
                    self.collect(ref)
                self.session.tick()
        except SystemError as exc:
            # Ray's C code runs signal handlers itself and turns what one raises (kmx's
            # SIGTERM handler: the run is interrupted) into a SystemError caused by it.
            if exc.__cause__ is None:
                raise
            raise exc.__cause__ from None
        finally:
            self.cancel()

    def submit(self) -> None:
        while self.pending and len(self.in_flight) < self.slots and (
                not self.in_flight or self.budget + _cost(self.pending[-1]) <= self.limit):
            group = self.pending.pop()
            part = self.session.executable.part([self.jobs[k] for k in group.keys])
            opts = self.session.opts
            self.in_flight[self.task.remote(part.dumps(), opts.device, opts.nonfinite)] = group
            self.budget += _cost(group)

    def collect(self, ref) -> None:
        self.budget -= _cost(self.in_flight.pop(ref))
        results, fallbacks = self.fetch(ref)
        for key, pieces in results:
            job = self.jobs[key]
            self.session.deliver(job, Streamed(iter(pieces)))
            self.session.finished(job)
        self.session.fallbacks.extend(fallbacks)

    def fetch(self, ref):
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            if isinstance(exc.cause, KmxError):  # K0401, K0407, an unreadable input...
                raise KmxError(exc.cause.diagnostics) from None
            raise  # a bug in kmx, as the local executor would raise it
        except exceptions.RayError as exc:  # a worker or node lost beyond Ray's retries
            raise KmxError([error("K0407", f"a Ray task failed: {_first_line(exc)}",
                                  help=RESUME_HELP)]) from None

    def cancel(self) -> None:
        """Stop what is still queued or running (a stop, an error, Ctrl-C): nothing in flight
        is delivered, so nothing half-done reaches the outputs."""
        for ref in self.in_flight:
            self.ray.cancel(ref)
        self.in_flight.clear()


def _cost(group: KeyGroup) -> int:
    return group.peak_bytes + group.result_bytes


# ------------------------------------------------------------------ in the worker

def compute_group(schedule: str, device: str, nonfinite: str):
    """A Ray task: the jobs of a serialized executable schedule (one group's part), each
    key's outputs as pieces (see _pieces), and the keys copied from a fallback for
    non-finite values (`nonfinite` "fallback"). The --nonfinite policy is the local one
    (compute_key): a bad result is K0411/K0412, at the save the schedule names."""
    from karmixlang.runtime.evaluate import Evaluator, compute_key, prepare_process
    from karmixlang.runtime.tensors import Reader

    try:
        exe = Executable.loads(schedule)
    except FormatError as exc:
        raise KmxError([_elsewhere(f"cannot run the schedule it received: {exc}")]) from None
    _check_files(exe.files)
    prepare_process()
    # A fresh reader per group: an input replaced between two runs is read anew.
    ev = Evaluator(exe, Reader(), device)
    fallbacks: list[str] = []
    try:
        out = [(job.key, _pieces(compute_key(ev, job, nonfinite, fallbacks)))
               for job in exe.jobs]
    finally:
        ev.reader.close()
    return out, fallbacks


def _check_files(files: dict[str, int]) -> None:
    """Every data file the jobs read, where the driver saw it and at its size: a worker that
    sees another file there (or none) must not read tensors at the planned offsets."""
    for path, size in files.items():
        try:
            found = os.stat(path).st_size
        except OSError as exc:
            raise KmxError([_elsewhere(f"cannot see `{path}`: {exc.strerror}")]) from None
        if found != size:
            raise KmxError([_elsewhere(f"sees `{path}` with {found:,} bytes, where the driver "
                                       f"planned with {size:,}")])


def _pieces(results) -> list[tuple[int, int, bytes]]:
    """(output index, byte offset in the key, bytes): one piece per output of a key computed
    whole, the chunks of an out-of-core key, in writing order either way. Copied:
    compute_key's views are reused buffers."""
    if isinstance(results, Streamed):
        return [(k, start, bytes(data)) for k, start, data in results]
    return [(k, 0, bytes(data)) for k, (_, data) in enumerate(results)]


def _elsewhere(what: str):
    return error("K0407", f"the Ray worker on {socket.gethostname()} {what}", help=SHARED_HELP)
