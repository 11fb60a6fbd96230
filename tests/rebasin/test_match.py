"""Weight matching's runtime (runtime/rebasin.py) on small torch modules: a permuted model
computes the same function, matching recovers the permutation exactly, and it agrees with the
independent numpy reference (tests/rebasin_np.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rebasin_np as ref
from karmixlang.io.rebasin_spec import auto_spec, check_shapes, parse_spec, to_json
from karmixlang.runtime.rebasin import Perm, match, permute
from rebasin.modules import ATTN_SPEC, MLP, RES_SPEC, Attention, ResBlock

CASES = {
    "mlp": (MLP, None, lambda: torch.randn(5, 6)),
    "resnet": (ResBlock, RES_SPEC, lambda: torch.randn(2, 4, 5, 5)),
    "attention": (Attention, ATTN_SPEC, lambda: torch.randn(2, 3, 8)),
}


def setup(name, seed=0):
    torch.manual_seed(seed)
    cls, spec_json, make_input = CASES[name]
    module = cls().double()
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    spec = auto_spec(shapes) if spec_json is None else parse_spec(spec_json, name)
    sized, absent = check_shapes(spec, shapes)
    assert not absent
    return module, state, sized, spec, make_input().double()


def apply_all(state, sized, perms):
    moves = {}
    for s in sized:
        for a in s.group.axes:
            moves.setdefault(a.key, []).append((a, perms[s.group.name]))
    return {k: permute(v, moves.get(k, [])) for k, v in state.items()}


def random_perms(spec, state, seed):
    rng = np.random.default_rng(seed)
    groups = ref.parse_spec(to_json(spec))
    arrays = {k: v.numpy() for k, v in state.items()}
    return {g.name: ref.random_perm(g, arrays, rng) for g in groups}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_randomly_permuted_model_computes_the_same_and_matching_recovers_it(name):
    module, state, sized, spec, x = setup(name)
    want = module(x)
    perms = {n: Perm(p.block, p.inner) for n, p in random_perms(spec, state, 7).items()}
    permuted = apply_all(state, sized, perms)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    module.load_state_dict(permuted)
    torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)
    found = match(sized, state.__getitem__, permuted.__getitem__, iterations=50, seed=0)
    aligned = apply_all(permuted, sized, found.perms)
    for k in state:  # a permutation of stored values: exactly, bit for bit
        assert torch.equal(aligned[k], state[k]), k
    assert found.passes >= 2  # one pass that changes, one that confirms


@pytest.mark.parametrize("name", sorted(CASES))
def test_matching_two_different_models_agrees_with_the_numpy_reference(name):
    _, a, sized, spec, _ = setup(name, seed=1)
    _, b, _, _, _ = setup(name, seed=2)
    for seed in (0, 3):
        found = match(sized, a.__getitem__, b.__getitem__, iterations=30, seed=seed)
        groups = ref.parse_spec(to_json(spec))
        want, sweeps = ref.weight_matching({k: v.numpy() for k, v in a.items()},
                                           {k: v.numpy() for k, v in b.items()}, groups,
                                           iterations=30, seed=seed)
        assert found.passes == sweeps
        for g in groups:
            n = next(s.size for s in sized if s.group.name == g.name)
            assert np.array_equal(found.perms[g.name].indices(n), want[g.name].indices(n))


def test_keys_kept_in_memory_are_read_once_and_the_result_is_the_same():
    _, a, sized, _, _ = setup("attention", seed=1)
    _, b, _, _, _ = setup("attention", seed=2)
    reread = match(sized, a.__getitem__, b.__getitem__, iterations=30, seed=0)
    kept = match(sized, a.__getitem__, b.__getitem__, iterations=30, seed=0, cache_bytes=1 << 30)
    assert kept.reads == len({k for s in sized for k in s.group.keys}) * 2 < reread.reads
    assert all(np.array_equal(kept.perms[n].block, p.block) for n, p in reread.perms.items())
