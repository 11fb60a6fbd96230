"""Helpers shared by the merge kernels: cluster checks, element chunking, fp64 Gram matrices."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from karmixlang.plan import outofcore

# Cluster-wide element-wise work (a stack of N members, its sort indices, fp64 copies) runs
# over slices of the flattened key so that its temporaries stay bounded whatever the key's
# size. Slices are a power of two long (outofcore.slice_step), so an out-of-core chunk (also a
# power of two, runtime/chunked.py) splits into exactly the slices of the in-memory run.

# From this many rows a CPU Gram product runs as numpy's `a @ a.T`, which BLAS computes as a
# symmetric rank-k update (syrk: half the products of a general one); below it syrk's
# blocking costs more than it saves and torch's general product is faster.
_SYRK_ROWS = 32


def check_cluster(members: Sequence[Tensor], weights: Sequence[float]) -> list[float]:
    """The weights as floats, after checking the cluster is non-empty, weighted and uniform."""
    if not members:
        raise ValueError("a cluster needs at least one member")
    if len(weights) != len(members):
        raise ValueError(f"{len(members)} members but {len(weights)} weights")
    ws = [float(w) for w in weights]
    if not all(math.isfinite(w) and w > 0 for w in ws):
        raise ValueError(f"cluster weights must be positive and finite, got {ws}")
    shape = members[0].shape
    if any(m.shape != shape for m in members):
        raise ValueError(f"cluster members differ in shape: {[tuple(m.shape) for m in members]}")
    return ws


def flat_slices(n: int, rows: int = 1) -> Iterator[slice]:
    """Slices covering range(n), sized so that `rows` stacked slices stay near
    outofcore.KERNEL_SLICE_ELEMS elements."""
    step = outofcore.slice_step(rows)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def gram(xs: Sequence[Tensor], center: Tensor | None = None) -> Tensor:
    """fp64 Gram matrix G[i, j] = <x_i - center, x_j - center> of the flattened tensors, on CPU.

    Accumulated in fp64 chunk by chunk (an fp32 product is exact in fp64), so norms and
    cosines keep full precision without an fp64 copy of the whole key. Centring (on the base,
    or near the answer) removes the common component that would otherwise dominate the sums.
    """
    acc = GramSum(len(xs))
    acc.add(xs, center)
    return acc.result()


class GramSum:
    """A Gram matrix summed over consecutive pieces of the flattened tensors: one piece for
    a whole key, or one per out-of-core chunk (the same slices, hence the same sums)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.g: Tensor | None = None
        # The fp64 copy of one slice of every member, reused: a fresh one per slice is a
        # fresh mapping, zero-filled page by page, and cost more than the product at small N.
        self._block: Tensor | None = None

    def add(self, xs: Sequence[Tensor], center: Tensor | None = None) -> None:
        flats = [x.reshape(-1) for x in xs]
        ref = center.reshape(-1) if center is not None else None
        device = flats[0].device
        if self.g is None:
            self.g = torch.zeros(self.rows, self.rows, dtype=torch.float64, device=device)
        width = min(outofcore.slice_step(self.rows), flats[0].numel())
        if self._block is None or self._block.shape[1] < width:
            self._block = torch.empty(self.rows, width, dtype=torch.float64, device=device)
        # numpy's view of the sum when it is added there (the same memory as self.g)
        g = self.g.numpy() if device.type == "cpu" and self.rows >= _SYRK_ROWS else None
        for sl in flat_slices(flats[0].numel(), self.rows):
            block = self._block[:, : sl.stop - sl.start]
            for row, f in zip(block, flats):
                row.copy_(f[sl])
            if ref is not None:
                block -= ref[sl]
            if g is not None:
                a = block.numpy()
                g += a @ a.T
            else:
                self.g += block @ block.T

    def result(self) -> Tensor:
        g = self.g if self.g is not None else torch.zeros(self.rows, self.rows,
                                                           dtype=torch.float64)
        # The small iterations that use G run on the CPU: G is N x N, and convergence tests
        # need host values anyway.
        return ((g + g.T) / 2).cpu()


def combine(xs: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """Σ coeffs[i] · xs[i] in the dtype of the inputs, as a new tensor."""
    out = xs[0] * coeffs[0]
    for x, c in zip(xs[1:], coeffs[1:]):
        out.add_(x, alpha=c)
    return out
