"""The stdlib recipes against numpy compositions of the reference methods; templates and the
demo recipe check and format clean."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import reference_np as ref
from karmixlang.api import compile as compile_recipe
from karmixlang.check.checker import check_program
from karmixlang.cli import main
from karmixlang.syntax.fmt import format_source
from karmixlang.resources import data_dir
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe, tiny_models

KEYS = ("model.w", "model.conv", "model.bias", "model.scalar")
W = [1.0, 1.0, 1.0]


def _ties_merge(ds, ws):
    return ref.ties_merge(ds, ws, "mass")


def _dgmla_delta(ds, k, zero):
    dropped = [ref.della(d, 0.1, -0.05, 9, False, False, k, i) for i, d in enumerate(ds)]
    return ref.geometric_median(ref.elect(dropped, W, "mass") + [zero], W + [1.0],
                                1e-6, 100, 1e-20)


EXPECTED = {
    "std.task_arithmetic(pool, o, scale=0.5)": lambda o, ds, k: o + 0.5 * ref.sum_(ds, W),
    "std.ties_merging(pool, o)": lambda o, ds, k: o + _ties_merge(
        [ref.trim(d, 0.2) for d in ds], W),
    "std.dare_ties(pool, o, 9)": lambda o, ds, k: o + _ties_merge(
        [ref.dare(d, 0.9, 9, True, k, i) for i, d in enumerate(ds)], W),
    "std.della_ties(pool, o, 9)": lambda o, ds, k: o + _ties_merge(
        [ref.della(d, 0.5, 0.1, 9, True, False, k, i) for i, d in enumerate(ds)], W),
    "std.breadcrumbs_ties(pool, o)": lambda o, ds, k: o + _ties_merge(
        [ref.breadcrumbs(d, 0.9, 0.01) for d in ds], W),
    "std.model_stock_soup(pool, o)": lambda o, ds, k: ref.model_stock([o + d for d in ds], W, o),
    "std.ties_soup(pool, o)": lambda o, ds, k: o + ref.mean(ref.ties(ds, W, 1.0, "count"), W),
    "std.dgmla(pool, o, 9)": lambda o, ds, k: o + _dgmla_delta(ds, k, np.zeros_like(o)),
    "std.dgmiz(pool, o, 9)": lambda o, ds, k: o + ref.iso(_dgmla_delta(ds, k, np.zeros_like(o)),
                                                           0.8),
}


@pytest.mark.parametrize("call", sorted(EXPECTED))
def test_stdlib_recipe_matches_the_reference(workdir, call):
    m = tiny_models(workdir)
    path = recipe(workdir, f"""
        import "std/recipes.kmx" as std
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out.safetensors" = {call}
    """)
    execute(compile_recipe(path, compute_dtype="fp64"), RunOptions(threads=1))
    out = load_file(str(workdir / "out.safetensors"))
    for k in KEYS:
        o = m["base"][k].astype(np.float64)
        ds = [m[n][k].astype(np.float64) - o for n in "abc"]
        want = EXPECTED[call](o, ds, k).astype(m["base"][k].dtype)
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6, err_msg=f"{call} {k}")


def test_every_stdlib_def_is_tested():
    program, diags = check_program(str(data_dir("stdlib").joinpath("recipes.kmx")))
    assert program is not None and not [d for d in diags if d.is_error]
    public = {n for n in program.root.decls if not n.endswith("_delta")}
    tested = {call.split("(")[0].removeprefix("std.") for call in EXPECTED}
    assert public == tested


@pytest.mark.parametrize("template", ["two-bases", "ties", "mbw"])
def test_kmx_new_writes_a_recipe_that_checks(tmp_path, template):
    path = tmp_path / "merge.kmx"
    assert main(["new", str(path), "--template", template]) == 0
    program, diags = check_program(str(path))
    assert program is not None, diags
    assert main(["new", str(path)]) == 2  # never overwrites without --force
    text = path.read_text()
    assert format_source(text, str(path))[0] == text


def test_shipped_recipes_format_clean():
    for folder in (data_dir("stdlib"),):
        for f in folder.iterdir():
            if f.name.endswith(".kmx"):
                text = f.read_text()
                assert format_source(text, f.name)[0] == text, f.name
