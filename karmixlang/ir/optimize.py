"""Optimizer passes, each Graph -> Graph, each idempotent, each recording what it did:

  views     move each rename(x, pattern, replacement) and layer slice (`layers`, `stack`'s
            shifts) into the loads below it: a load's `view` attribute lists them (and the
            selects they must follow), the plan applies them to its header, so no rename
            node is left for the schedule
  fold      flatten nested linear combinations, merge repeated terms, drop zero terms,
            `x - x` -> zeros_like(x), `1·x` -> x
  pushdown  move select/exclude down to the inputs, so a key nobody saves is never read
  cse       re-intern every node: subexpressions that became equal are computed once
  dce       drop named values that no save uses
  laws      algebraic rewrites that need the inputs' key sets (run by plan/compile.py after
            the others, with `covers` from the headers): re-election, `base + F(c − base)`
            for translation-equivariant F, zero delta terms (docs/architecture.md, "The
            algebraic rewrites", says which are bit-exact)
"""

from __future__ import annotations

from collections import Counter
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

def _fold_rule(counts: dict[str, int]) -> Rewrite:
    def rule(n: Node, inputs: tuple, b: Builder) -> Node:
        if n.op != "lincomb":
            return _same(n, inputs, b)
        terms, flattened, parts = _terms(inputs, n.attr("coeffs"))
        counts["flattened"] += flattened
        counts["merged"] += parts - len(terms)
        kept = [(x, c) for x, c in terms if isinstance(c, KeyMap) or c != 0.0]
        counts["zero"] += len(terms) - len(kept)
        if not kept:
            return b.node("zeros_like", (inputs[0],))
        if len(kept) == 1 and kept[0][1] == 1.0:
            counts["one"] += 1
            return kept[0][0]
        return b.node("lincomb", tuple(x for x, _ in kept),
                      {"coeffs": tuple(c for _, c in kept)})
    return rule


def _terms(inputs: tuple, coeffs: tuple) -> tuple[list[list], int, int]:
    """The [node, coefficient] terms of Σ cᵢxᵢ with nested float combinations flattened and
    repeated nodes merged; how many nested combinations were flattened, and how many terms
    there were before merging."""
    terms: list[list] = []
    index: dict[int, int] = {}  # id(node) -> its float-coefficient term
    flattened = parts_seen = 0
    for x, c in zip(inputs, coeffs):
        parts = [(x, c)]
        if x.op == "lincomb" and not isinstance(c, KeyMap) and \
                not any(isinstance(cc, KeyMap) for cc in x.attr("coeffs")):
            parts = [(xx, c * cc) for xx, cc in zip(x.inputs, x.attr("coeffs"))]
            flattened += 1
        parts_seen += len(parts)
        for xx, cc in parts:
            if isinstance(cc, KeyMap):  # per-key coefficients are kept as separate terms
                terms.append([xx, cc])
            elif id(xx) in index:
                terms[index[id(xx)]][1] += cc
            else:
                index[id(xx)] = len(terms)
                terms.append([xx, cc])
    return terms, flattened, parts_seen


_FOLD_NOTES = {
    "flattened": "{k} nested linear combination(s) flattened into one",
    "merged": "{k} repeated term(s) merged",
    "zero": "{k} zero term(s) dropped",
    "one": "{k} `1·x` turned into `x`",
}


def fold(graph: Graph) -> Graph:
    before = len(graph.nx(include_extra=True))
    counts = dict.fromkeys(_FOLD_NOTES, 0)
    out, _ = _rebuild(graph, _fold_rule(counts))
    after = len(out.nx(include_extra=True))
    if after != before:
        done = [text.format(k=counts[name]) for name, text in _FOLD_NOTES.items() if counts[name]]
        out.notes.append(f"fold: {before - after} node(s) removed by constant folding of "
                         "linear combinations" + (f" ({'; '.join(done)})" if done else ""))
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


# the key-wise renames moved into the loads, with the attributes that make their view step
_VIEW_STEPS = {"rename": ("pattern", "replacement"),
               "layers": ("start", "end", "offset", "others")}


def views(graph: Graph) -> Graph:
    memo: dict = {}

    def rule(n: Node, inputs: tuple, b: Builder) -> Node:
        if n.op not in _VIEW_STEPS:
            return _same(n, inputs, b)
        return _absorb(inputs[0], (n.op,) + tuple(n.attr(a) for a in _VIEW_STEPS[n.op]), b,
                       memo)

    with recursion_room():
        out, _ = _rebuild(graph, rule)
    sources = memo.get("sources", {})
    for viewed, x in sources.items():  # a renamed input keeps its recipe name in messages
        if x in out.names:
            out.names.setdefault(viewed, out.names[x])
    # an input used only renamed is used, not unused
    used = set(sources.values())
    out.extra_roots = [n for n in out.extra_roots if n not in used]
    count = Counter(n.op for n in graph.nx() if n.op in _VIEW_STEPS)
    if count["rename"]:
        out.notes.append(f"views: {count['rename']} rename(s) applied to the inputs' key names")
    if count["layers"]:
        out.notes.append(f"views: {count['layers']} layer slice(s) applied to the inputs' key "
                         "names (renumbered, no tensor copied)")
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


# ------------------------------------------------------------------ laws

# covers(ref, x): every key x computes, ref computes too, with the same shape and stored dtype
# (plan/keyscope.py answers it from the inputs' headers). A rewrite that drops `ref` from a
# combination asks it first: what a key set (and a key's dtype) was is what it stays.
Covers = Callable[[Node, Node], bool]

_ELECTIONS = ("ties", "elect")


def _elected_source(n: Node) -> Node | None:
    """The `ties`/`elect` node whose every member, in order and with its weights, is n's
    cluster; None if n's inputs are anything else."""
    if not n.inputs or any(x.op != "pick" for x in n.inputs):
        return None
    source = n.inputs[0].inputs[0]
    if source.op not in _ELECTIONS or len(n.inputs) != len(source.inputs) or \
            n.attr("weights") != source.attr("weights"):
        return None
    same = all(x.inputs[0] is source and x.attr("index") == i for i, x in enumerate(n.inputs))
    return source if same else None


def _reelections(nodes: list[Node]) -> set[int]:
    """ids of the ties/elect nodes read only by ties_merge of all their members: those the
    re-election law may remove (another reader would keep them computed, and the trims
    too: the rewrite would then cost more, not less)."""
    users: dict[int, set[Node]] = {}
    for n in nodes:
        for x in n.inputs:
            if x.op == "pick":
                users.setdefault(id(x.inputs[0]), set()).add(n)
    # (a pick is never a save's value: a save holds a model, not a cluster member)
    return {id(n) for n in nodes if n.op in _ELECTIONS and users.get(id(n)) and
            all(u.op == "ties_merge" and _elected_source(u) is n for u in users[id(n)])}


def _reelect(n: Node, inputs: tuple, b: Builder, removable: set[int],
             origins: dict) -> Node | None:
    """`ties_merge(ties(c, d, r1), r2)` -> `ties_merge(trim(c, d), r1)` and
    `ties_merge(elect(c, r1), r2)` -> `ties_merge(c, r1)`. After an election every non-zero
    entry of a column has the elected sign γ₁ (all are zero where γ₁ = 0), and the weights are
    positive: the second election's vote, by mass or by count, has γ₁'s sign wherever an entry
    is left, and where none is both give 0. The agreeing entries are the same ones, summed in
    the same order: bit for bit the same result (tests/ir/test_laws.py)."""
    source = _elected_source(n) if n.op == "ties_merge" else None
    if source is None or id(source) not in removable:
        return None
    new_source = inputs[0].inputs[0]
    members = new_source.inputs
    if new_source.op == "ties":
        members = tuple(b.node("trim", (x,), {"density": new_source.attr("density")})
                        for x in members)
        for trim in members:  # the trims were written as the ties call
            spans = b.origins.setdefault(trim, [])
            spans += [s for s in origins.get(source, ()) if s not in spans]
    return b.node("ties_merge", members, {"weights": new_source.attr("weights"),
                                          "rule": new_source.attr("rule")})


def _uncentre(n: Node, inputs: tuple, b: Builder, covers: Covers, single: set[int]) -> Node | None:
    """`base + F(c − base)` -> `F(c)` for F translation-equivariant (K0213's F): the same
    in exact arithmetic, without the subtractions and the addition, and without reading the
    base. Only where F's value has no other reader (else F would run twice) and the base has
    every key of each c, alike (else the key set or a key's dtype would change)."""
    if n.op != "lincomb" or len(n.inputs) != 2 or n.attr("coeffs") != (1.0, 1.0):
        return None
    for (base, center), (_, new_center) in ((n.inputs, inputs), (n.inputs[::-1], inputs[::-1])):
        if not OPS[center.op].translation_equivariant or id(center) not in single:
            continue
        if not all(_is_difference(m, base) for m in center.inputs):
            continue
        pool = tuple(m.inputs[0] for m in center.inputs)
        if not all(covers(base, c) for c in pool):
            continue
        new_pool = tuple(m.inputs[0] for m in new_center.inputs)
        return b.node(center.op, new_pool, dict(new_center.attrs))
    return None


def _is_difference(m: Node, base: Node) -> bool:
    return m.op == "lincomb" and len(m.inputs) == 2 and m.inputs[1] is base and \
        m.inputs[0] is not base and m.attr("coeffs") == (1.0, -1.0)


def _zero_terms(n: Node, inputs: tuple, b: Builder, covers: Covers) -> Node | None:
    """`x + zeros_like(y)` -> `x`: a zero delta term adds nothing, where y has every key of
    each other term, alike (so the key set stays)."""
    if n.op != "lincomb":
        return None
    zero = [i for i, x in enumerate(n.inputs) if x.op == "zeros_like"]
    rest = [i for i in range(len(n.inputs)) if i not in zero]
    if not zero or not rest or not all(
            covers(n.inputs[z].inputs[0], n.inputs[r]) for z in zero for r in rest):
        return None
    coeffs = n.attr("coeffs")
    if len(rest) == 1 and coeffs[rest[0]] == 1.0:
        return inputs[rest[0]]
    return b.node("lincomb", tuple(inputs[r] for r in rest),
                  {"coeffs": tuple(coeffs[r] for r in rest)})


def _candidate(n: Node) -> bool:
    """Whether a law could apply at n, judged from n's shape alone (cheap)."""
    if n.op == "ties_merge":
        return _elected_source(n) is not None
    return n.op == "lincomb" and any(
        x.op == "zeros_like" or OPS[x.op].translation_equivariant for x in n.inputs)


_LAW_NOTES = {
    "reelect": "laws: {k} re-election(s) `ties_merge(ties(c, d, r1), r2)` run as "
               "`ties_merge(trim(c, d), r1)` (an elected cluster elects the same signs again; "
               "bit-exact)",
    "uncentre": "laws: {k} `base + F(c - base)` with F translation-equivariant computed as "
                "`F(c)`, without the subtractions (equal up to rounding)",
    "zero": "laws: {k} zero delta term(s) `+ zeros_like(y)` removed (bit-exact but for the "
            "sign of a zero)",
}


def laws(graph: Graph, covers: Covers) -> Graph:
    """The algebraic rewrites that need to know the inputs' keys (`covers`): re-election,
    uncentring, zero delta terms. After the other passes (compile.py)."""
    nodes = list(graph.nx().nodes)
    if not any(_candidate(n) for n in nodes):  # the common case: nothing to rebuild
        return graph
    removable = _reelections(nodes)
    readers: dict[int, int] = {}
    for n in nodes:
        for x in set(n.inputs):
            readers[id(x)] = readers.get(id(x), 0) + 1
    roots = {id(r) for r in graph.roots()}
    single = {i for i, k in readers.items() if k == 1 and i not in roots}
    fired: dict[str, list[Node]] = {name: [] for name in _LAW_NOTES}

    def rule(n: Node, inputs: tuple, b: Builder) -> Node:
        for name, law in (("reelect", lambda: _reelect(n, inputs, b, removable, graph.origins)),
                          ("uncentre", lambda: _uncentre(n, inputs, b, covers, single)),
                          ("zero", lambda: _zero_terms(n, inputs, b, covers))):
            new = law()
            if new is not None:
                fired[name].append(new)
                return new
        return _same(n, inputs, b)

    out, _ = _rebuild(graph, rule, keep_extra=False)
    out.built = graph.built
    live = set(out.nx().nodes)  # a rewrite inside another one's dropped part does not count
    for name, nodes in fired.items():
        k = len({id(x) for x in nodes if x in live})
        if k:
            out.notes.append(_LAW_NOTES[name].format(k=k))
    return out
