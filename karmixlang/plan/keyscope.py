"""What the optimizer's `laws` pass asks of the inputs' headers (ir/optimize.laws): whether
one node has every key another computes, alike. Read lazily: a graph no law applies to reads
nothing here (the schedule reads the same headers, cached, right after)."""

from __future__ import annotations

from karmixlang.ir.graph import Graph, Node
from karmixlang.plan.loras import plan_loras
from karmixlang.plan.schedule import NodeKeys, node_keys, read_inputs
from karmixlang.plan.views import apply_views


def key_cover(graph: Graph):
    """covers(ref, x) for nodes of `graph`: every key x computes, ref computes too, with the
    same shape and stored dtype."""
    keys: dict[Node, NodeKeys] = {}

    def covers(ref: Node, x: Node) -> bool:
        if not keys:
            headers, _ = apply_views(graph, read_inputs(graph))
            keys.update(node_keys(graph, headers, plan_loras(graph, headers)[0]))
        have, need = keys[ref].ok, keys[x].ok
        return have is need or all(have.get(k) == info for k, info in need.items())
    return covers
