"""Cluster -> one tensor: means, medians, Model Stock and the Karcher mean (methods.md).

Conventions of this module:

- Weighted median (element-wise). Sort the N values of an element ascending (equal values
  keep member order) and let C_k be the total weight of the first k. The result is the first
  sorted value x_(k) with C_k >= W/2 (W = total weight); when C_k equals W/2 — to within
  1e-9·W, so weights such as 1/3 or 0.1 that reach exactly half in exact arithmetic count —
  it is (x_(k) + x_(k+1)) / 2. Equal weights give the plain median, an even count the mean
  of the two middle values.
- geometric_median and karcher iterate on N coefficients rather than on whole tensors: every
  iterate is z = Σ c_i x_i, so the distances and angles they need come from the fp64 Gram
  matrix of the members, and z is formed once at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from karmixlang.runtime.kernels.base import check_cluster, combine, flat_slices, gram

__all__ = ["mean", "sum_", "median", "geometric_median", "model_stock", "karcher",
           "geometric_median_start", "geometric_median_coeffs", "model_stock_ratio",
           "model_stock_apply", "karcher_coeffs", "karcher_apply"]

_F64 = torch.float64
_MEDIAN_TIE_RTOL = 1e-9


def mean(members: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i x_i / Σ w_i."""
    ws = check_cluster(members, weights)
    total = math.fsum(ws)
    return combine(members, [w / total for w in ws])


def sum_(members: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i x_i."""
    return combine(members, check_cluster(members, weights))


def median(members: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Element-wise weighted median (rule in the module docstring)."""
    ws = check_cluster(members, weights)
    like = members[0]
    if len(members) == 1:
        return like.clone()
    w = torch.tensor(ws, dtype=_F64, device=like.device)
    total = math.fsum(ws)
    half, tol = total / 2, _MEDIAN_TIE_RTOL * total
    flats = [m.reshape(-1) for m in members]
    out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    for sl in flat_slices(like.numel(), len(members)):
        values, order = torch.sort(torch.stack([f[sl] for f in flats]), dim=0, stable=True)
        cum = torch.cumsum(w[order], dim=0)
        # C_k grows with k, so the first k with C_k >= half is the count of those below it.
        k = (cum < half - tol).sum(dim=0, keepdim=True)
        lower = values.gather(0, k)
        upper = values.gather(0, (k + 1).clamp(max=len(members) - 1))
        at_half = (cum.gather(0, k) - half).abs() <= tol
        out[sl] = torch.where(at_half, (lower + upper) / 2, lower).squeeze(0)
    return out.reshape(like.shape)


def geometric_median(
    members: Sequence[Tensor],
    weights: Sequence[float],
    *,
    eps: float = 1e-6,
    maxiter: int = 100,
    ftol: float = 1e-20,
) -> Tensor:
    """Weighted Weiszfeld iteration over the whole flattened key, started at the weighted mean.

    β_i = w_i / max(eps, ‖x_i − z‖), z ← Σ β_i x_i / Σ β_i, until the objective
    g(z) = Σ w_i ‖x_i − z‖ changes by at most ftol·g or after maxiter steps. Two members of
    equal weight stay exactly at their mean (their distances are computed symmetrically); with
    unequal weights Weiszfeld moves to the heavier one, the true minimiser (breakdown point).
    """
    ws = check_cluster(members, weights)
    g = gram(members, center=combine(members, geometric_median_start(ws)))
    return combine(members, geometric_median_coeffs(g, ws, eps=eps, maxiter=maxiter, ftol=ftol))


def geometric_median_start(ws: list[float]) -> list[float]:
    """The weighted mean's coefficients: the starting point, and the Gram matrix's centre
    (distances to iterates then come from small numbers, not differences of large norms)."""
    w = torch.tensor(ws, dtype=_F64)
    return (w / w.sum()).tolist()


def geometric_median_coeffs(g: Tensor, ws: list[float], *, eps: float, maxiter: int,
                            ftol: float) -> list[float]:
    """Weiszfeld on coefficients, from G centred on the start (geometric_median_start)."""
    n_members = len(ws)
    w = torch.tensor(ws, dtype=_F64)
    c = torch.tensor(geometric_median_start(ws), dtype=_F64)
    eye = torch.eye(n_members, dtype=_F64)

    def distances(coeffs: Tensor) -> Tensor:
        # ‖x_i − z‖² = (e_i − c)ᵀ G (e_i − c); rows of `v` are e_i − c.
        v = eye - coeffs
        return ((v @ g) * v).sum(dim=1).clamp(min=0).sqrt()

    dist = distances(c)
    objective = float(w @ dist)
    for _ in range(maxiter):
        beta = w / dist.clamp(min=eps)
        c = beta / beta.sum()
        dist = distances(c)
        new_objective = float(w @ dist)
        converged = abs(objective - new_objective) <= ftol * objective
        objective = new_objective
        if converged:
            break
    return c.tolist()


def model_stock(members: Sequence[Tensor], weights: Sequence[float], base: Tensor) -> Tensor:
    """t·mean(θ_i) + (1 − t)·θ0 with t = N·cosθ / (1 + (N − 1)·cosθ).

    cosθ is the unweighted mean over pairs i<j of cos(θ_i − θ0, θ_j − θ0) (norm product
    clamped at 1e-6, each cosine clamped to [−1, 1]), then clamped to [0, 1] so that t stays in
    [0, 1]: the pole at cosθ = −1/(N − 1) cannot be reached, and task vectors that point apart
    on average (or are zero) give t = 0, the base. The weights enter only the mean.
    """
    ws = check_cluster(members, weights)
    t = model_stock_ratio(gram(members, center=base), len(ws))
    return model_stock_apply(members, ws, base, t)


def model_stock_ratio(g: Tensor, n_members: int) -> float:
    """t from the Gram matrix of the task vectors (members centred on the base)."""
    if n_members < 2:
        raise ValueError(
            "model_stock needs at least 2 members: it measures the angle between their task "
            f"vectors, got {n_members}"
        )
    norms = g.diagonal().clamp(min=0).sqrt()
    cos = (g / (norms[:, None] * norms[None, :]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    i, j = torch.triu_indices(n_members, n_members, offset=1)
    cos_theta = min(max(float(cos[i, j].mean()), 0.0), 1.0)
    return n_members * cos_theta / (1 + (n_members - 1) * cos_theta)


def model_stock_apply(members: Sequence[Tensor], ws: list[float], base: Tensor,
                      t: float) -> Tensor:
    return combine([mean(members, ws), base], [t, 1.0 - t])


def karcher(
    members: Sequence[Tensor],
    weights: Sequence[float],
    *,
    maxiter: int = 10,
    tol: float = 1e-5,
) -> Tensor:
    """Weighted Karcher mean of the directions x_i/‖x_i‖, scaled by the weighted mean norm.

    mergekit's algorithm with weights: members with ‖x_i‖ <= tol have no direction (they
    still count, with norm 0, in the scale; if none is left the result is zero); start at the
    normalised weighted mean of the unit vectors (or the first one if that mean is shorter than
    tol); step along T = Σ α_i θ_i/sin θ_i (u_i − cos θ_i·m) (terms with θ_i < tol dropped)
    by the exponential map; stop when ‖T‖ < tol or after maxiter steps. One member is returned
    as is.
    """
    ws = check_cluster(members, weights)
    if len(ws) == 1:
        return members[0].clone()
    return karcher_apply(members, karcher_coeffs(gram(members), ws, maxiter=maxiter, tol=tol))


def karcher_coeffs(g: Tensor, ws: list[float], *, maxiter: int,
                   tol: float) -> tuple[list[int], list[float]]:
    """(members with a direction, their coefficients) from the uncentred Gram matrix; no
    members means a zero result."""
    w = torch.tensor(ws, dtype=_F64)
    norms = g.diagonal().clamp(min=0).sqrt()
    scale = float((w * norms).sum() / w.sum())
    valid = (norms > tol).nonzero().flatten().tolist()
    if not valid:
        return [], []
    nv = norms[valid]
    k = g[valid][:, valid] / (nv[:, None] * nv[None, :])  # Gram matrix of the unit vectors
    alpha = w[valid] / w[valid].sum()

    def length(coeffs: Tensor) -> float:
        return math.sqrt(max(float(coeffs @ k @ coeffs), 0.0))

    # The mean direction m = Σ c_j u_j.
    c = alpha.clone()
    start_norm = length(c)
    if start_norm < tol:
        c = torch.zeros_like(alpha)
        c[0] = 1.0
    else:
        c = c / start_norm
    for _ in range(maxiter):
        dots = (k @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        ratio = torch.where(theta < tol, 0.0, theta / torch.sin(theta))
        tangent = alpha * ratio - float((alpha * ratio * dots).sum()) * c
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        c = math.cos(tangent_norm) * c + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = length(c)
        if unit_norm > tol:
            c = c / unit_norm
    return valid, (scale * c / nv).tolist()


def karcher_apply(members: Sequence[Tensor], plan: tuple[list[int], list[float]]) -> Tensor:
    valid, coeffs = plan
    if not valid:
        return torch.zeros_like(members[0])
    return combine([members[i] for i in valid], coeffs)
