"""An independent numpy oracle for every merge method, written from design/methods.md.

Deliberately naive: per-element loops where the definition is per element, Weiszfeld and the
Karcher iteration directly in data space, pairwise cosines by loops over pairs, a pure-Python
Philox4x64-10 built from the scheme documented in karmixlang/runtime/rng.py. Everything is
float64. The conventions that methods.md leaves open (rounding of counts, tie rules, the
weighted median) are restated here from the runtime's docstrings, not imported from it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# ---------------------------------------------------------------- randomness (rng.py scheme)

_M64 = (1 << 64) - 1
_PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)


def philox4x64_10(counter: int, key: tuple[int, int]) -> list[int]:
    """The four 64-bit output words of Philox4x64-10 for a 256-bit counter."""
    c = [(counter >> (64 * i)) & _M64 for i in range(4)]
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _PHILOX_W[0]) & _M64, (k1 + _PHILOX_W[1]) & _M64
        p0, p1 = _PHILOX_M[0] * c[0], _PHILOX_M[1] * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k0, p1 & _M64, (p0 >> 64) ^ c[3] ^ k1, p0 & _M64]
    return c


def philox_key(seed: int, key: str, member: int) -> tuple[int, int]:
    name = key.encode("utf-8")
    msg = (
        b"karmixlang-rng-v1\x00"
        + (seed % (1 << 64)).to_bytes(8, "little")
        + member.to_bytes(8, "little")
        + len(name).to_bytes(8, "little")
        + name
    )
    h = hashlib.blake2b(msg, digest_size=16).digest()
    return int.from_bytes(h[:8], "little"), int.from_bytes(h[8:], "little")


def uniforms(seed: int, key: str, member: int, n: int, offset: int = 0) -> np.ndarray:
    k = philox_key(seed, key, member)
    out = []
    for i in range(offset, offset + n):
        word = philox4x64_10(i // 4, k)[i % 4]
        out.append((word >> 11) * 2.0**-53)
    return np.array(out, dtype=np.float64)


# ---------------------------------------------------------------- interpolation


def lerp(a, b, t):
    return (1 - t) * a + t * b


def slerp(a, b, t):
    na, nb = np.linalg.norm(a.ravel()), np.linalg.norm(b.ravel())
    if na < 1e-8 or nb < 1e-8:
        return lerp(a, b, t)
    dot = float(np.dot(a.ravel() / na, b.ravel() / nb))
    if abs(dot) > 0.9995:
        return lerp(a, b, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s * a + math.sin(t * omega) / s * b


def add_difference(a, b, c, alpha):
    return a + alpha * (b - c)


def train_difference(a, b, c, alpha):
    out = np.array(a, dtype=np.float64, copy=True)
    for idx in np.ndindex(a.shape):
        d = b[idx] - c[idx]
        if d == 0:
            continue
        num, den = abs(b[idx] - a[idx]), abs(b[idx] - a[idx]) + abs(d)
        out[idx] = a[idx] + 1.8 * alpha * d * (num / den if den != 0 else 0.0)
    return out


# ---------------------------------------------------------------- means and medians


def mean(xs, ws):
    return sum(w * x for w, x in zip(ws, xs)) / sum(ws)


def sum_(xs, ws):
    return sum(w * x for w, x in zip(ws, xs))


def median(xs, ws):
    """Lower weighted median; the mean with the next value when the weight hits W/2."""
    out = np.empty(xs[0].shape)
    total = sum(ws)
    for idx in np.ndindex(xs[0].shape):
        order = sorted(range(len(xs)), key=lambda i: (xs[i][idx], i))
        cum = 0.0
        for pos, i in enumerate(order):
            cum += ws[i]
            if cum >= total / 2 - 1e-9 * total:
                value = xs[i][idx]
                if abs(cum - total / 2) <= 1e-9 * total:
                    value = (value + xs[order[pos + 1]][idx]) / 2
                out[idx] = value
                break
    return out


def geometric_median(xs, ws, eps=1e-6, maxiter=100, ftol=1e-20):
    ws = np.asarray(ws, dtype=np.float64)

    def objective(z):
        return sum(w * np.linalg.norm((x - z).ravel()) for w, x in zip(ws, xs))

    z = mean(xs, ws)
    g = objective(z)
    for _ in range(maxiter):
        beta = [w / max(eps, np.linalg.norm((x - z).ravel())) for w, x in zip(ws, xs)]
        z = sum(b * x for b, x in zip(beta, xs)) / sum(beta)
        g_new = objective(z)
        done = abs(g - g_new) <= ftol * g
        g = g_new
        if done:
            break
    return z


def model_stock(xs, ws, base):
    n = len(xs)
    taus = [(x - base).ravel() for x in xs]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = max(np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]), 1e-6)
            cosines.append(min(max(np.dot(taus[i], taus[j]) / denom, -1.0), 1.0))
    cos_theta = min(max(sum(cosines) / len(cosines), 0.0), 1.0)
    t = n * cos_theta / (1 + (n - 1) * cos_theta)
    return t * mean(xs, ws) + (1 - t) * base


def karcher(xs, ws, maxiter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0].copy()
    norms = [np.linalg.norm(x.ravel()) for x in xs]
    scale = sum(w * n for w, n in zip(ws, norms)) / sum(ws)
    keep = [i for i in range(len(xs)) if norms[i] > tol]
    if not keep:
        return np.zeros_like(xs[0])
    units = [xs[i] / norms[i] for i in keep]
    alphas = [ws[i] / sum(ws[j] for j in keep) for i in keep]
    m = sum(a * u for a, u in zip(alphas, units))
    if np.linalg.norm(m.ravel()) < tol:
        m = units[0].copy()
    else:
        m = m / np.linalg.norm(m.ravel())
    for _ in range(maxiter):
        tangent = np.zeros_like(m)
        for a, u in zip(alphas, units):
            dot = min(max(float(np.sum(m * u)), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent = tangent + a * theta / math.sin(theta) * (u - dot * m)
        tn = np.linalg.norm(tangent.ravel())
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * tangent / tn
        mn = np.linalg.norm(m.ravel())
        if mn > tol:
            m = m / mn
    return scale * m


def elected_sign(xs, ws, rule):
    if rule == "mass":
        return np.sign(sum(w * x for w, x in zip(ws, xs)))
    return np.sign(sum(w * np.sign(x) for w, x in zip(ws, xs)))


def ties_merge(xs, ws, rule):
    gamma = elected_sign(xs, ws, rule)
    out = np.zeros(xs[0].shape)
    for idx in np.ndindex(out.shape):
        if gamma[idx] == 0:
            continue
        agree = [i for i in range(len(xs)) if np.sign(xs[i][idx]) == gamma[idx]]
        if agree:
            out[idx] = sum(ws[i] * xs[i][idx] for i in agree) / sum(ws[i] for i in agree)
    return out


# ---------------------------------------------------------------- filters


def _count(fraction, n, rounding=math.ceil):
    """⌈f·n⌉ (or ⌊f·n⌋), treating a product within 1e-9 (relative) of an integer as it."""
    x = fraction * n
    if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)):
        return min(n, round(x))
    return min(n, rounding(x))


def _by_magnitude_desc(d):
    """Flat positions, largest |d| first, equal magnitudes earlier position first."""
    flat = np.abs(d.ravel())
    return sorted(range(flat.size), key=lambda i: (-flat[i], i))


def _keep_positions(d, positions):
    out = np.zeros(d.size)
    flat = d.ravel()
    for i in positions:
        out[i] = flat[i]
    return out.reshape(d.shape)


def trim(d, density):
    return _keep_positions(d, _by_magnitude_desc(d)[: _count(density, d.size)])


def breadcrumbs(d, density, gamma):
    k = _count(density, d.size)
    n_top = min(_count(gamma, d.size, math.floor), d.size - k)
    return _keep_positions(d, _by_magnitude_desc(d)[n_top : n_top + k])


def dare(d, p, seed, rescale, key, member):
    u = uniforms(seed, key, member, d.size)
    out = np.zeros(d.size)
    for i, x in enumerate(d.ravel()):
        if u[i] < 1 - p:
            out[i] = x / (1 - p) if rescale else x
    return out.reshape(d.shape)


def della(d, p, eps, seed, rescale, per_row, key, member):
    rows = d.reshape(d.shape[0], -1) if per_row and d.ndim >= 2 else d.reshape(1, -1)
    u = uniforms(seed, key, member, d.size).reshape(rows.shape)
    out = np.zeros(rows.shape)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        ascending = sorted(range(n), key=lambda i: (abs(rows[r, i]), i))
        for rank, i in enumerate(ascending):
            r_hat = rank / (n - 1) if n > 1 else 0.5
            q = min(max((1 - p - eps) + 2 * eps * r_hat, 0.0), 1.0)
            if u[r, i] < q:
                out[r, i] = rows[r, i] / q if rescale else rows[r, i]
    return out.reshape(d.shape)


def clamp(d, lo, hi):
    return np.minimum(np.maximum(d, lo), hi)


def iso(d, z):
    if d.ndim < 2:
        return d.copy()
    u, s, vt = np.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
    s2 = s.mean() + z * (s - s.mean())
    return (u @ np.diag(s2) @ vt).reshape(d.shape)


def elect(xs, ws, rule):
    gamma = elected_sign(xs, ws, rule)
    return [np.where(np.sign(x) == gamma, x, 0.0) for x in xs]


def ties(xs, ws, density, rule):
    return elect([trim(x, density) for x in xs], ws, rule)
