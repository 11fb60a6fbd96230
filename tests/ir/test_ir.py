"""Lowering and the optimizer (karmixlang/ir/): what the graph holds after each pass."""

from __future__ import annotations

from collections import Counter

import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.check.checker import check_program
from karmixlang.ir import optimize as opt
from karmixlang.ir.lower import lower

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
    # node as the first, although the recipe spells out the mean three times; then `laws`
    # computes o + mean(a - o, b - o) as mean(a, b): 4 nodes.
    assert Counter(n["op"] for n in nodes) == {"load": 3, "mean": 1}
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
    paths = sorted(i["path"] for i in compile_recipe(path).plan.data["inputs"])
    assert paths == ["base.safetensors", "lib/models/x.safetensors", "lib/models/y.safetensors"]


def test_blocks_give_keys_outside_every_slot_the_base_weight():
    from karmixlang.ir.graph import KeyMap

    km = KeyMap("blocks", (("BASE", 0.25), ("IN00", 0.5)), "sdxl", None)
    assert km.at("model.diffusion_model.input_blocks.0.0.weight") == 0.5
    assert km.at("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias") == 0.25
    assert km.at("alphas_cumprod") == 0.25  # no slot: the BASE weight
    assert KeyMap("blocks", (("IN00", 0.5),), "sdxl", 0.9).at("alphas_cumprod") == 0.9


def test_flux_blocks_follow_supermerger_slots_with_or_without_prefix():
    from karmixlang.blocks import SLOTS, slot_of
    from karmixlang.ir.graph import KeyMap

    assert len(SLOTS["flux"]) == 61 and SLOTS["flux"][:4] == ("CLIP", "T5", "IN", "D00")
    assert SLOTS["flux"][-2:] == ("S37", "OUT")
    for key, slot in [("model.diffusion_model.double_blocks.7.img_attn.qkv.weight", "D07"),
                      ("single_blocks.12.linear1.weight", "S12"),
                      ("model.diffusion_model.txt_in.bias", "IN"),
                      ("guidance_in.out_layer.weight", "IN"),
                      ("model.diffusion_model.final_layer.linear.weight", "OUT"),
                      ("text_encoders.clip_l.transformer.text_model.final_layer_norm.bias", "CLIP"),
                      ("text_encoders.t5xxl.transformer.shared.weight", "T5"),
                      ("vae.decoder.conv_in.weight", None)]:
        assert slot_of("flux", key) == slot, key
    km = KeyMap("blocks", (("D07", 0.25),), "flux", 0.5)
    assert km.at("model.diffusion_model.double_blocks.7.txt_mlp.0.bias") == 0.25
    assert km.at("vae.decoder.conv_in.weight") == 0.5  # no slot: the default
