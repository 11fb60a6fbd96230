"""The layer map of a save built from layer slices (docs/language.md, "Layer slices"): which
input layers each output layer is read or merged from, for the plan.

Worked out on the viewed headers (a viewed key's `TensorInfo.name` is the stored key it is read
from), key by key through the graph as the schedule decides them: `x | y` takes a key from y
when y has it, select/exclude keep the keys their patterns match, and any other op computes a
key from its inputs when every input holds it.
"""

from __future__ import annotations

from karmixlang.io.header import CheckpointHeader
from karmixlang.io.layouts.llm import split_layer_key
from karmixlang.ir.graph import Graph, Node, SaveSpec, fold_up, match_key, reachable

Sources = dict[str, tuple[tuple[str, str], ...]]  # key -> ((input name, stored key), ...)


def is_sliced(save: SaveSpec) -> bool:
    return any(step[0] == "layers" for n in reachable([save.expr]) if n.op == "load"
               for step in n.attr("view", ()))


def layer_map(graph: Graph, save: SaveSpec, headers: dict[Node, CheckpointHeader]) -> dict | None:
    """{"layers": count, "container": name, "map": [{"out": [lo, hi], "from": [[input, lo, hi],
    ...]}, ...]} with runs of consecutive layers merged; None for a save of whole models."""
    if not is_sliced(save):
        return None
    sources = _sources(graph, save.expr, headers)
    per_layer: dict[int, list[tuple[str, int]]] = {}
    stacks = set()
    for key, found in sources.items():
        out = split_layer_key(key)
        if out is None:
            continue
        stacks.add(out.stack)
        layer = per_layer.setdefault(out.index, [])
        for name, stored in found:
            src = split_layer_key(stored)
            item = (name, src.index if src is not None else -1)
            if item not in layer:
                layer.append(item)
    return {"layers": len(per_layer), "container": ", ".join(sorted(stacks)),
            "map": _runs(per_layer)}


def _sources(graph: Graph, root: Node, headers) -> Sources:
    """Per key the (input, stored key) pairs it is computed from, node by node, inputs first."""
    return fold_up(root, lambda n, sources: _node_sources(graph, n, sources, headers))


def _node_sources(graph: Graph, n: Node, inner: list[Sources], headers) -> Sources:
    if n.op in ("load", "lora"):
        name = graph.display_name(n)
        header = headers.get(n)
        return {} if header is None else \
            {k: ((name, t.name),) for k, t in header.tensors.items()}
    if n.op == "union":
        return inner[0] | inner[1]
    if n.op in ("select", "exclude"):
        keep = n.op == "select"
        pats = n.attr("patterns")
        return {k: v for k, v in inner[0].items()
                if any(match_key(p, k) for p in pats) == keep}
    if not inner:
        return {}
    keys = set(inner[0]).intersection(*inner[1:])
    return {k: tuple(dict.fromkeys(s for src in inner for s in src[k])) for k in sorted(keys)}


def _runs(per_layer: dict[int, list[tuple[str, int]]]) -> list[dict]:
    """Consecutive output layers whose sources are the next layers of the same inputs, as one
    run."""
    runs: list[dict] = []
    for i in sorted(per_layer):
        srcs = per_layer[i]
        last = runs[-1] if runs else None
        if last is not None and last["out"][1] == i - 1 and \
                [s[0] for s in last["from"]] == [s[0] for s in srcs] and \
                all(s[2] == j - 1 for s, (_, j) in zip(last["from"], srcs)):
            last["out"][1] = i
            for s, (_, j) in zip(last["from"], srcs):
                s[2] = j
        else:
            runs.append({"out": [i, i], "from": [[name, j, j] for name, j in srcs]})
    return runs


def render(m: dict) -> list[str]:
    """The plan text's lines for one save's layer map."""
    def span(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}-{hi}"
    out = [f"    layer map ({m['layers']} layers, {m['container']}):"]
    for run in m["map"]:
        srcs = " + ".join(f"{name} {span(lo, hi)}" for name, lo, hi in run["from"])
        out.append(f"      {span(*run['out']):<9} <- {srcs}")
    return out
