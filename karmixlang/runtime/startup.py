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

import threading

from karmixlang.runtime.readahead import Readahead

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
    order), until `limit` bytes; the bytes taken (runtime/readahead.py)."""
    return Readahead(jobs, limit).start(-1)
