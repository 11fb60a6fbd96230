"""Helpers shared by the merge kernels: cluster checks, element chunking, fp64 Gram matrices."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# Cluster-wide element-wise work (a stack of N members, its sort indices, fp64 copies) runs
# over slices of the flattened key so that its temporaries stay near this many elements
# whatever the key's size.
_CHUNK_ELEMS = 1 << 24
_MIN_CHUNK = 1 << 16


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
    """Slices covering range(n), sized so that `rows` stacked slices stay near _CHUNK_ELEMS."""
    step = max(_MIN_CHUNK, _CHUNK_ELEMS // max(rows, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def gram(xs: Sequence[Tensor], center: Tensor | None = None) -> Tensor:
    """fp64 Gram matrix G[i, j] = <x_i - center, x_j - center> of the flattened tensors, on CPU.

    Accumulated in fp64 chunk by chunk (an fp32 product is exact in fp64), so norms and
    cosines keep full precision without an fp64 copy of the whole key. Centring (on the base,
    or near the answer) removes the common component that would otherwise dominate the sums.
    """
    flats = [x.reshape(-1) for x in xs]
    ref = center.reshape(-1) if center is not None else None
    g = torch.zeros(len(xs), len(xs), dtype=torch.float64, device=flats[0].device)
    for sl in flat_slices(flats[0].numel(), len(xs)):
        block = torch.stack([f[sl] for f in flats]).to(torch.float64)
        if ref is not None:
            block -= ref[sl].to(torch.float64)
        g += block @ block.T
    # The small iterations that use G run on the CPU: G is N x N, and convergence tests need
    # host values anyway.
    return ((g + g.T) / 2).cpu()


def combine(xs: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """Σ coeffs[i] · xs[i] in the dtype of the inputs, as a new tensor."""
    out = xs[0] * coeffs[0]
    for x, c in zip(xs[1:], coeffs[1:]):
        out.add_(x, alpha=c)
    return out
