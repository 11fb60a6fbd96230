"""Optimizer passes, each Graph -> Graph, each idempotent, each recording what it did:

  views     move each rename(x, pattern, replacement) into the loads below it: a load's
            `view` attribute lists the renames (and the selects they must follow) that the
            plan applies to its header, so no rename node is left for the schedule
  fold      flatten nested linear combinations, merge repeated terms, drop zero terms,
            `x - x` -> zeros_like(x), `1·x` -> x
  pushdown  move select/exclude down to the inputs, so a key nobody saves is never read
  cse       re-intern every node: subexpressions that became equal are computed once
  dce       drop named values that no save uses
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import networkx as nx

from karmixlang.diagnostics import Diagnostic, warning
from karmixlang.limits import recursion_room
from karmixlang.ops import OPS
from karmixlang.ir.graph import Builder, Graph, KeyMap, Node

Rewrite = Callable[[Node, tuple, Builder], Node]


def _rebuild(graph: Graph, rule: Rewrite, keep_extra: bool = True,
             b: Builder | None = None) -> tuple[Graph, Builder]:
    """Rebuild every node bottom-up through a Builder (a fresh one by default), applying
    `rule` to each."""
    b = b or Builder()
    new: dict[int, Node] = {}
    order = graph.nx(include_extra=keep_extra)
    for n in nx.topological_sort(order):
        inputs = tuple(new[id(i)] for i in n.inputs)
        out = rule(n, inputs, b)
        new[id(n)] = out
        for span in graph.origins.get(n, ()):
            spans = b.origins.setdefault(out, [])
            if span not in spans:
                spans.append(span)
    saves = [replace(s, expr=new[id(s.expr)],
                     fallback=new[id(s.fallback)] if s.fallback is not None else None)
             for s in graph.saves]
    names = {}
    for old, name in graph.names.items():
        if id(old) in new:
            names.setdefault(new[id(old)], name)
    extra = [new[id(n)] for n in graph.extra_roots] if keep_extra else []
    return Graph(saves, b.origins, names, list(graph.notes), graph.built, extra), b


def _same(n: Node, inputs: tuple, b: Builder) -> Node:
    return b.node(n.op, inputs, dict(n.attrs))


def merge(graphs: list[Graph]) -> Graph:
    """Several optimized graphs as one (the points of a sweep): every node re-interned
    through one Builder, so the loads and subexpressions they share are computed once; the
    saves of each graph in turn."""
    b = Builder()
    parts = [_rebuild(g, _same, keep_extra=False, b=b)[0] for g in graphs]
    names: dict[Node, str] = {}
    for part in parts:
        for n, name in part.names.items():
            names.setdefault(n, name)
    notes = list(dict.fromkeys(note for g in graphs for note in g.notes))
    return Graph([s for part in parts for s in part.saves], b.origins, names, notes,
                 sum(g.built for g in graphs))


# ------------------------------------------------------------------ fold

def _fold_rule(n: Node, inputs: tuple, b: Builder) -> Node:
    if n.op != "lincomb":
        return _same(n, inputs, b)
    terms: list[list] = []  # [node, coefficient]
    index: dict[int, int] = {}  # id(node) -> its float-coefficient term
    for x, c in zip(inputs, n.attr("coeffs")):
        parts = [(x, c)]
        if x.op == "lincomb" and not isinstance(c, KeyMap) and \
                not any(isinstance(cc, KeyMap) for cc in x.attr("coeffs")):
            parts = [(xx, c * cc) for xx, cc in zip(x.inputs, x.attr("coeffs"))]
        for xx, cc in parts:
            if isinstance(cc, KeyMap):  # per-key coefficients are kept as separate terms
                terms.append([xx, cc])
            elif id(xx) in index:
                terms[index[id(xx)]][1] += cc
            else:
                index[id(xx)] = len(terms)
                terms.append([xx, cc])
    kept = [(x, c) for x, c in terms if isinstance(c, KeyMap) or c != 0.0]
    if not kept:
        return b.node("zeros_like", (inputs[0],))
    if len(kept) == 1 and kept[0][1] == 1.0:
        return kept[0][0]
    return b.node("lincomb", tuple(x for x, _ in kept), {"coeffs": tuple(c for _, c in kept)})


def fold(graph: Graph) -> Graph:
    before = len(graph.nx(include_extra=True))
    out, _ = _rebuild(graph, _fold_rule)
    after = len(out.nx(include_extra=True))
    if after != before:
        out.notes.append(f"fold: {before - after} node(s) removed by constant folding of "
                         "linear combinations")
    return out


# ------------------------------------------------------------------ select pushdown

_KEYWISE_BARRIERS = {"load", "lora", "select", "exclude"}


def _pushdown_rule(memo: dict) -> Rewrite:
    def rule(n: Node, inputs: tuple, b: Builder) -> Node:
        if n.op not in ("select", "exclude"):
            return _same(n, inputs, b)
        return _push(n.op, n.attrs, inputs[0], b, memo)
    return rule


def _push(op: str, attrs: tuple, x: Node, b: Builder, memo: dict) -> Node:
    """`op(x)` with the filter moved below every op down to the barriers. Every other op's key
    set is the union of its inputs', so filtering commutes with it. Iterative, and once per
    (filter, node) in a pass (`memo`): graphs may be deep, and share inputs."""
    stack = [x]
    while stack:
        n = stack[-1]
        key = (op, attrs, id(n))
        if key in memo:
            stack.pop()
        elif n.op in _KEYWISE_BARRIERS:
            stack.pop()
            same = n.op == op and n.attrs == attrs  # the same filter twice is the filter once
            memo[key] = n if same else b.node(op, (n,), dict(attrs))
        elif any((op, attrs, id(i)) not in memo for i in n.inputs):
            stack.extend(i for i in n.inputs if (op, attrs, id(i)) not in memo)
        else:
            stack.pop()
            memo[key] = b.node(n.op, tuple(memo[(op, attrs, id(i))] for i in n.inputs),
                               dict(n.attrs))
    return memo[(op, attrs, id(x))]


def pushdown(graph: Graph) -> Graph:
    out, _ = _rebuild(graph, _pushdown_rule({}))
    moved = sum(1 for n in graph.nx() if n.op in ("select", "exclude")
                and n.inputs[0].op not in _KEYWISE_BARRIERS)
    if moved:
        out.notes.append(f"pushdown: {moved} select/exclude moved to the inputs")
    return out


# ------------------------------------------------------------------ cse and dce

def cse(graph: Graph) -> Graph:
    out, _ = _rebuild(graph, _same)
    spelled, nodes = graph.built, len(out.nx())
    if spelled > nodes:
        out.notes.append(f"cse: the recipe spells out {spelled} operations; {nodes} distinct "
                         "nodes remain (shared subexpressions are computed once)")
    out.built = graph.built
    return out


def dce(graph: Graph) -> Graph:
    live = set(graph.nx().nodes)
    dropped = sorted({graph.names.get(n, n.op) for n in graph.extra_roots if n not in live})
    out, _ = _rebuild(graph, _same, keep_extra=False)
    if dropped:
        out.notes.append("dce: dropped " + ", ".join(f"`{d}`" for d in dropped)
                         + " (no save uses them)")
    return out


# ------------------------------------------------------------------ views (rename)

def _absorb(x: Node, step: tuple, b: Builder, memo: dict) -> Node:
    """`step` applied to x's key names, moved down into the loads below x. Every op but
    select/exclude is key-wise and commutes with a rename; a select below a rename matches
    the names before it, so it moves into the loads' views too, ahead of the rename."""
    key = (step, id(x))
    if key in memo:
        return memo[key]
    if x.op == "load":
        out = b.node("load", (), dict(x.attrs) | {"view": x.attr("view", ()) + (step,)})
        spans = b.origins.setdefault(out, [])
        spans += [s for s in b.origins.get(x, ()) if s not in spans]
        memo.setdefault("sources", {})[out] = x
    elif x.op in ("select", "exclude"):
        out = _absorb(_absorb(x.inputs[0], (x.op, x.attr("patterns")), b, memo), step, b, memo)
    else:
        out = b.node(x.op, tuple(_absorb(i, step, b, memo) for i in x.inputs), dict(x.attrs))
    memo[key] = out
    return out


def views(graph: Graph) -> Graph:
    memo: dict = {}

    def rule(n: Node, inputs: tuple, b: Builder) -> Node:
        if n.op != "rename":
            return _same(n, inputs, b)
        step = ("rename", n.attr("pattern"), n.attr("replacement"))
        return _absorb(inputs[0], step, b, memo)

    with recursion_room():
        out, _ = _rebuild(graph, rule)
    sources = memo.get("sources", {})
    for viewed, x in sources.items():  # a renamed input keeps its recipe name in messages
        if x in out.names:
            out.names.setdefault(viewed, out.names[x])
    # an input used only renamed is used, not unused
    used = set(sources.values())
    out.extra_roots = [n for n in out.extra_roots if n not in used]
    count = sum(1 for n in graph.nx() if n.op == "rename")
    if count:
        out.notes.append(f"views: {count} rename(s) applied to the inputs' key names")
    return out


PASSES = (("views", views), ("fold", fold), ("pushdown", pushdown), ("cse", cse), ("dce", dce))


def optimize(graph: Graph) -> Graph:
    for _, p in PASSES:
        graph = p(graph)
    return graph


# ------------------------------------------------------------------ analyses

def base_choice_warnings(graph: Graph) -> list[Diagnostic]:
    """K0213 for `b + F(c − b)` with F translation-equivariant: it equals F(c), so the choice
    of b changes nothing (methods.md, "Algebraic properties")."""
    out = []
    for s in graph.saves:
        e = s.expr
        if e.op != "lincomb" or len(e.inputs) != 2 or e.attr("coeffs") != (1.0, 1.0):
            continue
        for b, center in (e.inputs, e.inputs[::-1]):
            if b.op != "load" or not OPS[center.op].translation_equivariant:
                continue
            if all(m.op == "lincomb" and len(m.inputs) == 2 and m.inputs[1] is b
                   and m.attr("coeffs") == (1.0, -1.0) for m in center.inputs):
                name = graph.names.get(b, "the base")
                out.append(warning(
                    "K0213", f"the choice of `{name}` cannot change this result: "
                    f"`{name} + {center.op}(c - {name})` equals `{center.op}(c)`", s.span,
                    help="only base-dependent steps (trim, dare, della, breadcrumbs, elect, "
                         "ties, model_stock, iso, or the base as a zero vote) make it matter"))
    return out
