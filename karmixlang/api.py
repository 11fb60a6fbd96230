"""The Python API: the same pipeline the CLI runs, without printing.

    check(path)            -> diagnostics
    compile(path)          -> Compiled (graph, schedule, plan), reading headers only
    run(path, ...)         -> RunResult (imports torch)
    format(text)           -> canonical text
"""

from __future__ import annotations

from karmixlang.check.checker import check_program
from karmixlang.diagnostics import Diagnostic, KmxError
from karmixlang.plan.compile import Compiled, compile

__all__ = ["Compiled", "check", "compile", "format", "run"]


def check(path: str, overrides: dict[str, str] | None = None) -> list[Diagnostic]:
    return check_program(path, overrides)[1]


def run(path: str, overrides: dict[str, str] | None = None, **options):
    """Compile and run a recipe; `options` are those of runtime.executor.RunOptions
    (threads, device, compute_dtype, memory_limit, resume, force, strict, nonfinite,
    executor, address). The options that shape the plan are compiled in."""
    from karmixlang.machine import default_threads
    from karmixlang.runtime.executor import RunOptions, execute

    opts = RunOptions(**options)
    compiled = compile(path, overrides, threads=opts.threads or default_threads(),
                       compute_dtype=opts.compute_dtype or "fp32", strict=opts.strict,
                       memory_limit=opts.memory_limit, executor=opts.executor)
    return execute(compiled, opts)


def format(text: str, file: str = "<recipe>") -> str:
    """The canonical layout of recipe text. Raises KmxError on a syntax error."""
    from karmixlang.syntax.fmt import format_source

    out, diags = format_source(text, file)
    if out is None:
        raise KmxError(diags)
    return out
