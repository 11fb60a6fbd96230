"""The delta a LoRA makes to one key (formulas: docs/lora.md), from the tensors of the modules
that change that key only: never the whole LoRA expanded. Each module's change is formed as a
rows × cols matrix (a conv's in·kh·kw flattened) in the compute dtype of its tensors, and
added to its rows of the key (all of them, or a fused key's row slice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from karmixlang.plan.executable import LoraTerm


def _flat(t: Tensor, rows: int) -> Tensor:
    return t.reshape(rows, -1)


def _tucker(t: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """LyCORIS's Tucker form: t is rank×rank×kh×kw, a rank×out, b rank×in."""
    out = torch.einsum("i j k l, j r, i p -> p r k l", t, _flat(b, b.shape[0]), _flat(a, a.shape[0]))
    return _flat(out, out.shape[0])


def _scale(t: dict[str, Tensor], rank: int | None) -> float:
    alpha = t.get("alpha")
    return 1.0 if alpha is None or rank is None else float(alpha.reshape(())) / rank


def _lora(t: dict[str, Tensor]) -> Tensor:
    up, down = t["up"], t["down"]
    down = _flat(down, down.shape[0])
    if "mid" in t:  # (rank_a × rank_b × kh × kw) between a 1×1 down and a 1×1 up
        down = _flat(torch.einsum("a b h w, b i -> a i h w", t["mid"], down), t["mid"].shape[0])
    return _flat(up, up.shape[0]) @ down


def _loha(t: dict[str, Tensor]) -> Tensor:
    if "t1" in t:
        return _tucker(t["t1"], t["w1b"], t["w1a"]) * _tucker(t["t2"], t["w2b"], t["w2a"])
    w1 = t["w1a"] @ _flat(t["w1b"], t["w1b"].shape[0])
    w2 = t["w2a"] @ _flat(t["w2b"], t["w2b"].shape[0])
    return w1 * w2


def _lokr_factor(t: dict[str, Tensor], n: str) -> Tensor:
    if f"w{n}" in t:
        w = t[f"w{n}"]
        return _flat(w, w.shape[0])
    if n == "2" and "t2" in t:
        return _tucker(t["t2"], t["w2b"], t["w2a"])
    return t[f"w{n}a"] @ _flat(t[f"w{n}b"], t[f"w{n}b"].shape[0])


def _lokr(t: dict[str, Tensor]) -> Tensor:
    # kron of w1 (o1 × i1) with w2 (o2 × i2·kh·kw) is the conv kernel's kron, flattened.
    # torch.kron views its operands: a Tucker factor (an einsum's permuted result) must be
    # made contiguous first.
    return torch.kron(_lokr_factor(t, "1").contiguous(), _lokr_factor(t, "2").contiguous())


def _diff(t: dict[str, Tensor]) -> Tensor:
    d = t["diff"]
    return _flat(d, d.shape[0]) if d.dim() else d.reshape(1, 1)


FORMS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "diff": _diff}


def _dora(d: Tensor, t: dict[str, Tensor], rows: tuple[int, int] | None) -> Tensor:
    """DoRA: the weight W + ΔW rescaled to norm `dora_scale` (per output row, or per input
    column when dora_scale has one entry per column), minus W."""
    w = t["base"].reshape(t["base"].shape[0], -1)
    w = w if rows is None else w[rows[0]:rows[1]]
    new = w + d
    m = t["dora_scale"].reshape(-1)
    axis = 1 if m.numel() == new.shape[0] else 0
    m = m.reshape(-1, 1) if axis == 1 else m.reshape(1, -1)
    return new * (m / new.norm(dim=axis, keepdim=True)) - w


def module_delta(term: LoraTerm, tensors: dict[str, Tensor]) -> Tensor:
    """One module's change, rows × cols, scaled by alpha/rank (a DoRA's: normalised)."""
    d = FORMS[term.kind](tensors)
    s = _scale(tensors, term.rank)
    d = d if s == 1.0 else d * s
    return _dora(d, tensors, term.rows) if "dora_scale" in tensors else d


def lora_delta(shape: tuple[int, ...], terms: tuple[LoraTerm, ...],
               tensors: list[dict[str, Tensor]], like: Tensor) -> Tensor:
    """The key's delta: zeros where no module changes it. `like`: a tensor of the compute
    dtype and device."""
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    rows = out.reshape(shape[0] if shape else 1, -1)
    for term, t in zip(terms, tensors):
        d = module_delta(term, t)
        if term.rows is None:
            rows.add_(d.reshape(rows.shape))
        else:
            a, b = term.rows
            rows[a:b].add_(d.reshape(b - a, rows.shape[1]))
    return out


def svd_factors(value: Tensor, rank: int, rows: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """up = U·S and down = Vh of the rank-`rank` truncated SVD of the key's delta (its rows
    `rows` of a fused key), as rows × rest, formed in fp64 whatever the compute dtype."""
    m = value if rows is None else value[rows[0]:rows[1]]
    u, s, vh = torch.linalg.svd(m.reshape(m.shape[0], -1).double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(value.dtype), vh[:rank].to(value.dtype)


def factor(value: Tensor, spec: tuple, shape: tuple[int, ...], cache: dict) -> Tensor:
    """One factor of an extracted module: `spec` is (part, rank, rows) (plan/extract.py);
    `cache` shares one SVD between a module's up and down."""
    part, rank, rows = spec
    if part == "alpha":  # alpha = rank: the scale alpha/rank is 1
        return torch.tensor(float(rank), dtype=value.dtype, device=value.device)
    key = (id(value), rank, tuple(rows) if rows else None)
    if key not in cache:
        cache[key] = svd_factors(value, rank, rows)
    up, down = cache[key]
    return (up if part == "up" else down).reshape(shape)
