"""What `kmx run` does while torch loads (torch-free itself: check, fmt and plan import
nothing of this).

Importing torch takes a second or two of CPU. `kmx run` starts it on a thread before it
compiles the recipe, and, once compiled, asks the kernel to read ahead the byte ranges of the
first keys, so that from a cold page cache the first reads are under way while torch is still
loading. The thread imports `torch` only, never a karmixlang module: the main thread imports
the runtime, which then finds torch loaded (or waits on its module lock until it is), so no
two threads ever import the same karmixlang module.

The import holds the GIL most of the time (module code, dlopen), so on a warm cache the
overlap saves little: docs/benchmarks.md, "Start-up", has what is left.
"""

from __future__ import annotations

import os
import threading

# Read ahead this many bytes of the first keys: what the first keys in flight read, without
# pushing a large part of a cold cache through memory before torch needs it.
PREFETCH_BYTES = 256 << 20


def load_torch_in_background() -> threading.Thread:
    """Start importing torch on a daemon thread (a failure there is left for the main
    thread's own import to report)."""
    thread = threading.Thread(target=_import_torch, daemon=True, name="kmx-torch")
    thread.start()
    return thread


def _import_torch() -> None:
    try:
        import torch  # noqa: F401
    except BaseException:  # the main thread's import raises it again, where it is handled
        pass


def prefetch(jobs, limit: int = PREFETCH_BYTES) -> int:
    """Advise the kernel to read ahead the stored byte ranges of the first `jobs` (in run
    order), until `limit` bytes; the bytes advised. Changes no file and reads nothing itself:
    a file that cannot be opened, or a system without posix_fadvise, is left alone."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    total = 0
    for job in jobs:
        for info in job.tensors.values():
            for seg in info.segments:
                ranges.setdefault(seg.file, []).append((seg.begin, seg.end - seg.begin))
                total += seg.end - seg.begin
        if total >= limit:
            break
    if not hasattr(os, "posix_fadvise"):
        return 0
    for path, spans in ranges.items():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for begin, length in spans:
                os.posix_fadvise(fd, begin, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    return total
