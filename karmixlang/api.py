"""The Python API: the same pipeline the CLI runs, without printing.

    check(path)            -> diagnostics
    compile(path)          -> Compiled (graph, schedule, plan), reading headers only
    run(path, ...)         -> RunResult (imports torch)
    format(text)           -> canonical text
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from karmixlang.check.checker import check_program
from karmixlang.check.program import Program
from karmixlang.diagnostics import Diagnostic, KmxError, error
from karmixlang.ir.graph import Graph
from karmixlang.ir.lower import lower
from karmixlang.ir.optimize import base_choice_warnings, optimize
from karmixlang.plan.report import Plan, build_plan
from karmixlang.plan.schedule import Schedule, schedule


@dataclass
class Compiled:
    program: Program
    graph: Graph
    schedule: Schedule
    plan: Plan
    warnings: list[Diagnostic]
    path: str = ""  # the recipe and --set values, to compile it again elsewhere (Ray workers)
    overrides: dict[str, str] | None = None


def check(path: str, overrides: dict[str, str] | None = None) -> list[Diagnostic]:
    return check_program(path, overrides)[1]


def compile(path: str, overrides: dict[str, str] | None = None, *, threads: int = 1,
            compute_dtype: str = "fp32", strict: bool = False, memory_limit: int | None = None,
            executor: str = "local") -> Compiled:
    """Check, lower, optimize and schedule a recipe. Raises KmxError with diagnostics.
    `memory_limit` (bytes; None: half of the available memory) decides which keys run out
    of core; `executor` ("local" or "ray") how the plan groups keys."""
    program, diags = check_program(path, overrides)
    if program is None:
        raise KmxError(diags)
    graph = optimize(lower(program))
    sched = schedule(graph, compute_dtype, strict, memory_limit=memory_limit)
    _guard_outputs(graph, sched)
    plan = build_plan(path, graph, sched, threads, compute_dtype, executor=executor)
    return Compiled(program, graph, sched, plan, diags + base_choice_warnings(graph),
                    os.path.abspath(path), overrides)


def _guard_outputs(graph: Graph, sched: Schedule) -> None:
    """Refuse an output that is one of the inputs: by path, through a symlink, or a hard link."""
    inputs = {}
    for h in sched.headers.values():
        for f in h.files + (h.path,):
            inputs[os.path.realpath(f)] = f
            try:
                st = os.stat(f)
                inputs[(st.st_dev, st.st_ino)] = f
            except OSError:
                pass
    diags = []
    for s in graph.saves:
        hit = inputs.get(os.path.realpath(s.path))
        if hit is None and os.path.exists(s.path):
            st = os.stat(s.path)
            hit = inputs.get((st.st_dev, st.st_ino))
        if hit is not None:
            diags.append(error("K0305", f"`{s.written}` would overwrite the input `{hit}`",
                               s.span, label="this save", help="save to a new file"))
    if diags:
        raise KmxError(diags)


def run(path: str, overrides: dict[str, str] | None = None, **options):
    """Compile and run a recipe; `options` are those of runtime.executor.RunOptions
    (threads, device, compute_dtype, memory_limit, resume, force, strict, nonfinite)."""
    from karmixlang.machine import default_threads
    from karmixlang.runtime.executor import RunOptions, execute

    opts = RunOptions(**options)
    compiled = compile(path, overrides, threads=opts.threads or default_threads(),
                       compute_dtype=opts.compute_dtype, strict=opts.strict,
                       memory_limit=opts.memory_limit, executor=opts.executor)
    return execute(compiled, opts)


def format(text: str, file: str = "<recipe>") -> str:
    """The canonical layout of recipe text. Raises KmxError on a syntax error."""
    from karmixlang.syntax.fmt import format_source

    out, diags = format_source(text, file)
    if out is None:
        raise KmxError(diags)
    return out
