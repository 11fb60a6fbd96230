"""The compile pipeline: check, lower, optimize, schedule and plan a recipe, reading input
headers only. What it returns, `Compiled`, is all a run needs: the runtime executes
`schedule.executable` and never plans again."""

from __future__ import annotations

import os
import hashlib
from dataclasses import dataclass, field

from karmixlang.check.checker import check_program
from karmixlang.check.program import Program
from karmixlang.diagnostics import Diagnostic, KmxError
from karmixlang.io.guard import check_outputs, input_files, plan_save
from karmixlang.ir.graph import Graph, reachable
from karmixlang.ir.lower import lower
from karmixlang.ir.optimize import base_choice_warnings, laws, optimize
from karmixlang.plan.keyscope import key_cover
from karmixlang.plan.lock import LockedInput, check_lock, lock_path, read_lock
from karmixlang.plan.folders import plan_folders
from karmixlang.plan.report import Plan, build_plan
from karmixlang.plan.schedule import Schedule, schedule


@dataclass
class Compiled:
    program: Program
    graph: Graph
    schedule: Schedule
    plan: Plan
    warnings: list[Diagnostic]
    # Every input file as planned (size, mtime, inode): a run fails if one changes (K0410).
    inputs: dict[str, os.stat_result]
    # Every recipe file, by real path, and the sha256 of the text compiled: no save may
    # overwrite one (K0305), and a resume must match them (K0404).
    recipes: dict[str, str]
    # Checkpoints the recipe declares that no save reads: no save may overwrite them either.
    unused_inputs: tuple[str, ...] = ()
    # The lock beside the recipe (plan/lock.py), if one is honoured: its path, and its entry
    # for each input by resolved path, which the run compares the hashes it computes against.
    lock_file: str | None = None
    locked: dict[str, LockedInput] = field(default_factory=dict)
    # A sweep (plan/sweep.py): per save, the single run it stands for — that run's Compiled
    # and the save's index in it, whose metadata the output carries. None: this one's own.
    save_sources: list[tuple[Compiled, int]] | None = None

    def source(self, index: int) -> tuple[Compiled, int]:
        """The compiled run whose save `index` is, and its index there."""
        return self.save_sources[index] if self.save_sources is not None else (self, index)


def compile(path: str, overrides: dict[str, str] | None = None, *, threads: int = 1,
            compute_dtype: str = "fp32", strict: bool = False, memory_limit: int | None = None,
            executor: str = "local", source: bytes | None = None, lock: bool = True) -> Compiled:
    """Check, lower, optimize and schedule a recipe. Raises KmxError with diagnostics.
    `memory_limit` (bytes; None: half of the available memory) decides which keys run out
    of core; `executor` ("local" or "ray") how the plan groups keys; `source` the recipe's
    bytes, compiled as if they were the file at `path` (kmx diff REV:path); `lock` False
    ignores a lock file beside the recipe (else its inputs are checked against it:
    K0510-K0512)."""
    program, diags = check_program(path, overrides, source)
    if program is None:
        raise KmxError(diags)
    lowered = lower(program)
    prepared = optimize(lowered)
    graph = laws(prepared, key_cover(prepared))
    sched = schedule(graph, compute_dtype, strict, memory_limit=memory_limit)
    recipes = recipe_hashes(program.sources)
    unused = _unused_inputs(lowered, graph)
    sched.folders = plan_folders(graph, sched, program.sources.get(program.root.path, ""))
    layouts = [plan_save(s, sched, i, {}) for i, s in enumerate(graph.saves)]
    check_outputs(graph.saves, layouts, sched.headers, recipes, unused, sched.folders)
    plan = build_plan(path, graph, sched, threads, compute_dtype, executor=executor)
    compiled = Compiled(program, graph, sched, plan,
                        diags + sched.warnings + base_choice_warnings(prepared),
                        input_files(sched.headers), recipes, unused)
    entries = read_lock(lock_path(path)) if lock else None
    if entries is not None:
        compiled.lock_file = lock_path(path)
        compiled.locked = check_lock(compiled, path, entries)
    return compiled


def _unused_inputs(lowered: Graph, optimized: Graph) -> tuple[str, ...]:
    """The paths of declared checkpoints the optimizer dropped (nothing saves them)."""
    def paths(roots):
        return {n.attr("path") for n in reachable(roots) if n.op == "load"}
    return tuple(sorted(paths(lowered.roots() + lowered.extra_roots) -
                        paths(optimized.roots())))


def recipe_hashes(sources: dict[str, str]) -> dict[str, str]:
    """Real path -> sha256 of the text, for each recipe file: by real path, so that
    `kmx run r.kmx` resumes `kmx run ./r.kmx`, whatever the folder the run starts from."""
    return {os.path.realpath(p): hashlib.sha256(t.encode()).hexdigest()
            for p, t in sorted(sources.items())}
