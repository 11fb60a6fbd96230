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

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from karmixlang.ops import RADIX_SORT_MAX_ELEMS, RANK_GROUP
from karmixlang.runtime.kernels.base import check_cluster, flat_slices
from karmixlang.runtime.kernels.rng import uniform

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
# DARE and DELLA work on slices of this many elements (positions, uniforms, keep
# probabilities): their temporaries then stay in cache and are recycled by the heap, where
# whole-key ones would be fresh mappings, zero-filled page by page on first touch. Results do
# not depend on it.
_SLICE = 1 << 17
# Radix selection (_radix_select) reads magnitude bits this many at a time; _grouped_ranks
# buckets them by as many top bits.
_DIGIT_BITS = 16
_DIGIT_MASK = (1 << _DIGIT_BITS) - 1
_POSITIONS = 1 << 32  # positions a packed sort key holds in its low half (_packed_order)
# Integers of each float's width: selecting an entry is multiplying its bits by 0 or 1.
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _slices(n: int, step: int = _SLICE) -> Iterator[slice]:
    """Slices of `step` elements covering range(n)."""
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def kept_count(fraction: float, n: int, rounding: Callable[[float], int] = math.ceil) -> int:
    """rounding(fraction·n) in [0, n], a float product off an integer by rounding snapped to it
    (never to 0: a positive fraction rounded up counts at least one)."""
    x = fraction * n
    nearest = round(x)
    k = nearest if nearest and abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else rounding(x)
    return min(n, max(0, k))


# On the CPU the element-wise helpers below run in numpy: its comparisons and counts are 3–6×
# faster than torch's on one thread, and it casts a mixed-dtype operand in small buffers where
# torch first copies it whole.


def _keep(mask: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """out = torch.where(mask, x, 0) bit for bit (a dropped entry is +0), as the product of x's
    bits with the mask (bool, or 0/1 in integers of x's width). out may be x."""
    bits = _BITS[x.dtype]
    if x.device.type == "cpu":
        np.multiply(x.view(bits).numpy(), mask.numpy(), out=out.view(bits).numpy())
    else:
        torch.mul(x.view(bits), mask, out=out.view(bits))
    return out


def keep_where(mask: Tensor, x: Tensor) -> Tensor:
    """torch.where(mask, x, 0) bit for bit, in a fresh tensor."""
    return _keep(mask, x, torch.empty_like(x))


def _at_least(x: Tensor, value: float) -> tuple[Tensor, int]:
    """The mask x >= value and its number of true entries."""
    if x.device.type == "cpu":
        mask = np.greater_equal(x.numpy(), value)
        return torch.from_numpy(mask), int(np.count_nonzero(mask))
    mask = x >= value
    return mask, int(torch.count_nonzero(mask))


def _positions_of(x: Tensor, value: float) -> Tensor:
    """Ascending flat positions of the entries equal to value (x 1-D)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(x.numpy() == value))
    return (x == value).nonzero().squeeze(1)


def _kth_smallest(values: Tensor, indices: list[int]) -> list[float]:
    """values (magnitudes: none negative) sorted ascending, at each of `indices` (0-based),
    values left as they are. On the CPU a large key's entry is first looked for among the
    candidates of a bracket guessed from a sample (one pass, `Bracket`), then, where the
    guess missed, by radix selection (`_radix_select`); a small key's by numpy's partition;
    other devices use kthvalue."""
    if values.device.type != "cpu":
        return [float(torch.kthvalue(values, i + 1).values) for i in indices]
    bits = values.reshape(-1).view(_BITS[values.dtype])
    a = bits.numpy()
    found: dict[int, int] = {}
    if a.size >= BRACKET_MIN_ELEMS:
        sample = _magnitude_sample(a)
        for index in indices:
            if (value := _bracketed(a, index, sample).found()) is not None:
                found[index] = value
    else:  # numpy's introselect, unless the entry is one of the (many) zeros
        zeros = a.size - np.count_nonzero(a)
        places = [i for i in indices if i >= zeros]
        ordered = np.partition(a, places) if places else a
        found = {i: int(ordered[i]) if i >= zeros else 0 for i in indices}
    missed = [i for i in indices if i not in found]
    found.update(zip(missed, _radix_select(bits, missed)))
    return [float(torch.tensor(found[i], dtype=bits.dtype).view(values.dtype))
            for i in indices]


# A key of at least this many elements looks for its thresholds in a sampled bracket first;
# below it the radix selection's two passes cost about as little.
BRACKET_MIN_ELEMS = 1 << 18
# Entries a bracket is guessed from.
SAMPLE_ELEMS = 1 << 16


@functools.lru_cache(maxsize=64)  # keys of a model share a few dozen sizes
def sample_positions(n: int) -> np.ndarray:
    """SAMPLE_ELEMS flat positions in range(n), ascending, drawn at random (the same for every
    key of n entries: a selection's result never depends on its sample, only its speed)."""
    positions = np.sort(np.random.default_rng(n).integers(0, n, SAMPLE_ELEMS))
    positions.flags.writeable = False
    return positions


def _magnitude_sample(bits: np.ndarray) -> np.ndarray:
    """The magnitude bits of `bits` (a float key's, flat) at sample_positions, sorted."""
    return np.sort(bits[sample_positions(bits.size)] & np.iinfo(bits.dtype).max)


def _bracketed(bits: np.ndarray, index: int, sample: np.ndarray) -> Bracket:
    """The Bracket of ascending place `index` among the magnitudes of `bits` (a float key's,
    flat), its pass made slice by slice in cache (the sign bit dropped on the way)."""
    n, largest = bits.size, np.iinfo(bits.dtype).max
    bracket = Bracket(index, n, sample, cap=n // 16)
    magnitudes = np.empty(min(n, _SLICE), dtype=bits.dtype)
    for cols in _slices(n):
        bracket.add(np.bitwise_and(bits[cols], largest, out=magnitudes[:cols.stop - cols.start]))
    return bracket


class Bracket:
    """Selects the entry at ascending place `index` among n non-negative integers (magnitude
    bits) in one pass over them, when a sorted sample of them says where it lies: a range
    [lo, hi] around the sample's quantile, six standard errors of a quantile wide each way
    (wider than a random sample needs, so that a sample of blocks of the key, as out-of-core
    keys take, rarely misses). The pass (`add`, slice by slice) counts the entries above hi
    and keeps those in [lo, hi], at most `cap` of them; `found` is the entry, or None when the
    guess missed (the caller selects by radix then). lo is at least 1: the zeros (a third of
    a sparse task vector) are never candidates, and an entry below lo = 1 is 0.

    In place of the radix selection's two passes with a 64 Ki-bucket histogram each, whose
    counting costs several times a comparison: one pass of two comparisons, and a partition
    of the candidates (typically 1-3 % of the key).
    """

    def __init__(self, index: int, n: int, sample: np.ndarray, cap: int):
        s = sample.size
        q = index / n
        margin = 6 * math.sqrt(max(q * (1 - q), 1 / s) / s) + 2 / s
        self.lo = max(1, int(sample[max(0, math.floor((q - margin) * s))]))
        self.hi = int(sample[min(s - 1, math.ceil((q + margin) * s))])
        self.index, self.n, self.cap = index, n, cap
        self.above = self.inside = 0
        self.parts: list[np.ndarray] = []
        self.candidates: np.ndarray | None = None

    def add(self, a: np.ndarray) -> None:
        self.above += int(np.count_nonzero(a > self.hi))
        if self.hi < self.lo:
            return
        # lo <= a <= hi as one unsigned comparison of a - lo (a >= 0, lo >= 1: no overflow)
        unsigned = np.dtype(f"u{a.itemsize}")
        inside = a[(a - a.dtype.type(self.lo)).view(unsigned) <= self.hi - self.lo]
        self.inside += inside.size
        if self.inside <= self.cap:
            self.parts.append(inside)
        else:
            self.parts = []  # too many to keep: the guess is given up, not the count

    def found(self) -> int | None:
        below = self.n - self.above - self.inside
        if self.index < below:
            return 0 if self.lo == 1 else None
        place = self.index - below
        if place >= self.inside or self.inside > self.cap:
            return None
        self.candidates = np.concatenate(self.parts)
        self.parts = []
        return int(np.partition(self.candidates, place)[place])

    def count_above(self, value: int) -> int:
        """Entries above `value`, the entry `found` returned."""
        if value == 0:
            return self.above + self.inside
        return self.above + int(np.count_nonzero(self.candidates > value))


def _radix_select(bits: Tensor, indices: list[int]) -> list[int]:
    """The non-negative integers `bits` (1-D, on the CPU) sorted ascending, at each of
    `indices`, by radix selection: a histogram of their top 16 bits finds the bucket each
    index falls in, a histogram of the next 16 bits within that bucket the next digit, and so
    on (two passes at fp32, ~4× faster than numpy's introselect, whose SIMD partition also
    slows down several times where one value, such as the zeros of a sparse delta, repeats)."""
    if not indices:
        return []
    top_shift, top = _top_digit_counts(bits)
    a = bits.numpy()
    found = []
    zeros = None
    for index in indices:
        if index < top[0]:  # in the lowest bucket, which holds the zeros (of a sparse delta:
            # a third of the key), whose digits need no histogram
            zeros = a.size - np.count_nonzero(a) if zeros is None else zeros
            if index < zeros:
                found.append(0)
                continue
        prefix, rank, counts = 0, index, top
        for shift in range(top_shift, -1, -_DIGIT_BITS):
            if shift != top_shift:  # the digit below `prefix`, among the entries that have it
                counts = np.zeros(1 << _DIGIT_BITS, dtype=np.int64)
                for cols in _slices(a.size, 8 * _SLICE):  # no key-sized temporaries
                    part = a[cols]
                    digits = part[(part >> (shift + _DIGIT_BITS)) == prefix] >> shift
                    counts += np.bincount(digits & _DIGIT_MASK, minlength=1 << _DIGIT_BITS)
            below = np.cumsum(counts)
            digit = int(np.searchsorted(below, rank, side="right"))
            rank -= int(below[digit - 1]) if digit else 0
            prefix = (prefix << _DIGIT_BITS) | digit
        found.append(prefix)
    return found


def _top_digit_counts(bits: Tensor) -> tuple[int, np.ndarray]:
    """How many of `bits` (non-negative integers, 1-D, on the CPU) have each value of their
    top _DIGIT_BITS bits, and the shift that gives those bits."""
    shift = 8 * bits.element_size() - _DIGIT_BITS
    counts = torch.zeros(1 << _DIGIT_BITS, dtype=torch.int64)
    for cols in _slices(bits.numel(), 8 * _SLICE):
        counts += torch.bincount(bits[cols] >> shift, minlength=1 << _DIGIT_BITS)
    return shift, counts.numpy()


def _last_ties(magnitude: Tensor, value: float, count: int) -> Tensor:
    """Ascending flat positions of the last `count` entries equal to `value`. Scanned from the
    end in growing slices, so that only the part of the key holding them is compared."""
    found: list[Tensor] = []
    stop, step, have = magnitude.numel(), 1 << 16, 0
    while have < count and stop > 0:
        start = max(0, stop - step)
        at = _positions_of(magnitude[start:stop], value).add_(start)
        found.append(at)
        have += at.numel()
        stop, step = start, 2 * step
    return torch.cat(found[::-1])[-count:]


def _window(d: Tensor, start: int, stop: int) -> Tensor:
    """d where the entry is at places [start, stop) of the magnitude order, 0 elsewhere.

    The first K < n places are the entries with |d| >= t (the K-th largest magnitude) but for
    the positionally last of those equal to t, as many as there are more than K; only those
    few are searched for, in place of a running count of the ties over the whole key.
    """
    n = d.numel()
    if stop <= start:
        return torch.zeros_like(d, memory_format=torch.contiguous_format)
    if start == 0 and stop >= n:
        return d.clone(memory_format=torch.contiguous_format)
    flat = d.reshape(-1)
    out = flat.abs()  # the magnitudes, then the result
    places = [k for k in (stop, start) if 0 < k < n]
    t = dict(zip(places, _kth_smallest(out, [n - k for k in places])))
    if stop < n:
        keep, drop_lo = _at_least(out, t[stop])
        drop_lo -= stop  # ties at t[stop] past place stop
    if start:
        in_top, drop_hi = _at_least(out, t[start])
        drop_hi -= start
        if stop < n and t[start] == t[stop]:
            # The window lies in one tie group: its last drop_hi but for the last drop_lo.
            keep.zero_()
            if drop_hi > 0:
                keep[_last_ties(out, t[start], drop_hi)[: drop_hi - max(drop_lo, 0)]] = True
            return _keep(keep, flat, out).reshape(d.shape)
        outside = in_top.logical_not_()
        keep = outside if stop == n else keep.logical_and_(outside)
        if drop_hi > 0:  # those ties at t[start] are past the first `start` places
            keep[_last_ties(out, t[start], drop_hi)] = True
    # Ties at a threshold of 0 (a sparse delta at a high density: millions of them) are
    # zeros: dropping them changes no bit unless one is -0, so they are only searched for
    # where there is a -0.
    if stop < n and drop_lo > 0 and (t[stop] != 0 or _has_negative_zero(flat)):
        keep[_last_ties(out, t[stop], drop_lo)] = False
    return _keep(keep, flat, out).reshape(d.shape)


def _has_negative_zero(x: Tensor) -> bool:
    """Whether an entry of x (1-D) is -0: its bits are the sign bit alone."""
    bits = x.view(_BITS[x.dtype])
    sign = torch.iinfo(bits.dtype).min
    if x.device.type == "cpu":
        return bool(np.count_nonzero(bits.numpy() == sign))
    return bool(torch.count_nonzero(bits == sign))


def trim(d: Tensor, *, density: float) -> Tensor:
    """Keep the ⌈density·n⌉ entries of largest |d|, zero the rest."""
    n, k = d.numel(), kept_count(density, d.numel())
    if d.device.type == "cpu" and n >= BRACKET_MIN_ELEMS and 0 < k < n:
        out = _trim_by_bracket(d.reshape(-1), k)
        if out is not None:
            return out.reshape(d.shape)
    return _window(d, 0, k)


def _trim_by_bracket(flat: Tensor, k: int) -> Tensor | None:
    """trim of a large CPU key, slice by slice in cache: a pass of magnitude bits through a
    sampled Bracket finds the threshold (None where its guess misses), a pass of
    keep_largest the result. No key-sized magnitudes or mask, as the window takes."""
    bits = flat.view(_BITS[flat.dtype]).numpy()
    bracket = _bracketed(bits, bits.size - k, _magnitude_sample(bits))
    threshold = bracket.found()
    if threshold is None:
        return None
    out = torch.empty_like(flat)
    room = k - bracket.count_above(threshold)
    for cols in _slices(bits.size):
        room -= keep_largest(flat[cols], threshold, room, out[cols])
    return out


def keep_largest(x: Tensor, threshold: int, room: int, out: Tensor) -> int:
    """out = x (flat, the next slice of a key) where its magnitude bits are above
    `threshold`, or equal to it and among the first `room` such entries by position (none
    where room <= 0), else +0; returns how many equal it. Where the threshold is a common
    magnitude (0 in a sparse task vector: millions of ties), a slice's ties are all kept or
    all dropped but in the one slice where the room runs out: only that one looks for their
    positions."""
    bits = x.view(_BITS[x.dtype])
    largest = torch.iinfo(bits.dtype).max
    if x.device.type == "cpu":  # numpy: its masks and counts are several times torch's
        a = bits.numpy()
        magnitude = np.bitwise_and(a, largest)
        at = magnitude == threshold
        ties = int(np.count_nonzero(at))
        keep = np.greater(magnitude, threshold, out=magnitude)  # 0 or 1 in the bits' width
        if ties <= room:
            keep |= at
        elif room > 0:
            keep[np.flatnonzero(at)[:room]] = 1
        np.multiply(a, keep, out=out.view(bits.dtype).numpy())
        return ties
    magnitude = bits & largest
    at = magnitude == threshold
    ties = int(torch.count_nonzero(at))
    keep = magnitude > threshold
    if ties <= room:
        keep.logical_or_(at)
    elif room > 0:
        keep[at.nonzero().squeeze(1)[:room]] = True
    _keep(keep, x, out)
    return ties


def breadcrumbs(d: Tensor, *, density: float, gamma: float = 0.01) -> Tensor:
    """Zero the top ⌊gamma·n⌋ entries by |d|, then the smallest, leaving ⌈density·n⌉.

    When the two fractions add up to more than 1, fewer top entries are zeroed so that the
    density is met (as mergekit does); density 1 therefore returns the delta unchanged.
    """
    n = d.numel()
    k = kept_count(density, n)
    n_top = min(kept_count(gamma, n, math.floor), n - k)
    return _window(d, n_top, n_top + k)


def _random_keep(
    d: Tensor,
    keep_prob: Callable[[slice], float | Tensor],
    *,
    rescale: bool,
    seed: int,
    key: str,
    member: int,
    out: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """d with flat element i kept when u_i < q_i (divided by q_i if rescale), else zero; into
    out (flat, d's dtype) if given, whose slice keep_prob may read before it is written.
    `offset`: d is flat elements [offset, offset + d.numel()) of a larger key."""
    flat = d.reshape(-1)
    out = torch.empty_like(flat) if out is None else out
    for sl in _slices(flat.numel()):
        q = keep_prob(sl)
        u = uniform(seed, key, member, sl.stop - sl.start, offset + sl.start)
        if d.device.type == "cpu":  # numpy compares ~3× faster
            keep = torch.from_numpy(np.less(u, q.numpy() if torch.is_tensor(q) else q))
        else:
            keep = torch.from_numpy(u).to(d.device) < q
        part = out[sl]
        if rescale:
            # Only kept entries are selected below, and those have q > u >= 0 (a q of 0
            # elsewhere may give inf there, never selected).
            torch.div(flat[sl], q.to(d.dtype) if torch.is_tensor(q) else q, out=part)
        _keep(keep, part if rescale else flat[sl], part)
    return out.reshape(d.shape)


def dare(
    d: Tensor, *, p: float, seed: int, rescale: bool = True, key: str, member: int,
    offset: int = 0,
) -> Tensor:
    """Drop each entry with probability p; divide the survivors by 1 − p when rescale.
    `offset`: d is a chunk of its key starting at that flat element (out-of-core keys)."""
    if p >= 1:
        return torch.zeros_like(d)
    return _random_keep(
        d, lambda sl: 1.0 - p, rescale=rescale, seed=seed, key=key, member=member,
        offset=offset,
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
    ranks = ordinal_ranks(rows).reshape(-1)
    # The result takes the ranks' place where it has their width (int32 ranks, float32 d):
    # each slice's ranks are read before its results overwrite them.
    out = ranks.view(d.dtype) if ranks.element_size() == d.element_size() else None

    def keep_prob(sl: slice) -> Tensor:
        if width == 1:
            r_hat = torch.full((sl.stop - sl.start,), 0.5, dtype=_F64, device=d.device)
        else:
            r_hat = ranks[sl].to(_F64).div_(width - 1)
        # In place, with the roundings of (1 − p − eps) + (2·eps)·r̂.
        return r_hat.mul_(2.0 * eps).add_(1.0 - p - eps).clamp_(0.0, 1.0)

    return _random_keep(
        d, keep_prob, rescale=rescale, seed=seed, key=key, member=member, out=out
    )


def ordinal_ranks(rows: Tensor) -> Tensor:
    """Per row, each entry's ascending rank by magnitude (0-based), ties broken by position;
    int32 for rows narrower than 2**31 entries, else int64.

    A float's bits without the sign bit are an integer in the order of its magnitude, so a
    stable sort of those integers is the order wanted. On the CPU, bits of up to 32 (fp32,
    fp16, bf16) are sorted packed with their positions (`_packed_order`, 8 bytes an element
    beside the ranks, any size). Otherwise (fp64; other devices) torch sorts them by radix,
    which needs 32 bytes an element beside fp64 input; fp64 keys over RADIX_SORT_MAX_ELEMS on
    the CPU are ranked a part at a time instead, rows wider than RANK_GROUP group by group
    (`_grouped_ranks`), narrower ones in blocks of rows of about RANK_GROUP entries (the plan
    charges each by the key's size).
    """
    width = rows.shape[1]
    rank_dtype = torch.int32 if width < 2**31 else torch.int64
    int_dtype = _BITS[rows.dtype]
    if rows.device.type == "cpu" and rows.element_size() <= 4 and width <= _POSITIONS:
        bits = rows.contiguous().view(int_dtype).numpy()
        return _scattered_ranks(torch.from_numpy(_packed_order(bits)), rank_dtype)
    magnitudes = rows.view(int_dtype) & torch.iinfo(int_dtype).max
    if rows.numel() <= RADIX_SORT_MAX_ELEMS or rows.device.type != "cpu":
        return _sorted_ranks(magnitudes, rank_dtype)
    ranks = torch.empty(rows.shape, dtype=rank_dtype)
    if width > RANK_GROUP:
        for r in range(rows.shape[0]):
            ranks[r] = _grouped_ranks(magnitudes[r], rank_dtype)
    else:
        block = RANK_GROUP // width
        for start in range(0, rows.shape[0], block):
            ranks[start:start + block] = _sorted_ranks(magnitudes[start:start + block],
                                                       rank_dtype)
    return ranks


def _packed_order(bits: np.ndarray) -> np.ndarray:
    """Per row of `bits` (the bits of floats of at most 32 bits as signed integers), the
    positions in ascending order of magnitude, ties by position, as int64. A magnitude's
    bits and its position are packed into one uint64, so the keys are all distinct and
    numpy's unstable (SIMD) sort of them in place gives the stable order: 2–3× faster than
    torch's radix sort of the bits with an int64 index, in 8 bytes an element, not 24."""
    packed = np.empty(bits.shape, dtype=np.uint64)
    # The sign bit off after the cast to uint64 (which sign-extends), then the bits up high.
    np.bitwise_and(bits, np.iinfo(bits.dtype).max, out=packed, dtype=np.uint64,
                   casting="unsafe")
    np.left_shift(packed, np.uint64(32), out=packed)
    for cols in _slices(bits.shape[-1]):
        np.bitwise_or(packed[..., cols], np.arange(cols.start, cols.stop, dtype=np.uint64),
                      out=packed[..., cols])
    packed.sort(axis=-1)
    np.bitwise_and(packed, np.uint64(_POSITIONS - 1), out=packed)
    return packed.view(np.int64)


def _sorted_ranks(magnitudes: Tensor, rank_dtype: torch.dtype) -> Tensor:
    """ordinal_ranks of rows of magnitude bits by one stable sort in torch."""
    rows, width = magnitudes.shape
    if rows == 1:  # one row sorts flat, where torch's radix sort applies
        order = torch.sort(magnitudes.reshape(-1), stable=True).indices.reshape(1, width)
    else:
        order = torch.sort(magnitudes, dim=1, stable=True).indices
    return _scattered_ranks(order, rank_dtype)


def _scattered_ranks(order: Tensor, rank_dtype: torch.dtype) -> Tensor:
    """The ranks of rows whose positions in rank order are `order` (int64)."""
    rows, width = order.shape
    ranks = torch.empty_like(order, dtype=rank_dtype)
    for cols in _slices(width):
        positions = torch.arange(cols.start, cols.stop, dtype=rank_dtype, device=order.device)
        ranks.scatter_(1, order[:, cols], positions.expand(rows, -1))
    return ranks


def _grouped_ranks(magnitudes: Tensor, rank_dtype: torch.dtype) -> Tensor:
    """The ordinal ranks of one long row of magnitude bits (non-negative integers, on the CPU)
    with the sort's temporaries bounded by a group. A histogram of the top 16 bits cuts the
    magnitudes into ranges (groups) of about RANK_GROUP entries (a fuller bucket alone); an
    entry's rank is the count of entries in lower groups plus its rank within its group,
    from a stable radix sort of the group alone. A group of one magnitude (the exact zeros of
    a sparse delta) is already in rank order: its positions, ascending."""
    a = magnitudes.numpy()
    shift, counts = _top_digit_counts(magnitudes)
    ranks = torch.empty(a.size, dtype=rank_dtype)
    inside = np.empty(a.size, dtype=bool)
    unsigned = np.dtype(f"u{a.itemsize}")
    below = 0
    for low, high in _bucket_groups(counts, RANK_GROUP):
        # low <= bucket < high, as one unsigned comparison of (bits - low's first bits)
        start, span = low << shift, (high - low) << shift
        for cols in _slices(a.size, 8 * _SLICE):
            np.less((a[cols] - start).view(unsigned), span, out=inside[cols])
        group = torch.from_numpy(np.flatnonzero(inside))
        values = magnitudes[group]
        if values.numel() and values.max() != values.min():
            group = group[torch.sort(values, stable=True).indices]
        del values
        ranks.scatter_(0, group, torch.arange(below, below + group.numel(), dtype=rank_dtype))
        below += group.numel()
    return ranks


def _bucket_groups(counts: np.ndarray, most: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [low, high) of buckets covering every non-empty one, each holding at
    most `most` entries unless a single bucket holds more."""
    low, held, last = 0, 0, 0
    for bucket in np.flatnonzero(counts):
        if held and held + counts[bucket] > most:
            yield low, int(bucket)
            low, held = int(bucket), 0
        held += int(counts[bucket])
        last = int(bucket)
    yield low, last + 1


def clamp(d: Tensor, *, lo: float, hi: float) -> Tensor:
    """Element-wise clamp to [lo, hi]."""
    if lo > hi:
        raise ValueError(f"clamp: lo ({lo}) is above hi ({hi})")
    # A bound beyond the dtype's range bounds nothing (and torch refuses to convert it).
    top = torch.finfo(d.dtype).max
    lo, hi = (min(max(v, -top), top) for v in (lo, hi))
    return torch.clamp(d, min=lo, max=hi)


def iso(d: Tensor, *, z: float = 0.0) -> Tensor:
    """Flatten the singular spectrum toward its mean: S' = mean(S) + z·(S − mean(S)).

    2-D keys directly, conv kernels (and any key of 3 or more dims) as shape[0] × (the rest);
    1-D and 0-d keys, empty keys and z = 1 return the delta unchanged. A zero delta has S = 0
    and stays zero.
    """
    if d.dim() < 2 or d.numel() == 0 or z == 1:
        return d.clone()
    m = d.reshape(d.shape[0], -1)
    if m.is_cuda:
        # cuSOLVER's default fp32 SVD is less accurate than the CPU's LAPACK: the QR-based
        # one in fp64 halved the CUDA/CPU difference of DGMIZ (bench/cuda_check.py).
        u, s, vh = (t.to(d.dtype) for t in torch.linalg.svd(
            m.to(_F64), full_matrices=False, driver="gesvd"))
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    s64 = s.to(_F64)
    s_mean = s64.mean()
    flat_s = (s_mean + z * (s64 - s_mean)).to(s.dtype)
    return ((u * flat_s) @ vh).reshape(d.shape)


def _elected_signs(
    flats: Sequence[Tensor], ws: list[float], rule: str
) -> Iterator[tuple[slice, Tensor]]:
    """γ over successive slices of the flattened members."""
    if rule not in _RULES:
        raise ValueError(f"unknown election rule {rule!r}; expected one of {_RULES}")

    def vote(f: Tensor, w: float, out: Tensor | None = None) -> Tensor:
        return torch.mul(f, w, out=out) if rule == "mass" else torch.sign(f, out=out).mul_(w)

    n = len(flats)
    exact = rule == "count" and _exact_counts(ws, flats[0].dtype)
    buffer = None
    # The slices and the stacked votes' sums are kept as they are: the sign of a near-tie's
    # sorted sum can depend on how many near-ties torch sums together.
    for sl in flat_slices(flats[0].numel(), n):
        size = n * (sl.stop - sl.start)
        if buffer is None:  # the first slice is the largest
            buffer = torch.empty(size, dtype=flats[0].dtype, device=flats[0].device)
        votes = buffer[:size].view(n, -1)
        for f, w, row in zip(flats, ws, votes):
            vote(f[sl], w, out=row)
        if exact:  # any order sums to the exact count: its sign is the sorted sum's
            yield sl, torch.sign(votes.sum(dim=0))
            continue
        yield sl, _order_free_sign(
            votes, lambda idx: torch.stack([vote(f[sl][idx], w) for f, w in zip(flats, ws)])
        )


def _exact_counts(ws: list[float], dtype: torch.dtype) -> bool:
    """Whether the "count" votes' sums are exact in `dtype` whatever their order: every
    weight a whole number, and all of them together within the integers the dtype holds
    exactly (2**24 in fp32). Sums of ±w and 0 are then whole numbers all along the way."""
    exact_up_to = 2 / torch.finfo(dtype).eps
    return all(w == int(w) for w in ws) and sum(ws) <= exact_up_to


def _order_free_sign(
    votes: Tensor, near_votes: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """sign(Σ votes) over dim 0, independent of member order: the sign of the sum in sorted
    order. Sorting every element is slow, so the sum is first taken in any order; where it
    clears the rounding bound of any order, its sign and the sorted sum's are both the exact
    sum's; only the near-ties left (rare) are sorted.

    near_votes(idx), when given, recomputes votes[:, idx]: votes is then overwritten (by its
    absolute values) instead of copied.
    """
    n = votes.shape[0]
    # Any summation order errs by at most (n − 1)·eps·Σ|v|; twice that margin (and again for
    # the rounding of the bound itself) leaves only true near-ties to sort.
    total = votes.sum(dim=0)
    magnitudes = votes.abs() if near_votes is None else votes.abs_()
    bound = magnitudes.sum(dim=0).mul_(4 * n * torch.finfo(votes.dtype).eps)
    sign = torch.sign(total)
    total.abs_()
    if votes.device.type == "cpu":
        t, b = total.numpy(), bound.numpy()
        idx = torch.from_numpy(np.flatnonzero((t <= b) & (b > 0)))
    else:
        idx = ((total <= bound) & (bound > 0)).nonzero().squeeze(1)
    if idx.numel():
        near_stack = votes[:, idx] if near_votes is None else near_votes(idx)
        ordered = near_stack.sort(dim=0).values
        # Row by row: torch's sum(dim=0) adds in an order that depends on how many columns
        # it is given, which would tie the result to how the key is sliced.
        exact = ordered[0].clone()
        for row in ordered[1:]:
            exact += row
        sign[idx] = torch.sign(exact)
    return sign


def elect(
    members: Sequence[Tensor], weights: Sequence[float], *, rule: str = "mass"
) -> list[Tensor]:
    """Zero every entry whose sign differs from the elected sign γ (all of them where γ = 0)."""
    ws = check_cluster(members, weights)
    outs = [torch.empty(m.shape, dtype=m.dtype, device=m.device) for m in members]
    return _elect([m.reshape(-1) for m in members], ws, rule, outs)


def _elect(flats: list[Tensor], ws: list[float], rule: str, outs: list[Tensor]) -> list[Tensor]:
    """elect into the contiguous outs (which may be the members themselves)."""
    flat_outs = [o.view(-1) for o in outs]
    for sl, gamma in _elected_signs(flats, ws, rule):
        # 0 or 1 in an integer of the entries' width: torch compares into it several times
        # faster than into bool, and _keep multiplies by it without a cast.
        agree = torch.empty_like(gamma, dtype=_BITS[gamma.dtype])
        for f, o in zip(flats, flat_outs):
            x = f[sl]
            _keep(torch.eq(torch.sign(x), gamma, out=agree), x, o[sl])
    return outs


def ties(
    members: Sequence[Tensor], weights: Sequence[float], *, density: float, rule: str = "mass"
) -> list[Tensor]:
    """elect([trim(x, density) for x in members], rule)."""
    ws = check_cluster(members, weights)
    trimmed = [trim(x, density=density) for x in members]
    # The trimmed members are ours: elect over them in place.
    return _elect([t.view(-1) for t in trimmed], ws, rule, trimmed)


def ties_merge(
    members: Sequence[Tensor], weights: Sequence[float], *, rule: str = "mass"
) -> Tensor:
    """Disjoint weighted mean of the members that agree with γ; 0 where none does or γ = 0."""
    ws = check_cluster(members, weights)
    flats = [m.reshape(-1) for m in members]
    out = torch.empty_like(flats[0])
    w_min = min(ws)
    for sl, gamma in _elected_signs(flats, ws, rule):
        num = torch.zeros_like(gamma)
        den = torch.zeros_like(gamma)
        agree = torch.empty_like(gamma)
        for f, w in zip(flats, ws):
            x = f[sl]
            # A zero entry never agrees with γ != 0; where γ = 0 the numerator is 0 anyway.
            # (Comparing into floats is several times faster than into bool and a cast.)
            torch.eq(torch.sign(x), gamma, out=agree)
            num.addcmul_(x, agree, value=w)
            den.add_(agree, alpha=w)
        # den is 0 (and then num too) or at least the smallest weight: clamping there only
        # turns 0/0 into 0.
        torch.div(num, den.clamp_(min=w_min), out=out[sl])
    return out.reshape(members[0].shape)
