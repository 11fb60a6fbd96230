"""Filters on deltas and TIES sign election (methods.md, "Filters" and "Cluster filters").

Conventions of this module:

- Counts. `density` keeps k = ⌈density·n⌉ entries, so any density > 0 keeps at least one
  (a 0-d key is kept) and density 1 keeps all; `gamma` drops ⌊gamma·n⌋ outliers, so small
  keys lose none to the default gamma = 0.01. A product density·n within 1e-9 (relative) of
  an integer counts as that integer: 0.07·100 keeps 7, not 8, and 0.29·100 is 29, not 28.
- Magnitude order. Entries are ordered by |d| descending, equal magnitudes by flat position
  (the earlier entry counts as larger); `trim` keeps the first k of that order and
  `breadcrumbs` a window of it.
- DELLA ranks. Ordinal, ascending in |d|, equal magnitudes by position (stable sort: the
  earlier entry gets the lower rank); r̂ = rank/(n − 1), and r̂ = 1/2 for a lone entry so it
  gets the nominal keep probability 1 − p. `per_row` ranks within rows of the key seen as
  shape[0] × (the rest); a 1-D or 0-d key is one row.
- Random masks (`dare`, `della`) keep flat element i when u_i < q_i, u from rng.uniform for
  (seed, key, member) and q the keep probability (1 − p for DARE, so DELLA with eps = 0 draws
  the same mask as DARE). Masks do not depend on the compute dtype.
- Elected sign. γ = sign(Σ w_i τ_i) ("mass") or sign(Σ w_i sign(τ_i)) ("count"), the terms
  summed in ascending order so that member order cannot flip the sign of a near-tie.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .ops_base import check_cluster, flat_slices
from .rng import uniform

__all__ = [
    "trim",
    "dare",
    "della",
    "breadcrumbs",
    "clamp",
    "iso",
    "elect",
    "ties",
    "ties_merge",
]

_F64 = torch.float64
_RULES = ("mass", "count")


def _count(fraction: float, n: int, rounding: Callable[[float], int] = math.ceil) -> int:
    """rounding(fraction·n) in [0, n], a float product off an integer by rounding snapped to it."""
    x = fraction * n
    nearest = round(x)
    k = nearest if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else rounding(x)
    return min(n, max(0, k))


def _top_mask(magnitude: Tensor, k: int) -> Tensor:
    """Flat bool mask of the first k entries in magnitude order (see module docstring)."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitude.device)
    threshold = _kth_smallest(magnitude, n - k)  # the k-th largest
    above = magnitude > threshold
    at = magnitude == threshold
    room = k - int(above.sum())
    return above | (at & (torch.cumsum(at, dim=0) <= room))


def _kth_smallest(values: Tensor, index: int) -> Tensor:
    """values sorted ascending, at `index` (0-based). numpy's introselect is ~10× faster than
    torch.kthvalue on the CPU; other devices keep kthvalue."""
    if values.device.type == "cpu":
        return torch.as_tensor(np.partition(values.numpy(), index)[index])
    return torch.kthvalue(values, index + 1).values


def trim(d: Tensor, *, density: float) -> Tensor:
    """Keep the ⌈density·n⌉ entries of largest |d|, zero the rest."""
    keep = _top_mask(d.abs().reshape(-1), _count(density, d.numel()))
    return torch.where(keep.reshape(d.shape), d, 0)


def breadcrumbs(d: Tensor, *, density: float, gamma: float = 0.01) -> Tensor:
    """Zero the top ⌊gamma·n⌋ entries by |d|, then the smallest, leaving ⌈density·n⌉.

    When the two fractions add up to more than 1, fewer top entries are zeroed so that the
    density is met (as mergekit does); density 1 therefore returns the delta unchanged.
    """
    n = d.numel()
    k = _count(density, n)
    n_top = min(_count(gamma, n, math.floor), n - k)
    magnitude = d.abs().reshape(-1)
    keep = _top_mask(magnitude, n_top + k) & ~_top_mask(magnitude, n_top)
    return torch.where(keep.reshape(d.shape), d, 0)


def _random_keep(
    d: Tensor,
    keep_prob: Callable[[slice], float | Tensor],
    *,
    rescale: bool,
    seed: int,
    key: str,
    member: int,
) -> Tensor:
    """d with flat element i kept when u_i < q_i (divided by q_i if rescale), else zero."""
    flat = d.reshape(-1)
    out = torch.empty_like(flat)
    for sl in flat_slices(flat.numel()):
        q = keep_prob(sl)
        u = torch.from_numpy(uniform(seed, key, member, sl.stop - sl.start, sl.start))
        keep = u.to(d.device) < q
        kept = flat[sl]
        if rescale:
            # Only kept entries are selected below, and those have q > u >= 0 (a q of 0
            # elsewhere may give inf there, never selected).
            kept = kept / (q.to(d.dtype) if torch.is_tensor(q) else q)
        out[sl] = torch.where(keep, kept, 0)
    return out.reshape(d.shape)


def dare(
    d: Tensor, *, p: float, seed: int, rescale: bool = True, key: str, member: int
) -> Tensor:
    """Drop each entry with probability p; divide the survivors by 1 − p when rescale."""
    if p >= 1:
        return torch.zeros_like(d)
    return _random_keep(
        d, lambda sl: 1.0 - p, rescale=rescale, seed=seed, key=key, member=member
    )


def della(
    d: Tensor,
    *,
    p: float,
    eps: float,
    seed: int,
    rescale: bool = True,
    per_row: bool = False,
    key: str,
    member: int,
) -> Tensor:
    """MAGPRUNE: keep with q = clamp((1 − p − eps) + 2·eps·r̂, 0, 1), r̂ the magnitude rank."""
    if d.numel() == 0:
        return d.clone()
    rows = d.reshape(d.shape[0], -1) if per_row and d.dim() >= 2 else d.reshape(1, -1)
    width = rows.shape[1]
    ranks = ordinal_ranks(rows.abs()).reshape(-1)

    def keep_prob(sl: slice) -> Tensor:
        if width == 1:
            r_hat = torch.full((sl.stop - sl.start,), 0.5, dtype=_F64, device=d.device)
        else:
            r_hat = ranks[sl].to(_F64) / (width - 1)
        return ((1.0 - p - eps) + (2.0 * eps) * r_hat).clamp_(0.0, 1.0)

    return _random_keep(d, keep_prob, rescale=rescale, seed=seed, key=key, member=member)


def ordinal_ranks(rows: Tensor) -> Tensor:
    """Per row, each entry's ascending rank (0-based), ties broken by position.

    For float32 on the CPU the magnitude's bits (order-preserving for non-negative floats) and
    the position are packed into one int64 and sorted with numpy's SIMD sort: the keys are
    distinct, so the sorted low 32 bits are the stable order — 10–20× faster than a stable
    argsort. Other dtypes and devices take the stable argsort.
    """
    width = rows.shape[1]
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and width < 2**31:
        keys = (rows.contiguous().view(torch.int32).to(torch.int64) << 32) | torch.arange(width)
        order = torch.from_numpy(np.sort(keys.numpy(), axis=1) & 0xFFFFFFFF)
    else:
        order = torch.argsort(rows, dim=1, stable=True)
    positions = torch.arange(width, device=rows.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def clamp(d: Tensor, *, lo: float, hi: float) -> Tensor:
    """Element-wise clamp to [lo, hi]."""
    if lo > hi:
        raise ValueError(f"clamp: lo ({lo}) is above hi ({hi})")
    return torch.clamp(d, min=lo, max=hi)


def iso(d: Tensor, *, z: float = 0.0) -> Tensor:
    """Flatten the singular spectrum toward its mean: S' = mean(S) + z·(S − mean(S)).

    2-D keys directly, conv kernels (and any key of 3 or more dims) as shape[0] × (the rest);
    1-D and 0-d keys, empty keys and z = 1 return the delta unchanged. A zero delta has S = 0
    and stays zero.
    """
    if d.dim() < 2 or d.numel() == 0 or z == 1:
        return d.clone()
    u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
    s64 = s.to(_F64)
    s_mean = s64.mean()
    flat_s = (s_mean + z * (s64 - s_mean)).to(s.dtype)
    return ((u * flat_s) @ vh).reshape(d.shape)


def _elected_sign(members: Sequence[Tensor], ws: list[float], rule: str) -> Tensor:
    if rule not in _RULES:
        raise ValueError(f"unknown election rule {rule!r}; expected one of {_RULES}")
    like = members[0]
    flats = [m.reshape(-1) for m in members]
    out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    for sl in flat_slices(like.numel(), len(members)):
        votes = torch.stack(
            [(f[sl] if rule == "mass" else torch.sign(f[sl])) * w for f, w in zip(flats, ws)]
        )
        out[sl] = _order_free_sign(votes)
    return out.reshape(like.shape)


def _order_free_sign(votes: Tensor) -> Tensor:
    """sign(Σ votes) over dim 0, independent of member order: the sign of the sum in sorted
    order. Sorting every element is slow, so the sum is first taken in any order; where it
    clears the rounding bound of any order, its sign and the sorted sum's are both the exact
    sum's; only the near-ties left (rare) are sorted."""
    n = votes.shape[0]
    # Any summation order errs by at most (n − 1)·eps·Σ|v|; twice that margin (and again for
    # the rounding of the bound itself) leaves only true near-ties to sort.
    total = votes.sum(dim=0)
    bound = votes.abs().sum(dim=0) * (4 * n * torch.finfo(votes.dtype).eps)
    sign = torch.sign(total)
    near = (total.abs() <= bound) & (bound > 0)
    if bool(near.any()):
        idx = near.nonzero().squeeze(1)
        sign[idx] = torch.sign(votes[:, idx].sort(dim=0).values.sum(dim=0))
    return sign


def elect(
    members: Sequence[Tensor], weights: Sequence[float], *, rule: str = "mass"
) -> list[Tensor]:
    """Zero every entry whose sign differs from the elected sign γ (all of them where γ = 0)."""
    gamma = _elected_sign(members, check_cluster(members, weights), rule)
    return [torch.where(torch.sign(x) == gamma, x, 0) for x in members]


def ties(
    members: Sequence[Tensor], weights: Sequence[float], *, density: float, rule: str = "mass"
) -> list[Tensor]:
    """elect([trim(x, density) for x in members], rule)."""
    return elect([trim(x, density=density) for x in members], weights, rule=rule)


def ties_merge(
    members: Sequence[Tensor], weights: Sequence[float], *, rule: str = "mass"
) -> Tensor:
    """Disjoint weighted mean of the members that agree with γ; 0 where none does or γ = 0."""
    ws = check_cluster(members, weights)
    gamma = _elected_sign(members, ws, rule)
    num = torch.zeros_like(members[0])
    den = torch.zeros_like(members[0])
    for x, w in zip(members, ws):
        # A zero entry never agrees with γ != 0; where γ = 0 the numerator is 0 anyway.
        agree = (torch.sign(x) == gamma).to(x.dtype)
        num.addcmul_(x, agree, value=w)
        den.add_(agree, alpha=w)
    # den is 0 (and then num too) or at least the smallest weight: clamping there only turns
    # 0/0 into 0.
    return num.div_(den.clamp_(min=min(ws)))
