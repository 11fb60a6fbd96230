"""The compile pipeline: check, lower, optimize, schedule and plan a recipe, reading input
headers only. What it returns, `Compiled`, is all a run needs: the runtime executes
`schedule.executable` and never plans again."""

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
    return Compiled(program, graph, sched, plan, diags + base_choice_warnings(graph))


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
