"""Every merge kernel against the numpy oracle (tests/reference_np.py), plus edge cases and
the properties of the seeded filters and their random streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference_np as ref
from karmixlang.runtime import kernels as ops
from karmixlang.runtime.kernels import rng

SHAPES = [(), (7,), (5, 6), (4, 3, 3, 3)]
DTYPES = [torch.float64, torch.float32]
F64 = torch.float64


def make(shape, n, seed, dtype=F64, scale=1.0):
    """n random tensors of `shape` in `dtype`, and positive weights."""
    gen = np.random.default_rng(seed)
    xs = [torch.from_numpy(np.asarray(gen.normal(size=shape) * scale)).to(dtype) for _ in range(n)]
    ws = [float(w) for w in gen.uniform(0.5, 2.0, size=n)]
    return xs, ws


def npy(x):
    return x.detach().cpu().to(F64).numpy()


def assert_close(actual, expected, rtol=1e-5):
    """Agreement to rtol relative to the magnitude of the expected tensor."""
    expected = np.asarray(expected, dtype=np.float64)
    assert tuple(actual.shape) == expected.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
    np.testing.assert_allclose(npy(actual), expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_interpolation_matches_reference(shape, dtype):
    (a, b, c), _ = make(shape, 3, seed=1, dtype=dtype)
    A, B, C = npy(a), npy(b), npy(c)
    for t in (0.0, 0.3, 1.0, 1.5):
        assert_close(ops.lerp(a, b, t=t), ref.lerp(A, B, t))
        assert_close(ops.slerp(a, b, t=t), ref.slerp(A, B, t))
    for alpha in (1.0, 0.4, -2.0):
        assert_close(ops.add_difference(a, b, c, alpha=alpha), ref.add_difference(A, B, C, alpha))
        assert_close(
            ops.train_difference(a, b, c, alpha=alpha), ref.train_difference(A, B, C, alpha)
        )


def test_slerp_is_spherical_and_falls_back_to_lerp():
    a = torch.tensor([1.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 2.0], dtype=F64)
    mid = ops.slerp(a, b, t=0.5)
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    torch.testing.assert_close(mid, torch.tensor([s, 2 * s], dtype=F64))
    for other in (2 * a, -3 * a, torch.zeros(2, dtype=F64), a * 1e-9):
        torch.testing.assert_close(ops.slerp(a, other, t=0.25), ops.lerp(a, other, t=0.25))
    # A 0-d pair is always (anti)parallel.
    assert ops.slerp(torch.tensor(2.0), torch.tensor(-1.0), t=0.5).item() == 0.5


def test_train_difference_edge_cases():
    a = torch.tensor([1.0, 2.0, -0.0, 5.0, 3.0], dtype=F64)
    b = torch.tensor([1.0, 4.0, 7.0, 5.0, 3.0], dtype=F64)
    c = torch.tensor([3.0, 4.0, 7.0, 5.0, 1.0], dtype=F64)
    out = ops.train_difference(a, b, c, alpha=1.0)
    # b == a: share 0 -> a; b == c (also 0/0 with a == b): a exactly, including -0.0.
    assert out[0] == 1.0 and out[1] == 2.0 and out[3] == 5.0
    assert out[2].item() == 0.0 and math.copysign(1, out[2].item()) == -1
    assert out[4] == 3.0  # |b - a| = 0
    x, y, _ = make((4, 5), 3, seed=2)[0]
    assert torch.equal(ops.train_difference(x, y, y, alpha=0.7), x)
    # b far from a, close to c: nearly the full 1.8·alpha·d step.
    big = ops.train_difference(torch.zeros(1), torch.tensor([100.0]), torch.tensor([99.0]))
    assert big.item() == pytest.approx(1.8 * 100 / 101)


# ---------------------------------------------------------------- means and medians

CLUSTER_CASES = [(shape, n) for shape in SHAPES for n in (1, 2, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", CLUSTER_CASES)
def test_cluster_reductions_match_reference(shape, n, dtype):
    xs, ws = make(shape, n, seed=10 + n, dtype=dtype)
    X = [npy(x) for x in xs]
    assert_close(ops.mean(xs, ws), ref.mean(X, ws))
    assert_close(ops.sum_(xs, ws), ref.sum_(X, ws))
    assert_close(ops.median(xs, ws), ref.median(X, ws))
    assert_close(ops.median(xs, [1.0] * n), ref.median(X, [1.0] * n))
    assert_close(ops.geometric_median(xs, ws), ref.geometric_median(X, ws))
    assert_close(ops.karcher(xs, ws), ref.karcher(X, ws))
    for rule in ("mass", "count"):
        assert_close(ops.ties_merge(xs, ws, rule=rule), ref.ties_merge(X, ws, rule))
    if n >= 2:
        (base,), _ = make(shape, 1, seed=99, dtype=dtype)
        # Related models (a shared component) so that cos θ is not clamped to 0.
        models = [base + 0.5 + 0.3 * x for x in xs]
        expected = ref.model_stock([npy(m) for m in models], ws, npy(base))
        assert_close(ops.model_stock(models, ws, base), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_centers_of_clusters_large_enough_for_the_symmetric_gram_product_match_reference(dtype):
    # 40 members: the Gram matrix is summed by BLAS syrk (kernels/base._SYRK_ROWS), over
    # two whole slices (32,768 elements at 40 rows) and a partial one
    xs, ws = make((9000, 8), 40, seed=41, dtype=dtype)
    X = [npy(x) for x in xs]
    assert_close(ops.geometric_median(xs, ws), ref.geometric_median(X, ws))
    assert_close(ops.karcher(xs, ws), ref.karcher(X, ws))
    (base,), _ = make((9000, 8), 1, seed=98, dtype=dtype)
    models = [base + 0.5 + 0.3 * x for x in xs]
    assert_close(ops.model_stock(models, ws, base),
                 ref.model_stock([npy(m) for m in models], ws, npy(base)))


def test_geometric_median_options_match_reference():
    xs, ws = make((6, 5), 4, seed=3)
    X = [npy(x) for x in xs]
    for kw in (
        {"eps": 1e-3, "maxiter": 3, "ftol": 1e-20},
        {"eps": 1e-6, "maxiter": 100, "ftol": 1e-3},
    ):
        expected = ref.geometric_median(X, ws, **kw)
        assert_close(ops.geometric_median(xs, ws, **kw), expected, rtol=1e-9)
    for kw in ({"maxiter": 1, "tol": 1e-5}, {"maxiter": 50, "tol": 1e-9}):
        assert_close(ops.karcher(xs, ws, **kw), ref.karcher(X, ws, **kw), rtol=1e-9)


def test_median_rule():
    vals = [torch.tensor([v], dtype=F64) for v in (4.0, 1.0, 3.0, 2.0)]
    assert ops.median(vals, [1.0] * 4).item() == 2.5
    assert ops.median(vals[:3], [1.0] * 3).item() == 3.0
    assert ops.median(vals, [0.1] * 4).item() == 2.5
    # Weighted: 1 (w 3) outweighs the rest (w 1 + 1 + 1 = 3) only together with its tie.
    assert ops.median(vals, [1.0, 3.0, 1.0, 1.0]).item() == 1.5
    assert ops.median(vals, [1.0, 3.5, 1.0, 1.0]).item() == 1.0
    # Weights that reach half in exact arithmetic but not in floating point (0.1 + 0.2 is
    # 0.30000000000000004, half of 0.6 is 0.3) still count as a tie.
    three = [torch.tensor([v], dtype=F64) for v in (1.0, 2.0, 3.0)]
    assert 0.1 + 0.2 != 0.6 / 2
    assert ops.median(three, [0.1, 0.2, 0.3]).item() == 2.5
    assert ops.median(vals, [1 / 3, 1 / 6, 1 / 6, 1 / 3]).item() == 2.5
    assert ops.median(vals, [1 / 3, 1 / 6, 1 / 3, 1 / 6]).item() == 3.0


def test_geometric_median_edge_cases():
    (x, y, z), _ = make((3, 4), 3, seed=4)
    # N = 2, equal weights: every point of the segment is optimal; the result is the mean.
    assert torch.equal(ops.geometric_median([x, y], [1.0, 1.0]), ops.mean([x, y], [1.0, 1.0]))
    assert torch.equal(ops.geometric_median([x, y], [0.3, 0.3]), ops.mean([x, y], [0.3, 0.3]))
    # N = 2, unequal weights: the heavier member has more than half the weight and wins.
    torch.testing.assert_close(ops.geometric_median([x, y], [2.0, 1.0]), x, rtol=0, atol=1e-5)
    assert torch.equal(ops.geometric_median([x], [2.0]), x)
    # Duplicates: the iterate lands on a member (zero distance, guarded by eps), no NaN.
    out = ops.geometric_median([x, x, y, z], [1.0] * 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)
    zero = torch.zeros(3, 4, dtype=F64)
    assert torch.equal(ops.geometric_median([zero, zero, zero], [1.0, 2.0, 3.0]), zero)


def test_model_stock_edge_cases():
    (base, x, y), ws = make((4, 5), 3, seed=5)
    with pytest.raises(ValueError, match="at least 2"):
        ops.model_stock([x], [1.0], base)
    # All-zero task vectors: cos θ = 0, t = 0, the base.
    torch.testing.assert_close(ops.model_stock([base, base], [1.0, 2.0], base), base)
    # Identical task vectors: cos θ = 1, t = 1, the (weighted) mean.
    torch.testing.assert_close(ops.model_stock([x, x, x], ws, base), x)
    # Opposite task vectors: cos θ = −1 clamped to 0, t = 0, the base.
    torch.testing.assert_close(ops.model_stock([base + y, base - y], [1.0, 1.0], base), base)
    # Orthogonal task vectors of N = 2: t = 0.
    u = torch.tensor([1.0, 0.0], dtype=F64)
    v = torch.tensor([0.0, 1.0], dtype=F64)
    origin = torch.zeros(2, dtype=F64)
    torch.testing.assert_close(ops.model_stock([u, v], [1.0, 1.0], origin), origin)


def test_karcher_edge_cases():
    (x, y), _ = make((4, 5), 2, seed=6)
    assert torch.equal(ops.karcher([x], [3.0]), x)
    zero = torch.zeros(4, 5, dtype=F64)
    assert torch.equal(ops.karcher([zero, zero], [1.0, 1.0]), zero)
    # One direction: that direction times the weighted mean norm (zero members count as 0).
    torch.testing.assert_close(ops.karcher([x, 3 * x, zero], [1.0, 1.0, 2.0], maxiter=10), x)
    # Two equal-weight orthogonal unit vectors: the normalised bisector.
    u = torch.tensor([1.0, 0.0], dtype=F64)
    v = torch.tensor([0.0, 1.0], dtype=F64)
    bisector = torch.full((2,), math.sqrt(0.5), dtype=F64)
    torch.testing.assert_close(ops.karcher([u, v], [1.0, 1.0]), bisector)


def test_ties_merge_rules_by_hand():
    xs = [
        torch.tensor(v, dtype=F64)
        for v in (
            [1.0, -1.0, 2.0, 0.0, 5.0],
            [3.0, 2.0, -1.0, 0.0, -1.0],
            [-1.0, 0.5, -1.5, 0.0, -1.0],
        )
    ]
    ws = [1.0, 1.0, 1.0]
    # mass: sums 3, 1.5, -0.5, 0, 3 -> signs +, +, -, 0, +.
    want = torch.tensor([2.0, 1.25, -1.25, 0.0, 5.0], dtype=F64)
    torch.testing.assert_close(ops.ties_merge(xs, ws, rule="mass"), want)
    # count: votes +1, +1, -1, 0, -1.
    want = torch.tensor([2.0, 1.25, -1.25, 0.0, -1.0], dtype=F64)
    torch.testing.assert_close(ops.ties_merge(xs, ws, rule="count"), want)
    heavy = [5.0, 1.0, 1.0]
    # mass, element 1: -5 + 2 + 0.5 < 0, so only member 0 agrees.
    assert ops.ties_merge(xs, heavy, rule="mass")[1].item() == -1.0
    # count, element 2: 5 - 1 - 1 > 0, so only member 0 agrees.
    assert ops.ties_merge(xs, heavy, rule="count")[2].item() == 2.0
    # A perfect tie elects 0: the element is 0.
    tie = [torch.tensor([1.0]), torch.tensor([-1.0])]
    assert ops.ties_merge(tie, [1.0, 1.0], rule="mass").item() == 0.0
    assert all(t.item() == 0.0 for t in ops.elect(tie, [1.0, 1.0], rule="count"))
    with pytest.raises(ValueError, match="rule"):
        ops.elect(tie, [1.0, 1.0], rule="majority")


def test_elected_sign_does_not_depend_on_member_order():
    # 0.1 + 0.2 - 0.3 is +5.6e-17 in this order and -2.8e-17 in another.
    vals = [torch.tensor([v], dtype=F64) for v in (0.1, 0.2, -0.3)]
    for rule in ("mass", "count"):
        ws = [1.0, 1.0, 1.0] if rule == "mass" else [0.1, 0.2, 0.3]
        first = ops.elect(vals, ws, rule=rule)
        second = ops.elect(vals[::-1], ws[::-1], rule=rule)
        assert [t.item() for t in first] == [t.item() for t in second[::-1]]


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_deterministic_filters_match_reference(shape, dtype):
    (d,), _ = make(shape, 1, seed=20, dtype=dtype)
    D = npy(d)
    for density in (1.0, 0.7, 0.3, 0.05):
        assert_close(ops.trim(d, density=density), ref.trim(D, density), rtol=0)
        for gamma in (0.0, 0.01, 0.2, 0.5):
            got = ops.breadcrumbs(d, density=density, gamma=gamma)
            assert_close(got, ref.breadcrumbs(D, density, gamma), rtol=0)
    assert_close(ops.clamp(d, lo=-0.5, hi=0.25), ref.clamp(D, -0.5, 0.25), rtol=0)
    for z in (0.0, 0.5, 0.8, 1.0, 1.3):
        assert_close(ops.iso(d, z=z), ref.iso(D, z))


def test_magnitude_ties_break_by_position():
    d = torch.tensor([[1.0, -2.0, 2.0], [1.0, -1.0, 2.0]], dtype=F64)
    D = npy(d)
    for density in (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6):
        assert_close(ops.trim(d, density=density), ref.trim(D, density), rtol=0)
        got = ops.breadcrumbs(d, density=density, gamma=1 / 6)
        assert_close(got, ref.breadcrumbs(D, density, 1 / 6), rtol=0)
    # Two of the three 2s: the earlier ones.
    assert ops.trim(d, density=2 / 6).tolist() == [[0.0, -2.0, 2.0], [0.0, 0.0, 0.0]]
    # Counts: ⌈density·n⌉ kept, with no float-product surprises (0.29·100 = 28.999...96,
    # 0.07·100 = 7.000000000000001).
    big = torch.arange(1, 101, dtype=F64)
    assert int(ops.trim(big, density=0.29).ne(0).sum()) == 29
    assert int(ops.trim(big, density=0.07).ne(0).sum()) == 7
    assert int(ops.trim(big[:7], density=0.2).ne(0).sum()) == 2
    assert ops.trim(torch.tensor(-3.0), density=0.01).item() == -3.0
    # gamma drops ⌊gamma·n⌋ outliers: none from a small key at the default 0.01.
    assert torch.equal(ops.breadcrumbs(big[:7], density=1.0, gamma=0.01), big[:7])
    assert int(ops.breadcrumbs(big[:50], density=0.5, gamma=0.01).ne(0).sum()) == 25
    assert ops.breadcrumbs(big[:50], density=0.5, gamma=0.01)[-1] == 50


@pytest.mark.parametrize("negative_zeros", [True, False])
def test_trim_with_a_threshold_among_many_zeros_is_unchanged(negative_zeros):
    # A task vector as real fine-tunes leave it: ~30 % exact zeros (some -0, or none) and
    # fp16-quantised repeats, over more than one of the kernel's slices. From density 0.7 the
    # threshold falls on zero: the selection answers 0 without a histogram of the zeros, and
    # the ties at 0 are searched for only where one is -0 (the slow paths of #18), which
    # must not change which entries are kept, nor a kept zero's sign.
    rng = np.random.default_rng(18)
    d = rng.normal(scale=0.01, size=140_000).astype(np.float16).astype(np.float32)
    d[rng.random(d.size) < 0.3] = 0.0
    if negative_zeros:
        d[rng.random(d.size) < 0.05] = -0.0
    order = np.lexsort((np.arange(d.size), -np.abs(d)))  # |d| descending, then position

    def window(start, stop):
        out = np.zeros_like(d)
        out[order[start:stop]] = d[order[start:stop]]
        return out.view(np.int32)

    t = torch.from_numpy(d)
    for density in (0.3, 0.6, 0.69, 0.7, 0.75, 0.95, 1.0):
        k = math.ceil(density * d.size)
        np.testing.assert_array_equal(ops.trim(t, density=density).numpy().view(np.int32),
                                      window(0, k))
        n_top = min(math.floor(0.01 * d.size), d.size - k)
        got = ops.breadcrumbs(t, density=density, gamma=0.01).numpy().view(np.int32)
        np.testing.assert_array_equal(got, window(n_top, n_top + k))


def test_breadcrumbs_window():
    d = torch.arange(1, 101, dtype=F64)  # magnitudes 1..100
    out = ops.breadcrumbs(d, density=0.5, gamma=0.1)
    assert out.ne(0).nonzero().flatten().tolist() == list(range(40, 90))
    # density + gamma > 1: density wins, fewer top entries go.
    assert int(ops.breadcrumbs(d, density=0.95, gamma=0.1).ne(0).sum()) == 95
    assert torch.equal(ops.breadcrumbs(d, density=1.0, gamma=0.1), d)


def test_iso_edge_cases():
    v = torch.randn(7, dtype=F64)
    assert torch.equal(ops.iso(v, z=0.0), v)
    assert torch.equal(ops.iso(torch.tensor(2.0), z=0.0), torch.tensor(2.0))
    zero = torch.zeros(4, 3, 3, 3, dtype=F64)
    out = ops.iso(zero, z=0.0)
    assert torch.equal(out, zero)
    (m,), _ = make((6, 4), 1, seed=21)
    flat = ops.iso(m, z=0.0)
    s = torch.linalg.svdvals(flat)
    torch.testing.assert_close(s, torch.full_like(s, float(torch.linalg.svdvals(m).mean())))
    torch.testing.assert_close(ops.iso(m, z=1.0), m)
    (k,), _ = make((4, 3, 3, 3), 1, seed=22)
    assert_close(ops.iso(k, z=0.3), ref.iso(npy(k), 0.3))


def test_clamp_rejects_empty_interval():
    with pytest.raises(ValueError):
        ops.clamp(torch.zeros(3), lo=1.0, hi=0.0)


@pytest.mark.parametrize("shape,n", [(s, n) for s in SHAPES for n in (1, 3)])
def test_cluster_filters_match_reference(shape, n):
    xs, ws = make(shape, n, seed=30 + n)
    X = [npy(x) for x in xs]
    for rule in ("mass", "count"):
        for got, want in zip(ops.elect(xs, ws, rule=rule), ref.elect(X, ws, rule)):
            assert_close(got, want, rtol=0)
        for density in (1.0, 0.4):
            got = ops.ties(xs, ws, density=density, rule=rule)
            for g, want in zip(got, ref.ties(X, ws, density, rule)):
                assert_close(g, want, rtol=0)


# ---------------------------------------------------------------- seeded filters


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_seeded_filters_match_reference(shape, dtype):
    (d,), _ = make(shape, 1, seed=40, dtype=dtype)
    D = npy(d)
    for p, rescale in ((0.0, True), (0.3, True), (0.3, False), (0.9, True), (1.0, True)):
        got = ops.dare(d, p=p, seed=7, rescale=rescale, key="w.weight", member=2)
        assert_close(got, ref.dare(D, p, 7, rescale, "w.weight", 2))
    for p, eps, rescale, per_row in (
        (0.1, -0.05, False, False),
        (0.5, 0.2, True, False),
        (0.5, 0.2, True, True),
        (0.3, 0.5, True, True),
        (0.2, -0.3, False, True),
    ):
        got = ops.della(
            d, p=p, eps=eps, seed=-3, rescale=rescale, per_row=per_row, key="k", member=0
        )
        assert_close(got, ref.della(D, p, eps, -3, rescale, per_row, "k", 0))


def test_seeded_masks_are_reproducible_and_keyed():
    d = torch.randn(64, 64, dtype=torch.float32)

    def mask(**kw):
        args = {"p": 0.5, "seed": 1, "rescale": True, "key": "a", "member": 0} | kw
        return ops.dare(d, **args).ne(0)

    assert torch.equal(mask(), mask())
    once = ops.dare(d, p=0.5, seed=1, key="a", member=0)
    assert torch.equal(once, ops.dare(d, p=0.5, seed=1, key="a", member=0))
    for other in ({"member": 1}, {"seed": 2}, {"key": "b"}):
        assert not torch.equal(mask(), mask(**other))
    # The mask does not depend on the compute dtype.
    assert torch.equal(mask(), ops.dare(d.double(), p=0.5, seed=1, key="a", member=0).ne(0))
    # DELLA with eps = 0 draws exactly DARE's mask.
    della = ops.della(d, p=0.5, eps=0.0, seed=1, key="a", member=0)
    assert torch.equal(della.ne(0), mask())
    torch.testing.assert_close(della, ops.dare(d, p=0.5, seed=1, key="a", member=0))


def test_seeded_filters_keep_the_documented_fraction():
    n = 200_000
    d = torch.randn(n, dtype=torch.float64)
    for p in (0.1, 0.5, 0.9):
        kept = float(ops.dare(d, p=p, seed=11, key="k", member=0).ne(0).double().mean())
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        # Rescaling keeps the sum in expectation.
        total = float(ops.dare(d.abs(), p=p, seed=11, key="k", member=1).sum())
        assert total == pytest.approx(float(d.abs().sum()), rel=0.05)
    # DELLA: mean keep probability 1 - p; larger magnitudes kept more for eps > 0.
    p, eps = 0.4, 0.2
    out = ops.della(d, p=p, eps=eps, seed=12, key="k", member=0, rescale=False)
    kept = out.ne(0)
    assert abs(float(kept.double().mean()) - (1 - p)) < 0.01
    big = d.abs() > d.abs().median()
    assert float(kept[big].double().mean()) == pytest.approx(1 - p + eps / 2, abs=0.01)
    assert float(kept[~big].double().mean()) == pytest.approx(1 - p - eps / 2, abs=0.01)
    neg = ops.della(d, p=p, eps=-eps, seed=12, key="k", member=0, rescale=False).ne(0)
    assert float(neg[big].double().mean()) == pytest.approx(1 - p - eps / 2, abs=0.01)
    # per_row ranks within rows: every row keeps its own top magnitudes more.
    rows = torch.randn(50, 4000, dtype=torch.float64)
    kept = ops.della(rows, p=0.5, eps=0.5, seed=3, key="r", member=0, per_row=True).ne(0)
    top = rows.abs() > rows.abs().median(dim=1, keepdim=True).values
    assert float(kept[top].double().mean()) == pytest.approx(0.75, abs=0.02)


def test_dare_limits_and_scalars():
    (d,), _ = make((5, 6), 1, seed=41)
    assert torch.equal(ops.dare(d, p=0.0, seed=1, key="k", member=0), d)
    assert torch.equal(ops.dare(d, p=0.0, seed=1, rescale=False, key="k", member=0), d)
    assert torch.equal(ops.dare(d, p=1.0, seed=1, key="k", member=0), torch.zeros_like(d))
    s = torch.tensor(2.0)
    for fn in (
        lambda x: ops.trim(x, density=0.5),
        lambda x: ops.dare(x, p=0.5, seed=1, key="s", member=0),
        lambda x: ops.della(x, p=0.5, eps=0.1, seed=1, key="s", member=0),
        lambda x: ops.della(x, p=0.5, eps=0.1, seed=1, key="s", member=0, per_row=True),
    ):
        out = fn(s)
        assert out.shape == () and out.item() in (0.0, 2.0, 4.0)
    # A lone entry's r̂ is 1/2: keep probability 1 - p, whatever eps.
    keeps = [
        ops.della(s, p=0.5, eps=0.5, seed=1, key="s", member=m, rescale=False).item() != 0
        for m in range(400)
    ]
    assert 150 < sum(keeps) < 250


# ---------------------------------------------------------------- random streams


def test_uniform_is_chunk_independent():
    name = "model.diffusion_model.out.2.weight"
    whole = rng.uniform(250608, name, 3, 1000)
    for cuts in (
        [0, 1000],
        [0, 1, 2, 3, 1000],
        [0, 5, 6, 333, 334, 999, 1000],
        list(range(0, 1001, 7)) + [1000],
    ):
        parts = [rng.uniform(250608, name, 3, b - a, a) for a, b in zip(cuts, cuts[1:])]
        assert np.array_equal(np.concatenate(parts), whole)
    assert whole.dtype == np.float64 and whole.min() >= 0 and whole.max() < 1
    assert rng.uniform(1, "k", 0, 0).shape == (0,)


def test_uniform_reproduces_the_documented_scheme():
    for seed, key, member, offset in (
        (0, "", 0, 0),
        (250608, "layer.weight", 3, 0),
        (-5, "ü.bias", 1, 6),
        (7, "k", 2, (1 << 66) + 3),
    ):
        got = rng.uniform(seed, key, member, 9, offset)
        assert np.array_equal(got, ref.uniforms(seed, key, member, 9, offset))
    assert rng.stream_key(5, "k", 0) == ref.philox_key(5, "k", 0)
    assert np.array_equal(rng.uniform(-1, "k", 0, 8), rng.uniform((1 << 64) - 1, "k", 0, 8))
    with pytest.raises(ValueError):
        rng.uniform(1 << 64, "k", 0, 1)
    with pytest.raises(ValueError):
        rng.uniform(1, "k", -1, 1)
    with pytest.raises(TypeError):
        rng.uniform(1.5, "k", 0, 1)


# ---------------------------------------------------------------- every op: purity and empties

ALL_OPS = {
    "lerp": lambda xs, ws: ops.lerp(xs[0], xs[1], t=0.3),
    "slerp": lambda xs, ws: ops.slerp(xs[0], xs[1], t=0.3),
    "add_difference": lambda xs, ws: ops.add_difference(xs[0], xs[1], xs[2], alpha=0.5),
    "train_difference": lambda xs, ws: ops.train_difference(xs[0], xs[1], xs[2], alpha=0.5),
    "mean": ops.mean,
    "sum_": ops.sum_,
    "median": ops.median,
    "geometric_median": lambda xs, ws: ops.geometric_median(
        xs, ws, eps=1e-6, maxiter=100, ftol=1e-20
    ),
    "model_stock": lambda xs, ws: ops.model_stock(xs[1:], ws[1:], xs[0]),
    "karcher": lambda xs, ws: ops.karcher(xs, ws, maxiter=10, tol=1e-5),
    "ties_merge": lambda xs, ws: ops.ties_merge(xs, ws, rule="mass"),
    "trim": lambda xs, ws: ops.trim(xs[0], density=0.5),
    "dare": lambda xs, ws: ops.dare(xs[0], p=0.5, seed=1, rescale=True, key="k", member=0),
    "della": lambda xs, ws: ops.della(
        xs[0], p=0.5, eps=0.1, seed=1, rescale=True, per_row=True, key="k", member=0
    ),
    "breadcrumbs": lambda xs, ws: ops.breadcrumbs(xs[0], density=0.5, gamma=0.1),
    "clamp": lambda xs, ws: ops.clamp(xs[0], lo=-0.1, hi=0.1),
    "iso": lambda xs, ws: ops.iso(xs[0], z=0.5),
    "elect": lambda xs, ws: ops.elect(xs, ws, rule="count"),
    "ties": lambda xs, ws: ops.ties(xs, ws, density=0.5, rule="mass"),
    "zeros_like": lambda xs, ws: ops.zeros_like(xs[0]),
}


@pytest.mark.parametrize("name", sorted(ALL_OPS))
@pytest.mark.parametrize("shape", SHAPES + [(0,), (3, 0), (0, 2, 3, 3)])
def test_ops_leave_inputs_alone_and_keep_shape_and_dtype(name, shape):
    xs, ws = make(shape, 4, seed=50, dtype=torch.float32)
    before = [x.clone() for x in xs]
    out = ALL_OPS[name](xs, ws)
    for got in out if isinstance(out, list) else [out]:
        assert got.shape == xs[0].shape and got.dtype == torch.float32
        assert all(got.data_ptr() != x.data_ptr() or got.numel() == 0 for x in xs)
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 3, 3)])
def test_all_zero_deltas(shape):
    zero = [torch.zeros(shape, dtype=F64) for _ in range(3)]
    ws = [1.0, 2.0, 0.5]
    for name, fn in ALL_OPS.items():
        out = fn(zero, ws)
        for got in out if isinstance(out, list) else [out]:
            assert torch.equal(got, torch.zeros(shape, dtype=F64)), name


def test_cluster_arguments_are_checked():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="at least one"):
        ops.mean([], [])
    with pytest.raises(ValueError, match="weights"):
        ops.median([x, x], [1.0])
    with pytest.raises(ValueError, match="positive"):
        ops.geometric_median([x, x], [1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        ops.mean([x, torch.zeros(4)], [1.0, 1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    xs, ws = make((64, 33), 4, seed=60, dtype=torch.float32)
    gpu = [x.cuda() for x in xs]
    for name, fn in ALL_OPS.items():
        want, got = fn(xs, ws), fn(gpu, ws)
        want, got = (v if isinstance(v, list) else [v] for v in (want, got))
        for w, g in zip(want, got):
            assert g.device.type == "cuda", name
            torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5, msg=name)
    for seeded in ("dare", "della"):
        assert torch.equal(ALL_OPS[seeded](gpu, ws).ne(0).cpu(), ALL_OPS[seeded](xs, ws).ne(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 200), (2, 5000), (1, 300_000)])
@pytest.mark.parametrize("sort", ["radix", "in parts"])
def test_ordinal_ranks_break_ties_by_position(dtype, shape, sort, monkeypatch):
    from karmixlang.runtime.kernels import sparse
    from karmixlang.runtime.kernels.sparse import ordinal_ranks

    if sort == "in parts":  # fp64 keys too long for one sort: rows wider than RANK_GROUP
        # group by group, narrower ones in blocks of rows (narrower floats sort packed keys
        # at any size: both settings must give the same ranks)
        monkeypatch.setattr(sparse, "RADIX_SORT_MAX_ELEMS", 100)
        monkeypatch.setattr(sparse, "RANK_GROUP", 1000)

    # Signed values with many equal magnitudes, both zeros and infinities: a magnitude tie
    # between x and -x, or 0.0 and -0.0, goes to the earlier position.
    rng = np.random.default_rng(4)
    values = rng.integers(-5, 6, size=shape).astype(np.float64) * 0.25
    values[0, :10] = -0.0
    values[-1, -3:] = [np.inf, -np.inf, 1e-3]
    rows = torch.from_numpy(values).to(dtype)
    magnitudes = rows.abs().to(torch.float64).numpy()
    expected = np.empty(shape, dtype=np.int64)
    for r in range(shape[0]):
        expected[r, np.argsort(magnitudes[r], kind="stable")] = np.arange(shape[1])
    assert np.array_equal(ordinal_ranks(rows).numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_grouped_ranks_of_a_sparse_delta_match_a_stable_argsort(dtype, monkeypatch):
    # A fine-tune's delta: a third exact zeros, repeats from fp16 quantisation and a spread of
    # exponents, so that groups hold many magnitudes, one bucket (the zeros) exceeds a group
    # and groups are cut inside an exponent. fp64 ranks group by group here; narrower floats
    # sort packed keys whole, which must give the same ranks.
    from karmixlang.runtime.kernels import sparse

    monkeypatch.setattr(sparse, "RADIX_SORT_MAX_ELEMS", 100)
    monkeypatch.setattr(sparse, "RANK_GROUP", 20_000)
    rng = np.random.default_rng(8)
    values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-4, 1, 200_000))
    values = values.astype(np.float16).astype(np.float64)
    values[rng.random(values.size) < 0.33] = 0.0
    rows = torch.from_numpy(values).to(dtype).reshape(1, -1)
    expected = np.empty(values.size, dtype=np.int64)
    expected[np.argsort(rows.abs().to(torch.float64).numpy()[0], kind="stable")] = \
        np.arange(values.size)
    assert np.array_equal(sparse.ordinal_ranks(rows).numpy()[0], expected)


def test_elected_sign_of_near_ties_does_not_depend_on_member_order():
    from karmixlang.runtime.kernels.sparse import _order_free_sign

    big = 3.0e7
    votes = torch.tensor([[big, 1.0, -1.0], [1.0, big, 1.0], [-big, -big, 0.5]], dtype=torch.float32)
    expected = torch.sign(votes.sort(dim=0).values.sum(dim=0))
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        assert torch.equal(_order_free_sign(votes[perm]), expected)
