"""Weight matching (docs/rebasin.md): phase one finds the permutations, phase two applies them
to one key at a time.

Phase one is coordinate descent over the spec's groups in a seeded random order: a group's
cost tensor is accumulated in float64 from its keys, read one at a time (kept in memory while
they fit `cache_bytes`, read again otherwise), and solved with scipy's linear_sum_assignment.
Sums run in a fixed order on one torch thread, so the result is the same on every machine
and for any --threads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.rebasin_spec import Axis, Sized
from karmixlang.plan.executable import Executable, Step
from karmixlang.plan.rebasin import ident
from karmixlang.runtime.allocator import tune_allocator
from karmixlang.runtime.tensors import Reader as TensorReader

# Columns of a key multiplied at once: bounds the float64 copies of a wide key (Flux's
# 3072 x 12288 MLP) to a few tens of MB while its cost is accumulated.
COLUMNS = 1 << 12
# phase one: blocks from 1 MiB up are mappings of their own, returned to the system when freed
PHASE_ONE_MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class Perm:
    """Output block i comes from input block `block[i]`, its position k from `inner[i, k]`
    (None: the order inside a block is kept; a group without constraint has one unit a block)."""

    block: np.ndarray
    inner: np.ndarray | None = None

    def indices(self, length: int) -> np.ndarray:
        """The gather index over a range of `length` units: out[j] = in[indices[j]]."""
        g = len(self.block)
        b = length // g
        inside = np.broadcast_to(np.arange(b), (g, b)) if self.inner is None else self.inner
        return (self.block[:, None] * b + inside).reshape(-1)

    def to_list(self) -> list:
        return [self.block.tolist(), None if self.inner is None else self.inner.tolist()]

    @staticmethod
    def from_list(v: list) -> "Perm":
        block, inner = v
        return Perm(np.asarray(block, dtype=np.int64),
                    None if inner is None else np.asarray(inner, dtype=np.int64))


def identity(s: Sized) -> Perm:
    b = s.size // s.blocks
    return Perm(np.arange(s.blocks), np.tile(np.arange(b), (s.blocks, 1)) if s.free_inner
                else None)


def permute(t: torch.Tensor, moves: list[tuple[Axis, Perm]]) -> torch.Tensor:
    """t with each (axis or range, permutation) applied: out[..i..] = t[..P[i]..] along it."""
    for a, p in moves:
        start, stop = a.bounds(tuple(t.shape))
        index = torch.from_numpy(start + p.indices(stop - start)).to(t.device)
        if start == 0 and stop == t.shape[a.axis]:
            t = t.index_select(a.axis, index)
        else:
            t = t.clone()
            t.narrow(a.axis, start, stop - start).copy_(t.index_select(a.axis, index))
    return t


Reader = Callable[[str], torch.Tensor]


class _Keys:
    """Tensors of one model by key, kept while they fit a byte budget."""

    def __init__(self, read: Reader, budget: int):
        self.read, self.budget, self.kept = read, budget, {}
        self.reads = 0

    def __call__(self, key: str) -> torch.Tensor:
        t = self.kept.get(key)
        if t is None:
            t = self.read(key)
            self.reads += 1
            if t.numel() * t.element_size() <= self.budget:
                self.budget -= t.numel() * t.element_size()
                self.kept[key] = t
        return t


@dataclass
class Matched:
    perms: dict[str, Perm]
    passes: int  # passes over the groups
    reads: int  # tensors read from the files (the same key counts again when re-read)


def match(groups: list[Sized], read_to: Reader, read_from: Reader, iterations: int, seed: int,
          cache_bytes: int = 0, label: str = "weight matching") -> Matched:
    """The permutations that bring FROM's units in line with TO's."""
    perms = {s.group.name: identity(s) for s in groups}
    touching: dict[str, list[tuple[Axis, str]]] = {}
    for s in groups:
        for a in s.group.axes:
            touching.setdefault(a.key, []).append((a, s.group.name))
    to_keys, from_keys = _Keys(read_to, cache_bytes // 2), _Keys(read_from, cache_bytes // 2)
    rng = np.random.default_rng(seed)
    passes = 0
    for passes in range(1, iterations + 1):
        changed = False
        for i in rng.permutation(len(groups)):
            s = groups[i]
            cost = _cost(s, to_keys, from_keys, touching, perms)
            if not np.isfinite(cost).all():
                raise KmxError([error(
                    "K0413", f"{label}: the costs of permutation \"{s.group.name}\" are not "
                    "finite (NaN or Inf in a key it reads, or an overflow)",
                    help="find the key with NaN or Inf (K0401 names it in a plain merge); leave the group out with "
                         "`groups=[...]`")])
            best, new = _solve(cost, s.free_inner)
            old = _value(cost, perms[s.group.name])
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[s.group.name] = best
                changed = True
        if not changed:
            break
    return Matched(perms, passes, to_keys.reads + from_keys.reads)


def _cost(s: Sized, to_keys, from_keys, touching, perms) -> np.ndarray:
    """(G, b, G, b) for free blocks, else (G, 1, G, 1): Σ over the group's axes of <TO unit,
    FROM unit>, FROM's other axes permuted as far as known."""
    g, b = s.blocks, s.size // s.blocks
    cost = torch.zeros((g, b, g, b) if s.free_inner else (g, 1, g, 1), dtype=torch.float64)
    for a in s.group.axes:
        moves = [(x, perms[name]) for x, name in touching[a.key] if x != a]
        m = _gram(_rows(to_keys(a.key), a), _rows(permute(from_keys(a.key), moves), a))
        eb = m.shape[0] // g
        m = m.reshape(g, eb, g, eb)
        if s.free_inner:
            cost += m
        else:  # whole blocks: position k onto position k
            cost[:, 0, :, 0] += torch.einsum("ikjk->ij", m)
    return cost.numpy()


def _rows(t: torch.Tensor, a: Axis) -> torch.Tensor:
    start, stop = a.bounds(tuple(t.shape))
    return t.movedim(a.axis, 0)[start:stop].reshape(stop - start, -1)


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y.T in float64, a slice of columns at a time."""
    out = torch.zeros((x.shape[0], y.shape[0]), dtype=torch.float64)
    for c in range(0, x.shape[1], COLUMNS):
        out += x[:, c:c + COLUMNS].double() @ y[:, c:c + COLUMNS].double().T
    return out


def _solve(cost: np.ndarray, free: bool) -> tuple[Perm, float]:
    """The best permutation for a cost tensor and its value. Free blocks: the best inner
    assignment of every block pair scores the pair, then the best block assignment."""
    # Imported here: scipy.optimize costs every `kmx run` ~0.3 s of start-up, and only
    # re-basin needs it.
    from scipy.optimize import linear_sum_assignment

    g, b = cost.shape[0], cost.shape[1]
    if not free:
        _, col = linear_sum_assignment(cost[:, 0, :, 0], maximize=True)
        return Perm(col.astype(np.int64)), float(cost[np.arange(g), 0, col, 0].sum())
    value = np.empty((g, g))
    inner = np.empty((g, g, b), dtype=np.int64)
    for i in range(g):
        for j in range(g):
            _, col = linear_sum_assignment(cost[i, :, j, :], maximize=True)
            inner[i, j] = col
            value[i, j] = cost[i, np.arange(b), j, col].sum()
    _, block = linear_sum_assignment(value, maximize=True)
    return Perm(block.astype(np.int64), inner[np.arange(g), block]), \
        float(value[np.arange(g), block].sum())


def _value(cost: np.ndarray, p: Perm) -> float:
    g, b = cost.shape[0], cost.shape[1]
    inner = np.zeros((g, 1), dtype=np.int64) if p.inner is None else p.inner
    return float(cost[np.arange(g)[:, None], np.arange(b)[None, :], p.block[:, None], inner].sum())


# ------------------------------------------------------------------ in a run

def solve_all(exe: Executable, reader: TensorReader) -> Executable:
    """Phase one: the executable with every planned permutation solved (as it is when it has
    none, or they are solved already)."""
    if len(exe.solved) == len(exe.permutations):
        return exe
    # Phase one keeps keys for the whole phase among short-lived float64 copies. Served from the
    # heap, the copies' freed holes fragmented it: resident memory grew to ~2.4x what was live
    # (a half-size SDXL UNet pair: 6.1 GB for 2.6 GB). Big blocks as their own mappings instead.
    tune_allocator(mmap_threshold=PHASE_ONE_MMAP_THRESHOLD)
    try:
        solved = {}
        for i, plan in enumerate(exe.permutations):
            model, to = dict(plan.model), dict(plan.to)
            path, to_path, _, iterations, seed, _ = plan.ident
            found = match(list(plan.groups), lambda k: reader.read(to[k]),
                          lambda k: reader.read(model[k]), iterations, seed, plan.cache_bytes,
                          f"aligning `{path}` to `{to_path}`")
            solved[i] = {name: p.to_list() for name, p in found.perms.items()}
    finally:
        tune_allocator()
    return replace(exe, solved=solved)


class Applier:
    """Phase two for one evaluator: a permute step's moves of one key."""

    def __init__(self, exe: Executable):
        self.exe = exe
        self.index = {plan.ident: i for i, plan in enumerate(exe.permutations)}
        self.tables: dict[int, dict[str, list[tuple[Axis, Perm]]]] = {}

    def __call__(self, step: Step, key: str, t: torch.Tensor) -> torch.Tensor:
        i = self.index[ident(step)]
        if i not in self.tables:
            perms = {name: Perm.from_list(v) for name, v in self.exe.solved[i].items()}
            table: dict[str, list[tuple[Axis, Perm]]] = {}
            for s in self.exe.permutations[i].groups:
                for a in s.group.axes:
                    table.setdefault(a.key, []).append((a, perms[s.group.name]))
            self.tables[i] = table
        return permute(t, self.tables[i].get(key, []))
