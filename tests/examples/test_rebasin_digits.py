"""The re-basin digits example (examples/rebasin-digits): its recipes, rerun with kmx on the
committed checkpoints, give the accuracies of docs/rebasin.md's table, within margins; the
aligned merge is a fixed point of the numpy reference's weight matching, and the aligned base
computes the same function as the base."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import rebasin_np
from karmixlang.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rebasin-digits"
MODELS = EXAMPLE / "models"
RECIPES = ("one-base", "unaligned", "aligned")
TUNES = {b: [MODELS / f"base-{b}" / f"ft-{i}.safetensors" for i in range(4)] for b in (1, 2)}


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"digits_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = _load_example("evaluate")


def kmx(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(list(argv))
    assert code == 0, out.getvalue() + err.getvalue()


def run_recipes(folder: Path, names, *settings: str) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder / ".cache"))
        for name in names:
            kmx("run", "-q", str(EXAMPLE / f"{name}.kmx"), "--set", f"out={folder}",
                *settings)
    return folder


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Every recipe of the example run once, its outputs in one folder."""
    return run_recipes(tmp_path_factory.mktemp("digits"), RECIPES)


def acc(path: Path) -> float:
    return evaluate.accuracy(path, EXAMPLE / "test.npz")


def test_each_finetune_scores_about_90_percent():
    scores = [acc(p) for p in TUNES[1] + TUNES[2]]
    assert all(0.88 <= s <= 0.96 for s in scores), scores


def test_merges_on_one_base_beat_their_finetunes(out):
    for b in (1, 2):
        merged = acc(out / f"base-{b}-mean.safetensors")
        assert merged >= 0.94
        assert merged > max(acc(p) for p in TUNES[b])


def test_unaligned_cross_base_merge_collapses(out):
    assert acc(out / "unaligned-mean.safetensors") <= 0.70


def test_aligned_cross_base_merge_recovers(out):
    aligned = acc(out / "aligned-mean.safetensors")
    one_base = min(acc(out / f"base-{b}-mean.safetensors") for b in (1, 2))
    assert aligned >= 0.90
    assert aligned >= one_base - 0.06
    assert aligned >= acc(out / "unaligned-mean.safetensors") + 0.25


def test_aligned_base_computes_the_same_function(out):
    x = np.load(EXAMPLE / "test.npz")["x"]
    base = load_file(str(MODELS / "base-2.safetensors"))
    aligned = load_file(str(out / "base-2-aligned.safetensors"))
    assert any(not np.array_equal(base[k], aligned[k]) for k in base)  # not the identity
    np.testing.assert_allclose(evaluate.logits(aligned, x), evaluate.logits(base, x),
                               rtol=1e-9, atol=1e-9)


def _found_permutations(base: dict, aligned: dict, groups) -> dict:
    """The permutation of each group, read back from where each bias value went."""
    perms = {}
    for group in groups:
        key = next(e.key for e in group.entries if e.key.endswith(".bias"))
        where = {float(v): i for i, v in enumerate(base[key])}
        perms[group.name] = rebasin_np.Perm(np.array([where[float(v)] for v in aligned[key]]),
                                            None)
    return perms


def test_aligned_merge_is_the_reference_weight_matching(out):
    """kmx's permutation is one the reference's coordinate descent cannot improve (the order
    of the groups may differ, so the fixed point is checked, not the path), and the merge is
    the mean of base 1's fine-tunes and base 2's permuted by it."""
    groups = rebasin_np.parse_spec(json.loads((EXAMPLE / "mlp-spec.json").read_text()))
    b1, b2 = (load_file(str(MODELS / f"base-{b}.safetensors")) for b in (1, 2))
    perms = _found_permutations(b2, load_file(str(out / "base-2-aligned.safetensors")), groups)
    again, sweeps = rebasin_np.weight_matching(b1, b2, groups, iterations=1, init=perms)
    assert all(rebasin_np.same(again[g.name], perms[g.name]) for g in groups)
    tunes = [load_file(str(p)) for p in TUNES[1]]
    tunes += [rebasin_np.apply(load_file(str(p)), groups, perms) for p in TUNES[2]]
    merged = load_file(str(out / "aligned-mean.safetensors"))
    for key, value in merged.items():
        expected = np.mean([t[key].astype(np.float64) for t in tunes], axis=0)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


def test_written_spec_is_what_auto_derives():
    from karmixlang.io.rebasin_spec import auto_spec, load_spec, to_json

    shapes = {k: v.shape for k, v in load_file(str(MODELS / "base-1.safetensors")).items()}
    written = to_json(load_spec(str(EXAMPLE / "mlp-spec.json"), EXAMPLE))
    assert written["permutations"] == to_json(auto_spec(shapes))["permutations"]


def test_written_spec_gives_the_same_bytes_as_auto(out, tmp_path):
    run_recipes(tmp_path, ["aligned"], "--set", f"spec={EXAMPLE / 'mlp-spec.json'}")
    for name in ("aligned-mean", "base-2-aligned"):
        a, b = (load_file(str(f / f"{name}.safetensors")) for f in (out, tmp_path))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_merged_file_loads_into_the_trained_module(out):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    net = _load_example("train").MLP(width=64, depth=3)
    net.load_state_dict(load_torch(str(out / "aligned-mean.safetensors")), strict=True)
    x = np.load(EXAMPLE / "test.npz")["x"]
    with torch.no_grad():
        got = net(torch.from_numpy(x)).double().numpy()
    merged = load_file(str(out / "aligned-mean.safetensors"))
    np.testing.assert_allclose(got, evaluate.logits(merged, x), rtol=1e-4, atol=1e-4)
