"""The permutation phase of a plan (docs/rebasin.md): every distinct Permutation that permute
nodes carry, its spec checked against the headers of the two models it aligns (K0360-K0365),
its groups sized, and what phase one reads and holds. Headers only: no tensor is read."""

from __future__ import annotations

from pathlib import Path

from karmixlang.diagnostics import KmxError, Span, did_you_mean, error
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.header import CheckpointHeader, read_checkpoint
from karmixlang.io.rebasin_spec import Sized, auto_spec, check_shapes, load_spec
from karmixlang.ir.graph import Graph, Node
from karmixlang.plan.executable import PermPlan

IDENT = ("model", "to", "spec", "iterations", "seed", "groups")


def ident(n) -> tuple:
    """What names one Permutation: a permute node's (or step's) attributes."""
    return tuple(n.attr(k) for k in IDENT)


def plan_permutations(graph: Graph, order: list[Node], headers: dict[Node, CheckpointHeader],
                      keys, limit: int
                      ) -> tuple[tuple[PermPlan, ...], dict[Node, CheckpointHeader]]:
    """One PermPlan per distinct Permutation, in the order the graph first uses them; every
    key a permute node permutes has the shape the permutation was computed on (K0365). And
    the checkpoints phase one reads that no save reads, as load nodes of their own
    (not in the graph): they are inputs like the others (the plan's Inputs, K0410, the lock,
    the permuted keys' fingerprints)."""
    plans: dict[tuple, PermPlan] = {}
    read: dict[str, CheckpointHeader] = {}
    for n in order:
        if n.op != "permute":
            continue
        span = (graph.origins.get(n) or [None])[0]
        key = ident(n)
        if key not in plans:
            plans[key] = _plan(key, headers, read, span, limit)
        _check_fits(plans[key], keys[n.inputs[0]].ok, graph.display_name(n.inputs[0]), span)
    loaded = {n.attr("path") for n in headers if n.op == "load"}  # through a view, say
    extra = {Node("load", (), (("path", p), ("role", "model"))): h
             for p, h in sorted(read.items()) if p not in loaded}
    return tuple(plans.values()), extra


def _header(path: str, headers: dict[Node, CheckpointHeader], read: dict,
            span) -> CheckpointHeader:
    """The model as it is stored (the one a save reads, when it reads it without a view);
    one read here otherwise, remembered in `read`."""
    for n, h in headers.items():
        if n.op == "load" and n.attr("path") == path and not n.attr("view"):
            return h
    if path not in read:
        read[path] = read_checkpoint(path, span)
    return read[path]


def _plan(key: tuple, headers, read: dict, span: Span | None, limit: int) -> PermPlan:
    model, to, ref, iterations, seed, groups = key
    a, b = _header(model, headers, read, span), _header(to, headers, read, span)
    shapes = {k: t.shape for k, t in a.tensors.items() if DTYPES[t.dtype].is_float}
    spec = auto_spec(shapes, span) if ref == "auto" else load_spec(ref, Path("/"), span)
    if groups is not None:
        names = [g.name for g in spec.groups]
        for name in groups:
            if name not in names:
                hint = did_you_mean(name, names)
                raise KmxError([error("K0117", f"the spec {spec.source} has no permutation "
                                      f"\"{name}\"", span,
                                      help=f'did you mean "{hint}"?' if hint else None)])
        spec = spec.select(groups)
    sized, skipped = check_shapes(spec, shapes, span)
    used = sorted({k for s in sized for k in s.group.keys})
    for k in used:
        other = b.tensors.get(k)
        if other is None or other.shape != a.tensors[k].shape:
            got = "lacks it" if other is None else f"has shape {list(other.shape)}"
            raise KmxError([error(
                "K0365", f"weight matching needs \"{k}\" in both models with one shape: "
                f"{Path(model).name} has shape {list(a.tensors[k].shape)}, {Path(to).name} "
                f"{got}", span, help="align models of one architecture")])
    held = sum(a.tensors[k].nbytes + b.tensors[k].nbytes for k in used)
    return PermPlan(key, tuple(sized), tuple(skipped),
                    tuple((k, a.tensors[k]) for k in used), tuple((k, b.tensors[k]) for k in used),
                    held if held <= limit // 2 else 0, spec.source, spec.description)


def _check_fits(plan: PermPlan, ok: dict, name: str, span: Span | None) -> None:
    """Every key the permutation moves has, in the value permuted, the shape of the model the
    permutation was computed on: a fine-tune of the same base fits, another model does not."""
    for k, info in plan.model:
        have = ok.get(k)
        if have is not None and tuple(have.shape) != tuple(info.shape):
            raise KmxError([error(
                "K0365", f"`{name}` has \"{k}\" of shape {list(have.shape)}, but the "
                f"permutation was computed on shape {list(info.shape)}", span,
                help="permute models of the architecture the permutation was computed on")])


def cost_bytes(s: Sized) -> int:
    """Phase one's float64 memory for one group: its cost tensor, and the unit-by-unit
    products of one axis summed into it."""
    return 8 * s.size ** 2 + 8 * (s.size ** 2 if s.free_inner else s.blocks ** 2)


def phase_one_bytes(plan: PermPlan) -> int:
    """Phase one's resident memory: the largest group's costs, and the keys kept (or, read
    again at each visit, the largest key of both models with its float64 column copies)."""
    largest = max((t.nbytes for _, t in plan.model), default=0)
    keys = plan.cache_bytes if plan.cache_bytes else 4 * largest
    return max((cost_bytes(s) for s in plan.groups), default=0) + keys


def describe(plan: PermPlan) -> dict:
    """The permutation phase in the plan (docs/plan-format.md)."""
    model, to, ref, iterations, seed, groups = plan.ident
    reads = sum(len(s.group.axes) for s in plan.groups) * 2
    return {
        "model": model, "to": to, "spec": plan.source, "description": plan.description,
        "iterations": iterations, "seed": seed,
        "groups": [{"name": s.group.name, "size": s.size, "blocks": s.group.blocks,
                    "inner": s.group.inner, "keys": len(s.group.keys)} for s in plan.groups],
        "skipped": list(plan.skipped),
        "keys": len(plan.model),
        "bytes_keys": sum(t.nbytes for _, t in plan.model) + sum(t.nbytes for _, t in plan.to),
        "resident": plan.cache_bytes > 0,
        "reads_per_pass": 0 if plan.cache_bytes else reads,
        "bytes_cost_max": max((cost_bytes(s) for s in plan.groups), default=0),
    }
