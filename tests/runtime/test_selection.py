"""Selecting a trim's threshold (kernels/sparse.py): the sampled bracket, its radix fallback,
numpy's partition for small keys, and the exact "count" election, each against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from karmixlang.runtime.kernels import sparse

# Magnitude bits with many repeats and zeros: a few distinct values, some of them 0.
bits_arrays = st.integers(1, 400).flatmap(lambda n: arrays(
    np.int32, n, elements=st.sampled_from([0, 0, 1, 2, 7, 1 << 20, (1 << 20) + 1, 2**31 - 1])
    | st.integers(0, 2**31 - 1)))


@settings(max_examples=300, deadline=None)
@given(a=bits_arrays, data=st.data())
def test_a_bracket_finds_the_entry_or_says_it_missed(a, data):
    """Whatever the sample (even one from other data) and the cap, `found` is the entry at
    the index in ascending order or None, and `count_above` counts the entries above it."""
    index = data.draw(st.integers(0, a.size - 1))
    sample = np.sort(data.draw(st.one_of(
        st.just(a.copy()),
        arrays(np.int32, st.integers(1, 50), elements=st.integers(0, 2**31 - 1)))))
    cap = data.draw(st.integers(0, a.size))
    bracket = sparse.Bracket(index, a.size, sample, cap=cap)
    step = data.draw(st.integers(1, a.size))
    for start in range(0, a.size, step):
        bracket.add(a[start:start + step])
    value = bracket.found()
    if value is not None:
        assert value == np.sort(a)[index]
        assert bracket.count_above(value) == np.count_nonzero(a > value)
    elif sample.size == a.size and np.array_equal(sample, np.sort(a)) and cap == a.size:
        pytest.fail("a sample of every entry, with room for them all, cannot miss")


def sparse_delta(n: int, seed: int) -> np.ndarray:
    """A task vector as fine-tunes leave it: fp16-quantised differences (many repeated
    magnitudes) and ~30 % exact zeros, some of them -0."""
    rng = np.random.default_rng(seed)
    d = rng.normal(scale=0.01, size=n).astype(np.float16).astype(np.float32)
    d[rng.random(n) < 0.3] = 0.0
    d[rng.random(n) < 0.02] = -0.0
    return d


@pytest.mark.parametrize("n", [50_000, sparse.BRACKET_MIN_ELEMS + 12_345])
@pytest.mark.parametrize("guess", ["holds", "misses"])
def test_thresholds_are_the_entries_of_the_sorted_magnitudes(n, guess, monkeypatch):
    """Small keys select by numpy's partition (or the zeros' count), large ones by the
    sampled bracket, or, where it misses, by radix selection: the same entries."""
    if guess == "misses":
        monkeypatch.setattr(sparse.Bracket, "found", lambda self: None)
    magnitude = np.abs(sparse_delta(n, seed=n))
    ordered = np.sort(magnitude)
    indices = [0, 1, n // 10, n // 3, n // 2, math.ceil(0.7 * n), n - 2, n - 1]
    got = sparse._kth_smallest(torch.from_numpy(magnitude), indices)
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), ordered[indices])


@pytest.mark.parametrize("density", [0.05, 0.3, 0.69, 0.7, 0.9])
def test_a_large_trim_keeps_the_largest_magnitudes_first_by_position(density):
    d = sparse_delta(sparse.BRACKET_MIN_ELEMS * 2, seed=7)
    order = np.lexsort((np.arange(d.size), -np.abs(d)))  # |d| descending, then position
    k = math.ceil(density * d.size)
    want = np.zeros_like(d)
    want[order[:k]] = d[order[:k]]
    got = sparse.trim(torch.from_numpy(d), density=density).numpy()
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@settings(max_examples=100, deadline=None)
@given(votes=arrays(np.int8, st.tuples(st.integers(1, 9), st.integers(1, 300)),
                    elements=st.integers(-2, 2)),
       weights=st.lists(st.integers(1, 5), min_size=9, max_size=9))
def test_whole_weights_elect_by_count_as_the_sorted_sum_does(votes, weights):
    """With whole-number weights, "count" sums are exact in any order: the fast election
    gives the signs of the sorted sums (and of numpy's exact integer sums)."""
    members = [torch.from_numpy(row.astype(np.float32) * 0.37) for row in votes]
    ws = [float(w) for w in weights[:len(members)]]
    assert sparse._exact_counts(ws, torch.float32)
    fast = torch.cat([g for _, g in sparse._elected_signs(members, ws, "count")])
    exact = np.sign((np.sign(votes).astype(np.int64) * np.asarray(ws, dtype=np.int64)[:, None])
                    .sum(axis=0))
    np.testing.assert_array_equal(fast.numpy(), exact)
    stacked = torch.stack([torch.sign(m) * w for m, w in zip(members, ws)])
    np.testing.assert_array_equal(fast.numpy(), sparse._order_free_sign(stacked).numpy())


def test_count_sums_past_the_exact_integers_take_the_sorted_path():
    assert not sparse._exact_counts([0.5, 1.0], torch.float32)
    assert not sparse._exact_counts([2.0**23, 2.0**23, 1.0], torch.float32)
    assert sparse._exact_counts([2.0**23, 2.0**23], torch.float32)
    assert sparse._exact_counts([2.0**40, 3.0], torch.float64)
