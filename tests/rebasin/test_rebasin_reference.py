"""The numpy reference of weight matching (tests/rebasin_np.py) checked on its own: a random
permutation allowed by each kind of group is a true symmetry of a small numpy network, and
matching recovers it exactly from the permuted copy."""

from __future__ import annotations

import numpy as np
import pytest

import rebasin_np as R


def mlp(rng, sizes):
    p = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        p[f"fc{i}.weight"] = rng.standard_normal((n_out, n_in))
        p[f"fc{i}.bias"] = rng.standard_normal(n_out)
    return p


def mlp_forward(p, x, layers):
    for i in range(layers):
        x = x @ p[f"fc{i}.weight"].T + p[f"fc{i}.bias"]
        if i < layers - 1:
            x = np.maximum(x, 0)
    return x


def chain_spec(layers):
    return {
        "permutations": {
            f"P{i}": [[f"fc{i}.weight", 0], [f"fc{i}.bias", 0], [f"fc{i + 1}.weight", 1]]
            for i in range(layers - 1)
        }
    }


def permuted(params, groups, seed):
    rng = np.random.default_rng(seed)
    truth = {g.name: R.random_perm(g, params, rng) for g in groups}
    return R.apply(params, groups, truth), truth


def assert_recovered(a, groups, seed=1):
    b, truth = permuted(a, groups, seed)
    found, sweeps = R.weight_matching(a, b, groups, seed=seed)
    for g in groups:
        assert R.same(found[g.name], R.inverse(truth[g.name])), g.name
    aligned = R.apply(b, groups, found)
    for k in a:
        np.testing.assert_array_equal(aligned[k], a[k])
    return sweeps


def test_permuted_mlp_same_function_and_recovered_exactly():
    rng = np.random.default_rng(0)
    a = mlp(rng, [5, 16, 12, 3])
    groups = R.parse_spec(chain_spec(3))
    b, _ = permuted(a, groups, 3)
    x = rng.standard_normal((7, 5))
    np.testing.assert_allclose(mlp_forward(b, x, 3), mlp_forward(a, x, 3), rtol=1e-12)
    assert not np.array_equal(b["fc0.weight"], a["fc0.weight"])
    assert_recovered(a, groups)


def test_apply_then_inverse_is_identity():
    rng = np.random.default_rng(1)
    a = mlp(rng, [4, 9, 6])
    groups = R.parse_spec(chain_spec(2))
    b, truth = permuted(a, groups, 5)
    back = R.apply(b, groups, {n: R.inverse(p) for n, p in truth.items()})
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])


def group_norm(h, groups, w, b):
    n, c = h.shape
    g = h.reshape(n, groups, c // groups)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(n, c) * w + b


GN_SPEC = {
    "permutations": {
        "hidden": [
            ["in.weight", 0], ["in.bias", 0], ["norm.weight", 0], ["norm.bias", 0],
            ["out.weight", 1],
        ]
    },
    "constraints": {"hidden": {"blocks": 4, "inner": "free"}},
}


def gn_block(p, x):
    h = x @ p["in.weight"].T + p["in.bias"]
    return np.maximum(group_norm(h, 4, p["norm.weight"], p["norm.bias"]), 0) @ p["out.weight"].T


def test_groupnorm_groups_move_whole_and_are_recovered():
    rng = np.random.default_rng(2)
    a = {
        "in.weight": rng.standard_normal((24, 6)),
        "in.bias": rng.standard_normal(24),
        "norm.weight": 1 + 0.1 * rng.standard_normal(24),
        "norm.bias": 0.1 * rng.standard_normal(24),
        "out.weight": rng.standard_normal((5, 24)),
    }
    groups = R.parse_spec(GN_SPEC)
    b, truth = permuted(a, groups, 4)
    assert truth["hidden"].inner is not None and not np.array_equal(truth["hidden"].block, np.arange(4))
    x = rng.standard_normal((8, 6))
    np.testing.assert_allclose(gn_block(b, x), gn_block(a, x), rtol=1e-10)
    # a permutation that splits a group is no symmetry: the constraint is needed
    split = dict(a, **{k: np.roll(v, 1, axis=0 if k != "out.weight" else 1) for k, v in a.items()})
    assert not np.allclose(gn_block(split, x), gn_block(a, x))
    assert_recovered(a, groups)


def attention(p, x, heads, kv_heads):
    """Grouped-query self-attention with a rotation of each head's (even, odd) pairs standing
    in for RoPE: positions inside a head must keep their order."""
    n, _ = x.shape
    d = p["q"].shape[0] // heads
    q = (x @ p["q"].T).reshape(n, heads, d)
    k = (x @ p["k"].T).reshape(n, kv_heads, d)
    v = (x @ p["v"].T).reshape(n, kv_heads, d)
    angle = np.arange(n)[:, None] * (1.0 + np.arange(d // 2))[None, :]
    def rope(t):
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        even, odd = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out
    q, k = rope(q), rope(k)
    group = heads // kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("nhd,mhd->hnm", q, k) / np.sqrt(d)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hnm,mhd->nhd", w, v).reshape(n, heads * d)
    return o @ p["o"].T


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_heads_move_whole_with_grouped_kv_and_are_recovered(heads, kv_heads):
    rng = np.random.default_rng(3)
    d, width = 4, 10
    a = {
        "q": rng.standard_normal((heads * d, width)),
        "k": rng.standard_normal((kv_heads * d, width)),
        "v": rng.standard_normal((kv_heads * d, width)),
        "o": rng.standard_normal((width, heads * d)),
    }
    spec = {
        "permutations": {"heads": [["q", 0], ["k", 0], ["v", 0], ["o", 1]]},
        "constraints": {"heads": {"blocks": kv_heads, "inner": "fixed"}},
    }
    groups = R.parse_spec(spec)
    b, _ = permuted(a, groups, 6)
    x = rng.standard_normal((5, width))
    np.testing.assert_allclose(attention(b, x, heads, kv_heads), attention(a, x, heads, kv_heads), rtol=1e-9)
    assert_recovered(a, groups)


def test_ranges_of_fused_tensors():
    """A fused qkv (three ranges of one axis, permuted alike) and a GEGLU projection (value
    and gate halves) in one model; the untouched part of a fused axis stays put."""
    rng = np.random.default_rng(4)
    h, w, f = 8, 6, 5
    a = {
        "qkv": rng.standard_normal((3 * h + f, w)),  # q, k, v, then an MLP's f units
        "proj": rng.standard_normal((w, h + f)),
        "geglu": rng.standard_normal((2 * 7, w)),
        "down": rng.standard_normal((w, 7)),
    }
    spec = {
        "permutations": {
            "heads": [["qkv", 0, 0, h], ["qkv", 0, h, 2 * h], ["qkv", 0, 2 * h, 3 * h], ["proj", 1, 0, h]],
            "mlp": [["qkv", 0, 3 * h, 3 * h + f], ["proj", 1, h, h + f]],
            "ff": [["geglu", 0, 0, 7], ["geglu", 0, 7, 14], ["down", 1]],
        },
        "constraints": {"heads": {"blocks": 2, "inner": "fixed"}},
    }
    groups = R.parse_spec(spec)
    b, truth = permuted(a, groups, 7)
    ff = truth["ff"].indices(7)
    np.testing.assert_array_equal(b["geglu"][:7], a["geglu"][ff])
    np.testing.assert_array_equal(b["geglu"][7:], a["geglu"][7 + ff])
    np.testing.assert_array_equal(b["qkv"][3 * h:], a["qkv"][3 * h + truth["mlp"].indices(f)])
    assert_recovered(a, groups)


def test_sizes_that_disagree_are_refused():
    a = {"x": np.zeros((4, 2)), "y": np.zeros((3, 5))}
    groups = R.parse_spec({"permutations": {"P": [["x", 0], ["y", 0]]}})
    with pytest.raises(ValueError, match="different lengths"):
        R.identity(groups[0], a)


def test_layer_placeholder_expands_for_the_model_depth():
    spec = {
        "permutations": {
            "layers.{layer}.mlp": [["m.layers.{layer}.up.weight", 0], ["m.layers.{layer}.down.weight", 1]],
            "fixed": [["head.weight", 0]],
        },
        "constraints": {"layers.{layer}.mlp": {"blocks": 2, "inner": "free"}},
    }
    keys = ["m.layers.0.up.weight", "m.layers.0.down.weight", "m.layers.1.up.weight",
            "m.layers.1.down.weight", "m.layers.10.up.weight", "head.weight"]
    out = R.expand_layers(spec, keys)
    assert sorted(out["permutations"]) == ["fixed", "layers.0.mlp", "layers.1.mlp", "layers.10.mlp"]
    assert out["permutations"]["layers.10.mlp"][1] == ["m.layers.10.down.weight", 1]
    assert out["constraints"]["layers.1.mlp"] == {"blocks": 2, "inner": "free"}
