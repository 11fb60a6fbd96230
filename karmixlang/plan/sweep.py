"""Sweeps in one pass (`--sweep NAME=V1,V2,...`, several make a grid): every point is
compiled exactly as a single run with those `--set` values would be, then the points'
optimized graphs are re-interned into one graph (shared loads and subexpressions computed
once) and scheduled once, so one job per key computes that key for every point and every
input is read once for the whole sweep.

Each swept save is written where its path names it: a path that interpolates every swept
param names its point; otherwise the params it does not interpolate are added before the
extension, `.NAME=VALUE` each in --sweep order, the value as given (`/` written `_`).
What each output records (its metadata) is its point's own compile: it is byte for byte
the file a single run with that point's --set values writes.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

from karmixlang.check.checker import check_program
from karmixlang.check.program import param_names, save_interpolations
from karmixlang.diagnostics import Diagnostic, KmxError, Label, did_you_mean, error
from karmixlang.io.guard import check_outputs, input_files, plan_save
from karmixlang.ir.optimize import merge
from karmixlang.plan.compile import Compiled, compile
from karmixlang.plan.folders import plan_folders
from karmixlang.plan.report import build_plan
from karmixlang.plan.schedule import schedule

Sweeps = list[tuple[str, list[str]]]  # (param as --set names it, its values as given)


@dataclass
class Point:
    values: tuple[tuple[str, str], ...]  # (param, value as given), in --sweep order
    compiled: Compiled  # what a single run with these --set values compiles
    paths: list[tuple[str, str]]  # per save: (absolute path, as written) the sweep writes

    def describe(self) -> str:
        return " ".join(f"{n}={v}" for n, v in self.values)


def compile_sweep(path: str, overrides: dict[str, str] | None, sweeps: Sweeps, *,
                  threads: int = 1, compute_dtype: str = "fp32", strict: bool = False,
                  memory_limit: int | None = None, executor: str = "local",
                  lock: bool = True) -> Compiled:
    """Every point of the grid compiled, then all of them as one Compiled whose saves are
    every point's (`save_sources` says whose). Raises KmxError: K0517-K0519, or what
    compiling a point reports."""
    overrides = dict(overrides or {})
    _check_sweeps(path, overrides, sweeps)
    points = []
    for values in itertools.product(*[[(name, v) for v in vals] for name, vals in sweeps]):
        c = compile(path, {**overrides, **dict(values)}, threads=threads,
                    compute_dtype=compute_dtype, strict=strict, memory_limit=memory_limit,
                    executor=executor, lock=lock)
        points.append(Point(tuple(values), c, _paths(c, values)))
    _check_collisions(points)
    graph = merge([p.compiled.graph for p in points])
    graph.saves = [replace(s, path=target, written=written) for s, (target, written) in
                   zip(graph.saves, [t for p in points for t in p.paths])]
    sched = schedule(graph, compute_dtype, strict, memory_limit=memory_limit)
    unused = tuple(sorted({u for p in points for u in p.compiled.unused_inputs}))
    first = points[0].compiled
    sched.folders = plan_folders(graph, sched,
                                 first.program.sources.get(first.program.root.path, ""))
    layouts = [plan_save(s, sched, i, {}) for i, s in enumerate(graph.saves)]
    check_outputs(graph.saves, layouts, sched.headers, first.recipes, unused,
                  sched.folders)
    plan = build_plan(path, graph, sched, threads, compute_dtype, executor=executor)
    plan.data["sweep"] = _grid(sweeps, points)
    locked = {k: v for p in points for k, v in p.compiled.locked.items()}
    return Compiled(first.program, graph, sched, plan, _warnings(points),
                    input_files(sched.headers), first.recipes, unused, first.lock_file, locked,
                    [(p.compiled, j) for p in points for j in range(len(p.paths))])


def _check_sweeps(path: str, overrides: dict[str, str], sweeps: Sweeps) -> None:
    """K0519: a param swept twice or also given with --set; K0518: not a param."""
    diags: list[Diagnostic] = []
    names = [name for name, _ in sweeps]
    for i, name in enumerate(names):
        if name in names[:i]:
            diags.append(error("K0519", f"--sweep {name}: `{name}` is swept twice",
                               help="give all its values in one --sweep: "
                                    f"--sweep {name}=V1,V2,..."))
        elif name in overrides:
            diags.append(error("K0519", f"--sweep {name}: `{name}` is also given with --set",
                               help="drop the --set, or the --sweep"))
    if diags:
        raise KmxError(diags)
    program, found = check_program(path, overrides)
    if program is None:
        raise KmxError(found)
    params = param_names(program.root)
    for name in names:
        if name not in params:
            hint = did_you_mean(name, params)
            diags.append(error("K0518", f"--sweep {name}: no param `{name}` in the recipe",
                               help=f"did you mean `{hint}`?" if hint else
                               "params: " + (", ".join(sorted(params)) or "none")))
    if diags:
        raise KmxError(diags)


def _paths(c: Compiled, values: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Where each save of a point is written: its own path, plus the suffix of the swept
    params the path does not interpolate."""
    out = []
    for save, named in zip(c.graph.saves, save_interpolations(c.program.root)):
        suffix = "".join(f".{n}={v.replace('/', '_').replace(os.sep, '_')}"
                         for n, v in values if n not in named)
        out.append((_with_suffix(save.path, suffix), _with_suffix(save.written, suffix)))
    return out


def _with_suffix(path: str, suffix: str) -> str:
    root, ext = os.path.splitext(path)
    return root + suffix + ext


def _check_collisions(points: list[Point]) -> None:
    """K0517: two points (or two saves of different points) would write one file."""
    seen: dict[str, tuple[Point, int]] = {}
    diags = []
    for p in points:
        for j, (target, written) in enumerate(p.paths):
            entry = os.path.join(os.path.realpath(os.path.dirname(target)),
                                 os.path.basename(target))
            first = seen.setdefault(entry, (p, j))
            if first[0] is p:
                continue
            other = first[0].compiled.graph.saves[first[1]]
            save = p.compiled.graph.saves[j]
            diags.append(error(
                "K0517", f"the sweep writes `{written}` twice: at {first[0].describe()} and "
                f"at {p.describe()}", save.span, label="this save",
                notes=(Label(other.span, "also written here"),)
                if other.span and other.span != save.span else (),
                help="sweep distinct values, or interpolate the swept params into the save's "
                     "path (`${NAME}`) so that each point names its own file"))
    if diags:
        raise KmxError(diags[:1])


def _warnings(points: list[Point]) -> list[Diagnostic]:
    """Every point's warnings, each once."""
    out: dict[tuple, Diagnostic] = {}
    for p in points:
        for d in p.compiled.warnings:
            out.setdefault((d.code, d.message, d.span), d)
    return list(out.values())


def _grid(sweeps: Sweeps, points: list[Point]) -> dict:
    """The plan's `sweep` section (docs/plan-format.md)."""
    saves, rows = 0, []
    for p in points:
        n = len(p.paths)
        rows.append({"set": dict(p.values), "saves": list(range(saves, saves + n)),
                     "bytes_read_alone": p.compiled.plan.data["totals"]["bytes_read"]})
        saves += n
    return {"params": [{"name": n, "values": list(v)} for n, v in sweeps],
            "points": rows,
            "bytes_read_separately": sum(r["bytes_read_alone"] for r in rows)}
