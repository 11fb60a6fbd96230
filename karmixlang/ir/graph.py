"""The graph IR: interned, immutable nodes (building the same subexpression twice returns the
same object, so common subexpressions are shared as the graph is built), and a Graph of the
saves over them, held in networkx for the graph algorithms.

Ops (all key-wise):
  load(path)                      a checkpoint input
  lincomb(x1..xn; coeffs)         Σ cᵢ·xᵢ (every +, -, *, / of models and deltas)
  zeros_like(x)                   a zero delta with x's keys and shapes
  select(x; patterns) / exclude(x; patterns)
  union(x, y)                     key-wise union, y wins
  pick(s; index)                  one member of a cluster filter's result (elect, ties)
  <kernel>(inputs; params)        a method of builtins.py (mean, della, geometric_median, ...)
What each op is (linear, alias, seeded, how it chunks, its workspace, its kernel): ops.OPS.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import networkx as nx

from karmixlang.blocks import slot_of
from karmixlang.diagnostics import Span

T = TypeVar("T")


@dataclass(frozen=True)
class KeyMap:
    """A number that depends on the tensor key: by_key rules or MBW block weights."""
    kind: str  # "by_key" | "blocks"
    rules: tuple[tuple[str, float], ...]  # (pattern or slot, value), first match wins
    arch: str | None = None
    default: float | None = None

    def at(self, key: str) -> float:
        if self.kind == "by_key":
            for pattern, value in self.rules:
                if match_key(pattern, key):
                    return value
            raise KeyError(key)
        # A key outside the given slots takes `default=`, else the BASE weight (supermerger's
        # "base alpha" for everything that is not a UNet block).
        slot = slot_of(self.arch, key)
        rules = dict(self.rules)
        if slot in rules:
            return rules[slot]
        if self.default is not None:
            return self.default
        if "BASE" in rules:
            return rules["BASE"]
        raise KeyError(key)

    def describe(self) -> str:
        if self.kind == "by_key":
            return "by_key{" + ", ".join(f"{p!r}: {v:g}" for p, v in self.rules) + "}"
        return f"blocks({self.arch!r}, {len(self.rules)} slots, default={self.default})"


def match_key(pattern: str, key: str) -> bool:
    """`*` crosses dots (fnmatch); a pattern starting with `re:` is a regular expression."""
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).search(key) is not None
    return fnmatch.fnmatchcase(key, pattern)


_REGEX_CACHE: dict[str, re.Pattern] = {}


def _regex(text: str) -> re.Pattern:
    if text not in _REGEX_CACHE:
        _REGEX_CACHE[text] = re.compile(text)
    return _REGEX_CACHE[text]


@dataclass(frozen=True, eq=False)
class Node:
    """One operation. Compared by identity: the Builder makes structurally equal nodes the
    same object."""
    op: str
    inputs: tuple["Node", ...]
    attrs: tuple[tuple[str, object], ...] = ()

    def attr(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @cached_property
    def signature(self) -> tuple:
        return (self.op, tuple(id(i) for i in self.inputs), self.attrs)

    def __repr__(self) -> str:
        return f"Node({self.op}, {len(self.inputs)} inputs)"


class Builder:
    """Interns nodes and remembers where in the recipe each node was written."""

    def __init__(self):
        self._table: dict[tuple, Node] = {}
        self.origins: dict[Node, list[Span]] = {}
        self.built = 0  # how many nodes the recipe spelled out (before sharing)

    def node(self, op: str, inputs=(), attrs=None, span: Span | None = None) -> Node:
        attrs_t = tuple(sorted((attrs or {}).items()))
        n = Node(op, tuple(inputs), attrs_t)
        n = self._table.setdefault(n.signature, n)
        self.built += 1
        if span is not None:
            spans = self.origins.setdefault(n, [])
            if span not in spans:
                spans.append(span)
        return n


@dataclass(frozen=True)
class SaveSpec:
    path: str  # absolute
    written: str  # as written in the recipe (after interpolation)
    expr: Node
    fallback: Node | None
    fallback_reason: str  # "with fallback=", "the only base", or "" when none
    dtype: str | None  # safetensors dtype, or None: per key from the fallback / first input
    metadata: tuple[tuple[str, str], ...]
    shard: str | None
    delta: bool
    span: Span
    unmatched: str = "error"  # a LoRA module that matches no key: "error" or "warn"
    lora: int | None = None  # extraction: write a LoRA of this rank instead of a checkpoint
    lora_conv: int | None = None  # its rank for 3×3 convs (None: they are left out)
    tokenizer: str | None = None  # `tokenizer=`: "union", or the named model's path


@dataclass
class Graph:
    saves: list[SaveSpec]
    origins: dict[Node, list[Span]]
    names: dict[Node, str] = field(default_factory=dict)  # recipe names for display
    notes: list[str] = field(default_factory=list)  # what the optimizer did, for the plan
    built: int = 0
    extra_roots: list[Node] = field(default_factory=list)  # named values no save uses (DCE)

    def roots(self) -> list[Node]:
        out = []
        for s in self.saves:
            out.append(s.expr)
            if s.fallback is not None:
                out.append(s.fallback)
        return out

    def display_name(self, n: Node) -> str:
        """How the plan and diagnostics name a node: its recipe name, a file, or its op."""
        if n in self.names:
            return self.names[n]
        if n.op == "load":
            return os.path.basename(n.attr("path"))
        return n.op

    def nx(self, include_extra: bool = False) -> nx.DiGraph:
        g = nx.DiGraph()
        for n in reachable(self.roots() + (self.extra_roots if include_extra else [])):
            g.add_node(n)
            g.add_edges_from((i, n) for i in n.inputs)
        return g

    def topo(self) -> list[Node]:
        """Nodes reachable from the saves, inputs first, in a deterministic order: among the
        ready nodes, the one a depth-first walk from the saves meets first."""
        order = {n: i for i, n in enumerate(reachable(self.roots()))}
        return list(nx.lexicographical_topological_sort(self.nx(), key=order.__getitem__))


def fold_up(root: Node, combine: Callable[[Node, list], T]) -> T:
    """`combine(node, its inputs' results)` for every node below `root`, inputs first, each
    node once; the root's result. Iterative: graphs may be deeper than Python's recursion."""
    memo: dict[int, T] = {}
    stack = [root]
    while stack:
        n = stack[-1]
        todo = [i for i in n.inputs if id(i) not in memo]
        if id(n) in memo or todo:
            if id(n) in memo:
                stack.pop()
            stack.extend(todo)
            continue
        stack.pop()
        memo[id(n)] = combine(n, [memo[id(i)] for i in n.inputs])
    return memo[id(root)]


def reachable(roots) -> Iterator[Node]:
    """Every node the roots depend on, once, depth first (inputs in order), root by root."""
    seen: set[int] = set()
    for root in roots:
        stack = [root]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            yield n
            stack.extend(reversed(n.inputs))
