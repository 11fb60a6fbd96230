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


def _exit_at_once(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


def main() -> int:
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
