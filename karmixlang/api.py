"""The Python API: the same pipeline the CLI runs, without printing.

    check(path)            -> diagnostics
    compile(path)          -> Compiled (graph, schedule, plan), reading headers only
    run(path, ...)         -> RunResult (imports torch)
    format(text)           -> canonical text
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .checker import check_program
from .program import Program
from .diagnostics import Diagnostic, KmxError
from .io.guard import check_outputs, input_files, plan_save
from .ir import Graph
from .lower import lower
from .optimize import base_choice_warnings, optimize
from .plan import Plan, build_plan
from .schedule import Schedule, schedule


@dataclass
class Compiled:
    program: Program
    graph: Graph
    schedule: Schedule
    plan: Plan
    warnings: list[Diagnostic]
    path: str = ""  # the recipe and --set values, to compile it again elsewhere (Ray workers)
    overrides: dict[str, str] | None = None
    # Every input file as planned (size, mtime, inode): a run fails if one changes (K0410).
    inputs: dict[str, os.stat_result] = field(default_factory=dict)


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
    layouts = [plan_save(s, sched, i, {}) for i, s in enumerate(graph.saves)]
    check_outputs(graph.saves, layouts, sched.headers, program.sources)
    plan = build_plan(path, graph, sched, threads, compute_dtype, executor=executor)
    return Compiled(program, graph, sched, plan, diags + base_choice_warnings(graph),
                    os.path.abspath(path), overrides, input_files(sched.headers))


def run(path: str, overrides: dict[str, str] | None = None, **options):
    """Compile and run a recipe; `options` are those of runtime.executor.RunOptions
    (threads, device, compute_dtype, memory_limit, resume, force, strict, nonfinite)."""
    from .machine import default_threads
    from .runtime.executor import RunOptions, execute

    opts = RunOptions(**options)
    compiled = compile(path, overrides, threads=opts.threads or default_threads(),
                       compute_dtype=opts.compute_dtype, strict=opts.strict,
                       memory_limit=opts.memory_limit, executor=opts.executor)
    return execute(compiled, opts)


def format(text: str, file: str = "<recipe>") -> str:
    """The canonical layout of recipe text. Raises KmxError on a syntax error."""
    from .fmt import format_source

    out, diags = format_source(text, file)
    if out is None:
        raise KmxError(diags)
    return out
