"""The optimizer's algebraic rewrites (ir/optimize.py: `fold` and `laws`): each law by
hypothesis on the kernels or on a numpy evaluation of the graph, and each rewrite on kmx runs
of tiny inputs against the same recipe run with the rewrite switched off — bit for bit where
docs/architecture.md promises it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import load_file

from karmixlang.api import compile as compile_recipe
from karmixlang.demo.synth import write_model
from karmixlang.ir import optimize as opt
from karmixlang.ir.graph import Builder, Graph, SaveSpec
from karmixlang.plan import compile as compile_module
from karmixlang.runtime import kernels as ops
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe

LAWS = settings(max_examples=100, deadline=None, database=None)
RULES = st.sampled_from(["mass", "count"])

# Task-vector entries as real fine-tunes have them: many exact zeros (±0), fp16-quantised
# values that repeat, subnormals, and ordinary floats.
entries = st.one_of(
    st.sampled_from([0.0, -0.0, 0.0, 1e-45, -1e-45, 1e-40]),
    st.sampled_from([0.25, -0.25, 0.5, -0.5, 2.0 ** -14, -(2.0 ** -14)]),
    st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=16),
    st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32),
)


@st.composite
def clusters(draw):
    shape = draw(st.sampled_from([(1,), (7,), (3, 4), (2, 3, 5)]))
    n = draw(st.integers(1, 5))
    xs = [torch.from_numpy(draw(arrays(np.float32, shape, elements=entries))) for _ in range(n)]
    ws = draw(st.lists(st.floats(1e-3, 50.0), min_size=n, max_size=n))
    return xs, ws


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


@LAWS
@given(clusters(), st.floats(0.05, 1.0), RULES, RULES)
def test_ties_merge_of_ties_is_ties_merge_of_trim_with_the_first_rule(c, density, r1, r2):
    xs, ws = c
    elected = ops.ties(xs, ws, density=density, rule=r1)
    trimmed = [ops.trim(x, density=density) for x in xs]
    left = ops.ties_merge(elected, ws, rule=r2)
    right = ops.ties_merge(trimmed, ws, rule=r1)
    np.testing.assert_array_equal(bits(left), bits(right))


@LAWS
@given(clusters(), RULES, RULES)
def test_ties_merge_of_elect_is_ties_merge_with_the_first_rule(c, r1, r2):
    xs, ws = c
    left = ops.ties_merge(ops.elect(xs, ws, rule=r1), ws, rule=r2)
    np.testing.assert_array_equal(bits(left), bits(ops.ties_merge(xs, ws, rule=r1)))


# ------------------------------------------------------------------ fold, on the graph

def evaluate(node, values: dict) -> np.ndarray:
    """The graph's value in fp64 numpy, from its definition (loads, lincombs, zeros)."""
    if node.op == "load":
        return values[node.attr("path")]
    if node.op == "zeros_like":
        return np.zeros_like(evaluate(node.inputs[0], values))
    assert node.op == "lincomb"
    return sum(c * evaluate(x, values) for x, c in zip(node.inputs, node.attr("coeffs")))


@st.composite
def nested_combinations(draw):
    """A random nest of linear combinations of three loads (repeats, zeros and ones
    included), as a graph with one save."""
    b = Builder()
    leaves = [b.node("load", (), {"path": p}) for p in "xyz"]
    coeff = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-3, 3))
    pool = list(leaves)
    for _ in range(draw(st.integers(1, 6))):
        picked = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
        coeffs = tuple(draw(coeff) for _ in picked)
        pool.append(b.node("lincomb", tuple(picked), {"coeffs": coeffs}))
    save = SaveSpec("/out", "out", pool[-1], None, "", None, (), None, False, None)
    return Graph([save], b.origins, built=b.built)


@LAWS
@given(nested_combinations(), arrays(np.float64, (3, 4), elements=st.floats(-5, 5)))
def test_fold_keeps_the_value_of_every_nest_of_combinations(graph, data):
    values = dict(zip("xyz", data))
    folded = opt.fold(graph)
    before, after = evaluate(graph.saves[0].expr, values), evaluate(folded.saves[0].expr, values)
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9 * (1 + np.abs(before).max()))
    nested = [n for n in folded.nx() if n.op == "lincomb"
              and any(x.op == "lincomb" for x in n.inputs)]
    assert not nested  # one combination: nothing left to flatten


# ------------------------------------------------------------------ on kmx runs

def sparse_models(folder, names=("base", "a", "b", "c"), seed=3):
    """fp32 models whose deltas from `base` are ~30 % exact zeros and fp16-quantised repeats."""
    rng = np.random.default_rng(seed)
    base = {"model.w": rng.normal(size=(8, 16)).astype(np.float32),
            "model.b": rng.normal(size=(16,)).astype(np.float32),
            "pos_ids": np.arange(4, dtype=np.int64)}
    write_model(str(folder / "base.safetensors"), base)
    for name in names[1:]:
        tensors = dict(base)
        for k in ("model.w", "model.b"):
            delta = rng.normal(scale=0.05, size=base[k].shape).astype(np.float16)
            delta[rng.random(delta.shape) < 0.3] = 0
            tensors[k] = base[k] + delta.astype(np.float32)
        write_model(str(folder / f"{name}.safetensors"), tensors)


def run_both(monkeypatch, path) -> tuple[dict, dict, list[str]]:
    """Outputs of the recipe with the `laws` pass and without it (the recipe's `out` param
    names the folder), and the optimizer notes of the first."""
    on = compile_recipe(path, {"out": "on"})
    execute(on, RunOptions(threads=1))
    with monkeypatch.context() as m:
        m.setattr(compile_module, "laws", lambda graph, covers: graph)
        off = compile_recipe(path, {"out": "off"})
        assert not any(note.startswith("laws:") for note in off.plan.data["optimizer"])
        execute(off, RunOptions(threads=1))
    read = lambda c: {s.written: load_file(s.path) for s in c.graph.saves}  # noqa: E731
    ons, offs = read(on), read(off)
    return ({k.replace("on/", ""): v for k, v in ons.items()},
            {k.replace("off/", ""): v for k, v in offs.items()}, on.plan.data["optimizer"])


def same_bits(x: dict, y: dict):
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].tobytes() == y[k].tobytes(), k


@pytest.mark.parametrize("r1,r2", [("count", "count"), ("mass", "count"), ("count", "mass")])
def test_reelection_runs_bit_exact(workdir, monkeypatch, r1, r2):
    sparse_models(workdir)
    path = recipe(workdir, f"""
        param out = "on"
        base o = "base.safetensors"
        cluster pool = [a: 2, "b.safetensors", "c.safetensors": 0.5]
        model a = "a.safetensors"
        save "${{out}}/ties.safetensors" = o + ties_merge(
            ties(pool - o, density=0.7, rule="{r1}"), rule="{r2}")
        save "${{out}}/elect.safetensors" = o + ties_merge(
            elect(pool - o, rule="{r1}"), rule="{r2}")
    """)
    on, off, notes = run_both(monkeypatch, path)
    assert any(n.startswith("laws: 2 re-election(s)") for n in notes)
    for name in on:
        same_bits(on[name], off[name])


def test_reelection_keeps_an_election_read_elsewhere(workdir):
    sparse_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors"]
        let elected = ties(pool - o, density=0.5, rule="count")
        save "merged.safetensors" = o + ties_merge(elected, rule="mass")
        save "soup.safetensors" = o + mean(elected)
    """)
    c = compile_recipe(path)
    assert not any(n.startswith("laws") for n in c.plan.data["optimizer"])
    assert [n["op"] for n in c.plan.data["nodes"]].count("ties") == 1


def test_zero_delta_terms_vanish_bit_exact(workdir, monkeypatch):
    sparse_models(workdir)
    path = recipe(workdir, """
        param out = "on"
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "${out}/z.safetensors" = a + zeros_like(o) with dtype="fp16"
        save "${out}/y.safetensors" = 0.5*a + 0.5*o + zeros_like(a)
    """)
    on, off, notes = run_both(monkeypatch, path)
    assert any(n.startswith("laws: 2 zero delta term(s)") for n in notes)
    for name in on:
        same_bits(on[name], off[name])


def test_uncentred_equivariant_methods_agree_to_rounding(workdir, monkeypatch):
    sparse_models(workdir)
    path = recipe(workdir, """
        param out = "on"
        base o = "base.safetensors"
        cluster pool = [a: 2, "b.safetensors", "c.safetensors"]
        model a = "a.safetensors"
        save "${out}/mean.safetensors" = o + mean(pool - o)
        save "${out}/median.safetensors" = o + median(pool - o)
        save "${out}/gm.safetensors" = o + geometric_median(pool - o)
    """)
    c = compile_recipe(path, {"out": "on"})
    assert [w.code for w in c.warnings] == ["K0213"] * 3  # judged on the recipe as written
    assert "lincomb" not in {n["op"] for n in c.plan.data["nodes"]}
    on, off, notes = run_both(monkeypatch, path)
    assert any(n.startswith("laws: 3 `base + F(c - base)`") for n in notes)
    for name in on:
        assert on[name].keys() == off[name].keys()
        for k in on[name]:
            np.testing.assert_allclose(on[name][k], off[name][k], rtol=1e-6, atol=1e-6)


def test_uncentring_never_changes_the_key_set(workdir, monkeypatch):
    # A fine-tune with a key the base lacks: `o + mean(pool - o)` does not compute it (it is
    # copied from the fallback, here the fine-tune), `mean(pool)` would; the law stays off.
    sparse_models(workdir)
    extra = dict(load_file(str(workdir / "a.safetensors")), **{"ema.w": np.ones(3, np.float32)})
    write_model(str(workdir / "a.safetensors"), extra)
    write_model(str(workdir / "b.safetensors"), extra)
    path = recipe(workdir, """
        param out = "on"
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "${out}/m.safetensors" = o + mean([a, "b.safetensors"] - o) with fallback=a
    """)
    on, off, notes = run_both(monkeypatch, path)
    assert not any(n.startswith("laws") for n in notes)
    same_bits(on["m.safetensors"], off["m.safetensors"])
