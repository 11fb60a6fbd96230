"""Key-wise torch kernels of every merge method (formulas: docs/methods.md).

Every op is a plain function of tensors of one key — already in the compute dtype (fp32 or
fp64), all of one shape (0-d to 4-D conv), on any device — and Python scalars. It returns a
new tensor (or a list of them for cluster filters) and never writes into its inputs. A
cluster is `members: list[Tensor]` with `weights: list[float]` (positive). Small reductions
(norms, Gram matrices, cosines) accumulate in fp64; everything else stays in the input dtype.
Non-finite inputs are the executor's business, not checked here.

This module holds the interpolations and the Gram splits, and re-exports the rest:
- base.combine(xs, coeffs): Σ coeffs[i]·xs[i], the executor's linear combinations;
- centers: mean, sum_, median, geometric_median, model_stock, karcher;
- sparse: trim, dare, della, breadcrumbs, clamp, iso, elect, ties, ties_merge;
- rng: the counter-based uniforms behind dare and della.
The runtime finds a kernel by its op's name in table.KERNELS (and a Gram method's split in
table.GRAM_SPLITS), never by attribute lookup.
Each module's docstring states the conventions (rounding of counts, tie rules, the weighted
median, the random scheme) that methods.md leaves to the implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from karmixlang.runtime.kernels.base import combine, gram
from karmixlang.runtime.kernels.centers import (geometric_median, geometric_median_coeffs, geometric_median_start,
                          karcher, karcher_apply, karcher_coeffs, mean, median, model_stock,
                          model_stock_apply, model_stock_ratio, sum_)
from karmixlang.runtime.kernels.sparse import breadcrumbs, clamp, dare, della, elect, iso, ties, ties_merge, trim

__all__ = [
    "combine",
    "lerp",
    "slerp",
    "add_difference",
    "train_difference",
    "mean",
    "sum_",
    "median",
    "geometric_median",
    "model_stock",
    "karcher",
    "ties_merge",
    "trim",
    "dare",
    "della",
    "breadcrumbs",
    "clamp",
    "iso",
    "elect",
    "ties",
    "zeros_like",
]

# slerp falls back to lerp for nearly (anti)parallel inputs and for near-zero norms, as
# mergekit does: sin Ω is then too small to divide by.
_SLERP_DOT_LIMIT = 0.9995
_SLERP_MIN_NORM = 1e-8


def lerp(a: Tensor, b: Tensor, *, t: float) -> Tensor:
    """(1 − t)·a + t·b."""
    return a * (1.0 - t) + b * t


def slerp(a: Tensor, b: Tensor, *, t: float) -> Tensor:
    """Spherical interpolation of the flattened tensors (magnitudes interpolate with them)."""
    return slerp_apply(a, b, t, slerp_coeffs(gram([a, b]), t))


def slerp_coeffs(g: Tensor, t: float) -> list[float] | None:
    """The coefficients of a and b from their Gram matrix; None: interpolate linearly."""
    norm_a, norm_b = math.sqrt(float(g[0, 0])), math.sqrt(float(g[1, 1]))
    if min(norm_a, norm_b) < _SLERP_MIN_NORM:
        return None
    dot = float(g[0, 1]) / (norm_a * norm_b)
    if abs(dot) > _SLERP_DOT_LIMIT:
        return None
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return [math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega]


def slerp_apply(a: Tensor, b: Tensor, t: float, coeffs: list[float] | None) -> Tensor:
    return lerp(a, b, t=t) if coeffs is None else combine([a, b], coeffs)


@dataclass(frozen=True)
class GramSplit:
    """A method whose result is a combination of its inputs with coefficients found from
    their Gram matrix, split for out-of-core keys (runtime/chunked.py): `rows(args)` are the
    tensors whose Gram matrix is accumulated over chunks, centred on `center(args, kwargs)`
    (None: uncentred); `solve(g, args, kwargs)` turns it into the function that forms the
    result from a chunk of each input. Arguments are the kernel's own (table.GRAM_SPLITS)."""

    rows: Callable[[list], list[Tensor]]
    center: Callable[[list, dict], Tensor | None]
    solve: Callable[[Tensor, list, dict], Callable]


def members_rows(args) -> list[Tensor]:
    return list(args[0])


def pair_rows(args) -> list[Tensor]:
    return list(args[:2])


def uncentred(args, kwargs) -> None:
    return None


def slerp_solve(g: Tensor, args, kwargs):
    coeffs = slerp_coeffs(g, kwargs["t"])
    return lambda a, b, **_: slerp_apply(a, b, kwargs["t"], coeffs)


def geometric_median_center(args, kwargs) -> Tensor:
    return combine(args[0], geometric_median_start([float(w) for w in args[1]]))


def geometric_median_solve(g: Tensor, args, kwargs):
    ws = [float(w) for w in args[1]]
    coeffs = geometric_median_coeffs(g, ws, **_defaults(geometric_median, kwargs))
    return lambda members, weights, **_: combine(members, coeffs)


def model_stock_center(args, kwargs) -> Tensor:
    return args[2]


def model_stock_solve(g: Tensor, args, kwargs):
    ws = [float(w) for w in args[1]]
    t = model_stock_ratio(g, len(ws))
    return lambda members, weights, base: model_stock_apply(members, ws, base, t)


def karcher_solve(g: Tensor, args, kwargs):
    ws = [float(w) for w in args[1]]
    if len(ws) == 1:
        return lambda members, weights, **_: members[0].clone()
    plan = karcher_coeffs(g, ws, **_defaults(karcher, kwargs))
    return lambda members, weights, **_: karcher_apply(members, plan)


def _defaults(fn, kwargs: dict) -> dict:
    """The keyword arguments `fn` would use: its defaults, overridden by `kwargs`."""
    return {**(fn.__kwdefaults__ or {}), **kwargs}


def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """a + alpha·(b − c)."""
    return a + (b - c) * alpha


def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """a + 1.8·alpha·d·|b − a| / (|b − a| + |b − c|), d = b − c, element-wise (supermerger).

    0/0 counts as 0, and an entry with b == c is a's entry exactly (so b == c gives a).
    """
    d = b - c
    dist_a = (b - a).abs()
    total = dist_a + d.abs()
    share = torch.where(total > 0, dist_a / torch.where(total > 0, total, 1.0), 0)
    return torch.where(d == 0, a, a + d * share * (1.8 * alpha))


def zeros_like(x: Tensor) -> Tensor:
    """A zero tensor of x's shape, dtype and device."""
    return torch.zeros_like(x)
