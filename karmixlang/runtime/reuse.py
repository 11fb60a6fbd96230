"""Re-merging only what changed: when a run replaces an output an earlier kmx run wrote, the
keys whose fingerprint (plan/fingerprint.py, inputs identified by content hash) is the one
recorded in that output's metadata are copied from its bytes instead of being computed.

The earlier output is only read: the new file is written beside it and replaces it at the end
as any output does, so a run that fails leaves it as it was. Copying happens in the driver
process, before the other keys are computed by whichever executor runs them (local threads or
Ray), so both reuse alike. A key counts as reusable only when every output that holds it can
reuse it (a job computes all of a key's outputs together), and when its recorded dtype and
shape are the new ones. A key that cannot be read back is computed instead.
"""

from __future__ import annotations

import os

from karmixlang.diagnostics import KmxError
from karmixlang.io.header import TensorInfo, read_checkpoint
from karmixlang.io.writer import CheckpointWriter
from karmixlang.plan.executable import KeyJob
from karmixlang.plan.fingerprint import NO_FINGERPRINT
from karmixlang.runtime.chunked import Streamed
from karmixlang.runtime.outputs import OutputSet, recorded_fingerprints

PIECE_BYTES = 16 << 20  # a reused key is copied in pieces of at most this size


class Reuse:
    """The keys of this run that the outputs it replaces already hold, and where."""

    def __init__(self, outputs: OutputSet, writers: list):
        self.sources: list[dict[str, TensorInfo]] = [{} for _ in writers]
        self._fds: dict[str, int] = {}
        earlier = [self._earlier(outputs, i, w) for i, w in enumerate(writers)]
        if not any(earlier):
            return
        fingerprints = outputs.fingerprints()  # waits for the input hashes
        jobs = {j.key: j for j in outputs.c.schedule.jobs}
        for i, header in enumerate(earlier):
            if header is None:
                continue
            old = recorded_fingerprints(header)
            for key, fp in fingerprints[i].items():
                out = next(o for o in jobs[key].outputs if o.save == i)
                t = header.tensors.get(key)
                if fp != NO_FINGERPRINT and old.get(key) == fp and t is not None and \
                        t.dtype == out.dtype and tuple(t.shape) == tuple(out.shape):
                    self.sources[i][key] = t

    @staticmethod
    def _earlier(outputs: OutputSet, index: int, writer):
        """The header of the output this run replaces, if kmx wrote it with fingerprints."""
        layout = outputs.layouts[index]
        if not isinstance(writer, CheckpointWriter):  # kept as it is (--resume)
            return None
        for path in (layout.final_path, layout.index_path):
            if path and os.path.isfile(path):
                try:
                    header = read_checkpoint(path)
                except KmxError:  # not a checkpoint kmx can read: nothing to reuse
                    return None
                return header if recorded_fingerprints(header) else None
        return None

    def covers(self, job: KeyJob) -> bool:
        return all(job.key in self.sources[o.save] for o in job.outputs)

    def copy(self, job: KeyJob):
        """The job's outputs as Streamed pieces read from the earlier outputs (raises OSError
        when one cannot be read)."""
        return Streamed(self._pieces(job))

    def _pieces(self, job: KeyJob):
        for k, o in enumerate(job.outputs):
            t = self.sources[o.save][job.key]
            fd = self._fd(t.file)
            for start in range(0, max(t.nbytes, 1), PIECE_BYTES):
                n = min(PIECE_BYTES, t.nbytes - start)
                data = os.pread(fd, n, t.begin + start)
                if len(data) != n:
                    raise OSError(f"`{t.file}` ends before key `{job.key}`")
                yield k, start, memoryview(data)

    def _fd(self, path: str) -> int:
        # Opened once: a file renamed over it meanwhile is not read.
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
