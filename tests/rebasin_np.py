"""An independent numpy reference of weight matching ("Git Re-Basin", Ainsworth, Hayase and
Srinivasa 2022, arXiv 2209.04836, section 3.2 and Algorithm 1), for the tests.

Written from the paper, not from kmx's runtime. A spec is a set of permutation groups; each
group permutes the units (hidden channels, heads) that some axes of some tensors share:

- an entry `(key, axis)` permutes the whole axis; `(key, axis, start, stop)` only the range
  [start, stop) of it (a fused tensor: Flux's qkv, GEGLU's two halves), the rest stays put;
  `(key, axis, start, stop, of)`: that range written for an axis `of` long, scaled to the
  axis's real length;
- a group without constraint is any permutation of its n units (every entry's range has n);
- `blocks=G, inner="free"`: the n units are G contiguous blocks (GroupNorm's groups), a block
  goes onto a whole block, and the order inside it is free — the permutation is a block
  permutation plus one inner permutation per block (every entry's range has the same n);
- `blocks=G, inner="fixed"`: whole blocks (attention heads, RoPE keeps the order inside a
  head) move, the inside is kept; each entry's range is cut into G equal blocks, so ranges
  may differ in length (grouped-query attention: q's blocks hold g heads, k's one).

A permutation of a group is `Perm(block, inner)`: output block i is taken from input block
`block[i]`, and inside it output position k from input position `inner[i, k]` (`inner` None:
the order inside is kept; a group without constraint is G = n blocks of one unit).

Weight matching (permute B so that it matches A) is coordinate descent: the groups in a
seeded random order, each solving the linear assignment that maximises sum <A, P(B)> over its
entries with every other axis of B taken as permuted so far, until a sweep changes nothing.
All arithmetic is float64.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Entry:
    key: str
    axis: int
    start: int | None = None  # None: the whole axis
    stop: int | None = None
    of: int | None = None  # the range is written for an axis this long

    def bounds(self, shape: tuple[int, ...]) -> tuple[int, int]:
        start = 0 if self.start is None else self.start
        stop = shape[self.axis] if self.stop is None else self.stop
        if self.of is not None:  # the same fraction of an axis of another length
            scale = Fraction(shape[self.axis], self.of)
            start, stop = start * scale, stop * scale
            assert start.denominator == stop.denominator == 1, (self, shape)
        return int(start), int(stop)


@dataclass(frozen=True)
class Group:
    name: str
    entries: tuple[Entry, ...]
    blocks: int | None = None  # None: no constraint
    inner: str = "free"  # with blocks: "free" (GroupNorm groups) or "fixed" (heads)


@dataclass(frozen=True)
class Perm:
    block: np.ndarray  # (G,) int
    inner: np.ndarray | None  # (G, b) int, or None: order inside each block kept

    def indices(self, length: int) -> np.ndarray:
        """The gather index over a range of `length` units: out[j] = in[indices[j]]."""
        g = len(self.block)
        if length % g:
            raise ValueError(f"a range of {length} does not split into {g} blocks")
        b = length // g
        inside = np.broadcast_to(np.arange(b), (g, b)) if self.inner is None else self.inner
        if inside.shape != (g, b):
            raise ValueError(f"inner permutations of {inside.shape[1]} for blocks of {b}")
        return (self.block[:, None] * b + inside).reshape(-1)


# ---------------------------------------------------------------- specs


def parse_spec(spec: Mapping | str) -> list[Group]:
    """Groups of a spec in the JSON format: {"permutations": {NAME: [[KEY, AXIS(, START, STOP)],
    ...]}, "constraints": {NAME: {"blocks": G, "inner": "free"|"fixed"}}} (constraints
    optional). A path or JSON text is read first."""
    if isinstance(spec, str):
        spec = json.loads(open(spec).read() if not spec.lstrip().startswith("{") else spec)
    constraints = spec.get("constraints", {})
    groups = []
    for name, entries in spec["permutations"].items():
        c = constraints.get(name, {})
        groups.append(
            Group(
                name,
                tuple(Entry(*e) for e in entries),
                blocks=c.get("blocks"),
                inner=c.get("inner", "free"),
            )
        )
    return groups


def expand_layers(spec: Mapping, keys: Iterable[str], placeholder: str = "{layer}") -> dict:
    """A spec whose names and keys hold `placeholder` made concrete for every layer number that
    the model's `keys` have (a model of any depth): one group per layer."""
    keys = set(keys)
    out = {"permutations": {}, "constraints": {}}
    for name, entries in spec["permutations"].items():
        if placeholder not in name:
            out["permutations"][name] = entries
            if name in spec.get("constraints", {}):
                out["constraints"][name] = spec["constraints"][name]
            continue
        pattern = re.compile(re.escape(entries[0][0]).replace(re.escape(placeholder), r"(\d+)"))
        layers = sorted({int(m[1]) for k in keys if (m := pattern.fullmatch(k))})
        for n in layers:
            concrete = name.replace(placeholder, str(n))
            out["permutations"][concrete] = [
                [e[0].replace(placeholder, str(n)), *e[1:]] for e in entries
            ]
            if name in spec.get("constraints", {}):
                out["constraints"][concrete] = spec["constraints"][name]
    return out


def _length(e: Entry, shape: tuple[int, ...]) -> int:
    start, stop = e.bounds(shape)
    return stop - start


def group_shape(group: Group, params: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(G, b): blocks and units per block of a group in a model; for inner="fixed" b is that
    of the first entry (the others may differ)."""
    lengths = [_length(e, params[e.key].shape) for e in group.entries]
    if group.blocks is None:
        if len(set(lengths)) != 1:
            raise ValueError(f"{group.name}: ranges of different lengths {sorted(set(lengths))}")
        return lengths[0], 1
    if group.inner == "free" and len(set(lengths)) != 1:
        raise ValueError(f"{group.name}: ranges of different lengths {sorted(set(lengths))}")
    if any(n % group.blocks for n in lengths):
        raise ValueError(f"{group.name}: a range does not split into {group.blocks} blocks")
    return group.blocks, lengths[0] // group.blocks


# ---------------------------------------------------------------- permutations


def identity(group: Group, params: Mapping[str, np.ndarray]) -> Perm:
    g, b = group_shape(group, params)
    free = group.blocks is not None and group.inner == "free"
    inner = np.tile(np.arange(b), (g, 1)) if free else None
    return Perm(np.arange(g), inner)


def random_perm(group: Group, params: Mapping[str, np.ndarray], rng: np.random.Generator) -> Perm:
    """A uniformly random permutation allowed by the group's constraint."""
    g, b = group_shape(group, params)
    inner = None
    if group.blocks is not None and group.inner == "free":
        inner = np.stack([rng.permutation(b) for _ in range(g)])
    return Perm(rng.permutation(g), inner)


def inverse(p: Perm) -> Perm:
    block = np.argsort(p.block)
    inner = None if p.inner is None else np.argsort(p.inner[block], axis=1)
    return Perm(block, inner)


def same(p: Perm, q: Perm) -> bool:
    n = len(p.block) * (1 if p.inner is None else p.inner.shape[1])
    return bool(np.array_equal(p.indices(n), q.indices(n)))


def apply(
    params: Mapping[str, np.ndarray],
    groups: Iterable[Group],
    perms: Mapping[str, Perm],
    skip: tuple[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """params with every group's permutation applied to its entries (new arrays; keys no
    group names are shared unchanged); `skip`: a (key, axis) left as it is."""
    out = dict(params)
    for group in groups:
        p = perms[group.name]
        for e in group.entries:
            if (e.key, e.axis) == skip:
                continue
            x = np.array(out[e.key], copy=True) if out[e.key] is params[e.key] else out[e.key]
            start, stop = e.bounds(x.shape)
            index = [slice(None)] * x.ndim
            index[e.axis] = slice(start, stop)
            x[tuple(index)] = np.take(x, start + p.indices(stop - start), axis=e.axis)
            out[e.key] = x
    return out


# ---------------------------------------------------------------- weight matching


def _rows(x: np.ndarray, e: Entry) -> np.ndarray:
    """The entry's range of x as rows (one per unit) of float64."""
    start, stop = e.bounds(x.shape)
    x = np.moveaxis(np.asarray(x, dtype=np.float64), e.axis, 0)[start:stop]
    return x.reshape(stop - start, -1)


def _costs(group, a, b, by_key, perms) -> np.ndarray:
    """The group's (G, b, G, b) cost tensor: sum over entries of <A unit, B unit> with B's
    other axes permuted as far as known (for inner="fixed" and no constraint b = 1)."""
    g, bsize = group_shape(group, a)
    free = group.blocks is not None and group.inner == "free"
    cost = np.zeros((g, bsize, g, bsize) if free else (g, 1, g, 1))
    for e in group.entries:
        other = apply({e.key: b[e.key]}, by_key[e.key], perms, skip=(e.key, e.axis))
        m = _rows(a[e.key], e) @ _rows(other[e.key], e).T
        eb = m.shape[0] // g
        m = m.reshape(g, eb, g, eb)
        if free:
            cost += m
        else:  # whole blocks, position k onto position k
            cost[:, 0, :, 0] += np.einsum("ikjk->ij", m)
    return cost


def _by_key(groups: list[Group]) -> dict[str, list[Group]]:
    """For each key, the groups that permute it, each cut down to its entries on that key."""
    out: dict[str, list[Group]] = {}
    for gr in groups:
        for key in dict.fromkeys(e.key for e in gr.entries):
            entries = tuple(e for e in gr.entries if e.key == key)
            out.setdefault(key, []).append(Group(gr.name, entries, gr.blocks, gr.inner))
    return out


def _solve(cost: np.ndarray, free: bool) -> tuple[Perm, float]:
    """The best permutation for a cost tensor and its value."""
    g, bsize = cost.shape[0], cost.shape[1]
    if not free or bsize == 1:
        _, col = linear_sum_assignment(cost[:, 0, :, 0], maximize=True)
        inner = np.zeros((g, 1), dtype=np.int64) if free else None
        return Perm(col, inner), float(cost[np.arange(g), 0, col, 0].sum())
    value = np.empty((g, g))
    inner = np.empty((g, g, bsize), dtype=np.int64)
    for i in range(g):
        for j in range(g):
            _, col = linear_sum_assignment(cost[i, :, j, :], maximize=True)
            inner[i, j] = col
            value[i, j] = cost[i, np.arange(bsize), j, col].sum()
    _, block = linear_sum_assignment(value, maximize=True)
    return Perm(block, inner[np.arange(g), block]), float(value[np.arange(g), block].sum())


def _value(cost: np.ndarray, p: Perm) -> float:
    g, bsize = cost.shape[0], cost.shape[1]
    inner = np.zeros((g, 1), dtype=np.int64) if p.inner is None else p.inner
    rows = np.arange(g)[:, None]
    return float(cost[rows, np.arange(bsize)[None, :], p.block[:, None], inner].sum())


def _one_blas_thread():
    """The cost matrices are many small products, for which BLAS threads only contend (30x
    slower on a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def weight_matching(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    groups: list[Group],
    iterations: int = 100,
    seed: int = 0,
    init: Mapping[str, Perm] | None = None,
) -> tuple[dict[str, Perm], int]:
    """The permutations that bring B's units in line with A's (apply(b, groups, result) ~ a),
    and the number of sweeps made. A group's permutation changes only where the assignment
    improves the objective (by more than rounding), so the descent ends."""
    with _one_blas_thread():
        return _descend(a, b, groups, iterations, seed, init)


def _descend(a, b, groups, iterations, seed, init):
    perms = dict(init) if init else {gr.name: identity(gr, b) for gr in groups}
    by_key = _by_key(groups)
    rng = np.random.default_rng(seed)
    for sweep in range(1, iterations + 1):
        changed = False
        for i in rng.permutation(len(groups)):
            group = groups[i]
            cost = _costs(group, a, b, by_key, perms)
            free = group.blocks is not None and group.inner == "free"
            best, new = _solve(cost, free)
            old = _value(cost, perms[group.name])
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[group.name] = best
                changed = True
        if not changed:
            return perms, sweep
    return perms, iterations
