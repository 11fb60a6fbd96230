"""The compiler middle: lowering, optimizer passes, the header-only schedule and the plan."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from karmixlang.ir import optimize as opt
from karmixlang.api import compile as compile_recipe
from karmixlang.check.checker import check_program
from karmixlang.diagnostics import KmxError
from karmixlang.io.header import read_checkpoint
from karmixlang.ir.lower import lower
from karmixlang.plan.report import render_dot, render_text
from karmixlang.demo.synth import make_model, write_model

from conftest import recipe, tiny_models


def lowered(path):
    program, diags = check_program(path)
    assert program is not None, diags
    return lower(program)


def ops(graph) -> Counter:
    return Counter(n.op for n in graph.nx())


def test_cse_shares_subexpressions_across_defs_and_saves(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        model b = "b.safetensors"
        def tv(x, y) = x - y
        let center = mean([tv(a, o), tv(b, o)])
        save "one.safetensors" = o + center
        save "two.safetensors" = o + mean([a - o, b - o]) * 0.5 + center * 0.5
    """)
    c = compile_recipe(path)
    nodes = c.plan.data["nodes"]
    # loads o, a, b; a-o, b-o; mean; o+center. The second save folds to o + 1·mean, the same
    # node as the first: 7 nodes, although the recipe spells out the mean three times.
    assert Counter(n["op"] for n in nodes) == {"load": 3, "lincomb": 3, "mean": 1}
    assert c.plan.data["saves"][0]["node"] == c.plan.data["saves"][1]["node"]
    assert c.plan.data["totals"]["operations_written"] > len(nodes)


def test_dce_drops_unused_lets_and_says_so(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        let unused = lerp(o, a, t=0.3)
        save "out.safetensors" = lerp(o, a, t=0.5)
    """)
    c = compile_recipe(path)
    assert [n["attrs"].get("t") for n in c.plan.data["nodes"] if n["op"] == "lerp"] == [0.5]
    assert any("dropped `unused`" in note for note in c.plan.data["optimizer"])


def test_fold_cancels_and_merges_terms(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "z.safetensors" = o + (a - a) with fallback=o
        save "y.safetensors" = 0.25*a + 0.25*a + 0.5*o
    """)
    g = opt.fold(lowered(path))
    zs, ys = g.saves[0].expr, g.saves[1].expr
    assert zs.op == "lincomb" and {i.op for i in zs.inputs} == {"load", "zeros_like"}
    assert ys.op == "lincomb" and sorted(ys.attr("coeffs")) == [0.5, 0.5]


def test_select_is_pushed_to_the_inputs(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = o | select(lerp(o, a, t=0.5), "model.*")
    """)
    g = opt.pushdown(lowered(path))
    for n in g.nx():
        if n.op == "select":
            assert n.inputs[0].op == "load"
    assert ops(g)["select"] == 2


@pytest.mark.parametrize("name,pass_", opt.PASSES)
def test_every_pass_is_idempotent(workdir, name, pass_):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        model b = "b.safetensors"
        let unused = mean([a, b])
        let d = (a - o) + (b - o) - (a - o)
        save "out.safetensors" = o + select(d, "model.*") * 0.5 | select(b, "vae.*")
    """)
    once = pass_(lowered(path))
    twice = pass_(once)
    shape = lambda g: sorted((n.op, len(n.inputs), repr(n.attrs)) for n in g.nx())  # noqa: E731
    assert shape(once) == shape(twice)


def test_key_counts_and_bytes_match_the_headers(workdir):
    scale = 1 / 32
    base = make_model("sd1", scale, seed=1)
    write_model(workdir / "base.safetensors", base)
    for i in range(2):
        write_model(workdir / f"ft{i}.safetensors", make_model("sd1", scale, seed=2 + i, base=base))
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["ft0.safetensors", "ft1.safetensors"]
        save "out.safetensors" = o + mean(pool - o) with dtype="fp16"
    """)
    c = compile_recipe(path)
    hdr = read_checkpoint(str(workdir / "base.safetensors"))
    save = c.plan.data["saves"][0]
    ints = [k for k, t in hdr.tensors.items() if t.dtype.startswith(("I", "U", "BOOL"))]
    assert save["keys"] == len(hdr.tensors)
    assert save["copied"] == len(ints) and save["computed"] == len(hdr.tensors) - len(ints)
    # Every base tensor is read; of the fine-tunes, only the float keys (integer buffers are
    # copied from the base, so theirs are never read).
    fts = [read_checkpoint(str(workdir / f"ft{i}.safetensors")) for i in range(2)]
    expected_read = hdr.total_bytes + sum(t.nbytes for h in fts for k, t in h.tensors.items()
                                          if k not in ints)
    assert c.plan.data["totals"]["bytes_read"] == expected_read
    expected_out = sum(t.nbytes if k in ints else 2 * int(np.prod(t.shape))
                       for k, t in hdr.tensors.items())
    assert save["bytes_written"] == expected_out


def test_fallback_reasons_are_reported(workdir):
    odd = {"c": {"model.w": np.zeros((6, 4), np.float32)}}
    models = tiny_models(workdir, extra=odd)
    write_model(workdir / "short.safetensors",
                {k: v for k, v in models["a"].items() if k != "model.conv"})
    path = recipe(workdir, """
        base o = "base.safetensors"
        save "out.safetensors" = lerp(o, lerp("short.safetensors", "c.safetensors", 0.5), 0.5)
    """.replace('lerp("short.safetensors", "c.safetensors", 0.5)',
                'mean(["short.safetensors", "c.safetensors"])'))
    c = compile_recipe(path)
    copied = {e["key"]: e["reason"] for e in c.plan.data["saves"][0]["copied_examples"]}
    assert copied["model.conv"].startswith("missing in short.safetensors")
    assert copied["model.w"].startswith("shapes differ")
    assert copied["pos_ids"].startswith("not a float")
    assert c.plan.data["saves"][0]["fallback_reason"] == "the only base"


def test_missing_key_without_fallback_is_a_plan_error(workdir):
    models = tiny_models(workdir)
    write_model(workdir / "short.safetensors",
                {k: v for k, v in models["a"].items() if k != "model.conv"})
    path = recipe(workdir, """
        model a = "a.safetensors"
        model s = "short.safetensors"
        save "out.safetensors" = lerp(a, s, t=0.5)
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    d = exc.value.diagnostics[0]
    assert d.code in ("K0304", "K0310") and "model.conv" in d.message and d.span.line == 3


def test_output_equal_to_an_input_is_refused(workdir):
    tiny_models(workdir)
    os.symlink(workdir / "a.safetensors", workdir / "link.safetensors")
    for target in ("a.safetensors", "link.safetensors"):
        path = recipe(workdir, f"""
            base o = "base.safetensors"
            model a = "a.safetensors"
            save "{target}" = lerp(o, a, t=0.5)
        """)
        with pytest.raises(KmxError) as exc:
            compile_recipe(path)
        assert exc.value.diagnostics[0].code == "K0305"


def test_missing_file_is_a_coded_error_at_the_recipe_line(workdir):
    path = recipe(workdir, """
        model a = "nope.safetensors"
        model b = "nope2.safetensors"
        save "out.safetensors" = lerp(a, b, t=0.5)
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    assert [(d.code, d.span.line) for d in exc.value.diagnostics] == [("K0301", 1), ("K0301", 2)]


def test_glob_is_sorted_bytewise_and_balanced_weights(workdir):
    tiny_models(workdir, names=("base",))
    (workdir / "x").mkdir()
    (workdir / "y").mkdir()
    tiny_models(workdir / "x", names=("b", "B", "a"))
    tiny_models(workdir / "y", names=("z",))
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster xs = glob("x/*.safetensors")
        cluster ys = glob("y/*.safetensors")
        save "out.safetensors" = o + mean(balanced([xs, ys]) - o)
    """)
    c = compile_recipe(path)
    loads = [i["path"] for i in c.plan.data["inputs"] if i["role"] == "model"]
    assert loads == ["x/B.safetensors", "x/a.safetensors", "x/b.safetensors", "y/z.safetensors"]
    mean = next(n for n in c.plan.data["nodes"] if n["op"] == "mean")
    assert mean["attrs"]["weights"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_plan_json_schema_and_renderers(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5) | select(a, "vae.*")
    """)
    c = compile_recipe(path)
    data = json.loads(c.plan.to_json())
    assert data["schema_version"] == 1
    assert {"inputs", "nodes", "saves", "totals"} <= set(data)
    assert {"bytes_read", "bytes_written", "peak_memory_bytes"} <= set(data["totals"])
    text = render_text(c.plan)
    assert text.splitlines()[-1].startswith("Plan: 1 file to write (6 keys; 1 copied from fallback)")
    assert text.splitlines()[-1].endswith("nothing executed.")
    dot = render_dot(c.plan)
    assert dot.startswith("digraph kmx {") and "-> save0" in dot


@pytest.mark.parametrize("command", [["plan"], ["plan", "--executor", "ray"], ["check"],
                                     ["fmt", "--check"]])
def test_check_fmt_and_plan_never_import_torch(workdir, command):
    import subprocess
    import sys

    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5)
    """)
    code = ("import sys; from karmixlang.cli import main; rc = main(sys.argv[2:] + [sys.argv[1]]);"
            " assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'imported';"
            " sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, path, *command], capture_output=True,
                       text=True)
    assert "imported" not in r.stderr, r.stderr
    assert r.returncode == 0 or command[0] == "fmt" and r.returncode == 1, r.stderr


def test_base_choice_that_cannot_matter_is_warned(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors"]
        save "same.safetensors" = o + median(pool - o)
        save "differs.safetensors" = o + median(trim(pool - o, density=0.5))
    """)
    warnings = compile_recipe(path).warnings
    assert [(w.code, w.span.line) for w in warnings] == [("K0213", 3)]


def test_paths_resolve_relative_to_the_file_that_wrote_them(workdir):
    (workdir / "lib").mkdir()
    (workdir / "lib" / "models").mkdir()
    tiny_models(workdir / "lib" / "models", names=("x", "y"))
    tiny_models(workdir, names=("base",))
    recipe(workdir / "lib", """
        def pool_here() = glob("models/*.safetensors")
    """, "helpers.kmx")
    path = recipe(workdir, """
        import "lib/helpers.kmx" as lib
        base o = "base.safetensors"
        save "out.safetensors" = o + mean(lib.pool_here() - o)
    """)
    paths = [i["path"] for i in compile_recipe(path).plan.data["inputs"]]
    assert paths == ["base.safetensors", "lib/models/x.safetensors", "lib/models/y.safetensors"]


def test_per_key_numbers_without_a_value_are_plan_errors(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = lerp(a, b, t=by_key({"model.*": 0.3})) with fallback=a
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    d = exc.value.diagnostics[0]
    assert d.code == "K0204" and "vae.decoder" in d.message and d.span.line == 3


def test_blocks_give_keys_outside_every_slot_the_base_weight():
    from karmixlang.ir.graph import KeyMap

    km = KeyMap("blocks", (("BASE", 0.25), ("IN00", 0.5)), "sdxl", None)
    assert km.at("model.diffusion_model.input_blocks.0.0.weight") == 0.5
    assert km.at("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias") == 0.25
    assert km.at("alphas_cumprod") == 0.25  # no slot: the BASE weight
    assert KeyMap("blocks", (("IN00", 0.5),), "sdxl", 0.9).at("alphas_cumprod") == 0.9


def test_a_recipe_without_saves_plans_to_do_nothing(workdir):
    path = recipe(workdir, "param x = 1\n")
    c = compile_recipe(path)
    assert c.plan.data["saves"] == [] and c.plan.data["totals"]["bytes_read"] == 0
    assert render_text(c.plan).splitlines()[-1].startswith("Plan: the recipe has no save")
