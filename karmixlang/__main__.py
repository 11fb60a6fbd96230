"""`python -m karmixlang` and the `kmx` program (pyproject's entry point).

Ctrl-C must never print a traceback, not even while the program is still importing: until
the command starts, and once it is done, SIGINT exits at once with code 130 and one line;
while it runs, SIGINT raises KeyboardInterrupt, which cli.main turns into exit 130 (or a run
into K0403, keeping its finished keys). Python's own start-up, before this module's first
line, is the interpreter's to handle.
"""

import os
import sys

import _signal  # not `signal`: importing that Python module takes milliseconds of enum set-up


# glibc keeps up to 7 freed small blocks per size in a per-thread cache (tcache). Those
# blocks sit inside the memory that a key's (or a chunk's) large temporaries were freed
# from, so the next temporaries of the same sizes no longer fit there and land at new
# addresses: a thread's heap walks up to several times what it holds at once (a geometric
# median over an LLM grew by 262 MiB for a plan of 160 MiB; 108 MiB without the cache:
# docs/benchmarks.md). Blocks over glibc's largest mmap threshold (32 MB: DELLA's sort
# buffers, whole large keys) are fresh mappings every time, zero-filled by the kernel page
# by page: with transparent huge pages asked for (where the system leaves them to
# madvise), 2 MB at a time (SD1.5 DELLA-TIES: 25 M page faults -> 2 M, 65 -> 44 s of system
# time). glibc reads both settings only when a process starts, so `kmx run` starts itself
# once more with them; a setting the user gave is kept.
ALLOCATOR_TUNABLES = {"glibc.malloc.tcache_count": "0", "glibc.malloc.hugetlb": "1"}


def allocator_env(environ) -> dict | None:
    """The environment `kmx run` restarts itself with, or None when it needs no restart
    (not glibc, or every tunable already set)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    missing = [f"{name}={value}" for name, value in ALLOCATOR_TUNABLES.items()
               if name not in tunables]
    if not missing or not _glibc():
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(([tunables] if tunables else []) + missing)}


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _restart_for_run() -> None:
    # Only a process started as `kmx run ...` (not a program that calls main() itself).
    if sys.argv[1:2] != ["run"] or sys.orig_argv[len(sys.orig_argv) - len(sys.argv) + 1:] != \
            sys.argv[1:]:
        return
    env = allocator_env(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, sys.orig_argv, env)
        except OSError:
            pass  # run with the cache: more memory, same results


def _exit_at_once(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


def main() -> int:
    _restart_for_run()
    ours = _signal.getsignal(_signal.SIGINT) != _signal.SIG_IGN  # ignored: leave it so
    if ours:
        _signal.signal(_signal.SIGINT, _exit_at_once)
    from karmixlang.cli import interrupted, main as command

    try:
        if ours:
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        code = command()
    except KeyboardInterrupt:
        code = interrupted()
    finally:
        if ours:
            _signal.signal(_signal.SIGINT, _exit_at_once)
    # Python 3.11 exits by SIGINT, not 130, once a KeyboardInterrupt crossed an exec() of
    # source text (dataclasses do that while a module is imported). After a command that
    # loaded torch, tearing the interpreter down costs ~0.5 CPU s (torch's modules and
    # allocators) and nothing needs it: every output is committed and closed by then. Ray
    # shuts its local cluster down at exit, so a run that used it exits normally.
    if code == 130 or ("torch" in sys.modules and "ray" not in sys.modules):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
