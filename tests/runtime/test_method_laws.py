"""Algebraic laws of the merge kernels (methods.md, "Algebraic properties"), by hypothesis."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from karmixlang.runtime import kernels as ops

F64 = torch.float64
LAWS = settings(max_examples=100, deadline=None, database=None)

shapes = st.sampled_from([(), (1,), (5,), (3, 4), (2, 2, 2, 2)])
values = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False)
weights_of = lambda n: st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n)  # noqa: E731


@st.composite
def clusters(draw, min_size=1, max_size=6):
    shape = draw(shapes)
    n = draw(st.integers(min_size, max_size))
    xs = [torch.from_numpy(draw(arrays(np.float64, shape, elements=values))) for _ in range(n)]
    return xs, draw(weights_of(n))


def close(a, b, rtol=1e-7):
    scale = 1.0 + max((float(t.abs().max()) for t in (a, b) if t.numel()), default=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


def permuted(xs, ws, perm):
    return [xs[i] for i in perm], [ws[i] for i in perm]


@LAWS
@given(clusters(max_size=1), st.integers(1, 6), st.data())
def test_identical_members_give_that_member(cluster, n, data):
    (x,), _ = cluster
    ws = data.draw(weights_of(n))
    close(ops.mean([x] * n, ws), x, rtol=1e-12)
    assert torch.equal(ops.median([x] * n, ws), x)
    close(ops.geometric_median([x] * n, ws), x, rtol=1e-12)


@LAWS
@given(clusters(min_size=1, max_size=3), arrays(np.float64, 1, elements=values))
def test_geometric_median_of_point_symmetric_set_is_its_centre(half, offset):
    vs, ws = half
    centre = torch.full_like(vs[0], float(offset[0]))
    members = [centre + v for v in vs] + [centre - v for v in vs]
    out = ops.geometric_median(members, ws + ws)
    close(out, centre, rtol=1e-9)


@LAWS
@given(clusters(), st.sampled_from(["mass", "count"]))
def test_ties_with_full_density_and_unanimous_signs_is_the_mean(cluster, rule):
    xs, ws = cluster
    # Unanimous: every member has the sign pattern of the first, and no zeros.
    signs = torch.where(xs[0] >= 0, 1.0, -1.0).to(F64)
    xs = [signs * (x.abs() + 0.5) for x in xs]
    expected = ops.mean(xs, ws)
    close(ops.ties_merge(xs, ws, rule=rule), expected, rtol=1e-12)
    close(ops.mean(ops.ties(xs, ws, density=1.0, rule=rule), ws), expected, rtol=1e-12)


@LAWS
@given(
    clusters(max_size=1),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=20),
    st.integers(0, 50),
    st.booleans(),
)
def test_dare_with_p_zero_is_identity(cluster, seed, key, member, rescale):
    (d,), _ = cluster
    assert torch.equal(ops.dare(d, p=0.0, seed=seed, rescale=rescale, key=key, member=member), d)


@LAWS
@given(clusters(min_size=2), st.sampled_from(["mass", "count"]), st.randoms(use_true_random=False))
def test_member_order_does_not_matter(cluster, rule, rand):
    xs, ws = cluster
    perm = list(range(len(xs)))
    rand.shuffle(perm)
    pxs, pws = permuted(xs, ws, perm)
    close(ops.mean(pxs, pws), ops.mean(xs, ws), rtol=1e-12)
    assert torch.equal(ops.median(pxs, pws), ops.median(xs, ws))
    close(ops.geometric_median(pxs, pws), ops.geometric_median(xs, ws))
    close(ops.ties_merge(pxs, pws, rule=rule), ops.ties_merge(xs, ws, rule=rule), rtol=1e-12)
    elected = ops.elect(xs, ws, rule=rule)
    for got, i in zip(ops.elect(pxs, pws, rule=rule), perm):
        assert torch.equal(got, elected[i])


@LAWS
@given(clusters(), st.data())
def test_translation_equivariance(cluster, data):
    xs, ws = cluster
    b = torch.from_numpy(data.draw(arrays(np.float64, xs[0].shape, elements=values)))
    moved = [x - b for x in xs]
    for op in (ops.mean, ops.median):
        close(b + op(moved, ws), op(xs, ws))
    # Weiszfeld stops within its tolerance, and a translated start takes another path there.
    close(b + ops.geometric_median(moved, ws), ops.geometric_median(xs, ws), rtol=1e-6)
