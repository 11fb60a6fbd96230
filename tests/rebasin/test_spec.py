"""Re-basin spec files: the documented format is accepted, everything else is a coded error
(docs/rebasin.md, K0116, K0223, K0360-K0364), and spec="auto" derives a linear chain."""

from __future__ import annotations

import json

import pytest

from karmixlang.diagnostics import KmxError
from karmixlang.io.rebasin_spec import (Axis, auto_spec, builtin_names, check_shapes,
                                        load_spec, parse_spec, to_json)

MLP = {"permutations": {"P0": [["fc1.weight", 0], ["fc1.bias", 0], ["fc2.weight", 1]],
                        "P1": [["fc2.weight", 0], ["fc2.bias", 0], ["fc3.weight", 1]]}}
SHAPES = {"fc1.weight": (8, 4), "fc1.bias": (8,), "fc2.weight": (6, 8), "fc2.bias": (6,),
          "fc3.weight": (3, 6), "fc3.bias": (3,)}


def code_of(call) -> str:
    with pytest.raises(KmxError) as exc:
        call()
    (diag,) = exc.value.diagnostics
    return diag.code


def test_documented_format_round_trips():
    data = dict(MLP, constraints={"P0": {"blocks": 2, "inner": "fixed"}}, description="mlp")
    spec = parse_spec(data, "x.json")
    assert [g.name for g in spec.groups] == ["P0", "P1"]
    assert spec.group("P0").axes[2] == Axis("fc2.weight", 1)
    assert (spec.group("P0").blocks, spec.group("P0").inner) == (2, "fixed")
    assert (spec.group("P1").blocks, spec.group("P1").inner) == (1, "free")
    assert to_json(spec) == data


@pytest.mark.parametrize("data", [
    [],                                                            # not an object
    {"permutations": {}},                                          # no permutation
    {"permutation": MLP["permutations"]},                          # misspelt field
    {"permutations": {"P0": [["fc1.weight", -1]]}},                # negative axis
    {"permutations": {"P0": [["fc1.weight", 0.0]]}},               # axis not an int
    {"permutations": {"P0": [["fc1.weight", True]]}},              # bool is not an axis
    {"permutations": {"P0": [["fc1.weight"]]}},                    # not a pair
    {"permutations": {"P0": []}},                                  # empty group
    {"permutations": {"P0": [["a", 0], ["a", 0]]}},                # listed twice
    {"permutations": {"P0": [["a", 0]], "P1": [["a", 0]]}},        # axis in two permutations
    {"permutations": {"P0": [["a", 0]]}, "constraints": {"P9": {"blocks": 2}}},
    {"permutations": {"P0": [["a", 0]]}, "constraints": {"P0": {"blocks": 0}}},
    {"permutations": {"P0": [["a", 0]]}, "constraints": {"P0": {"inner": "loose"}}},
    {"permutations": {"P0": [["a", 0]]}, "constraints": {"P0": {"groups": 2}}},
    {"permutations": {"P0": [["a", 0]]}, "description": 3},
])
def test_malformed_specs_are_k0223(data):
    assert code_of(lambda: parse_spec(data, "x.json")) == "K0223"


def test_same_key_on_two_axes_of_different_groups_is_allowed():
    spec = parse_spec(MLP, "x.json")
    assert {g.name for g in spec.groups if "fc2.weight" in g.keys} == {"P0", "P1"}


def test_a_path_is_relative_to_the_recipe_folder_and_a_missing_one_is_k0116(tmp_path):
    (tmp_path / "mlp.json").write_text(json.dumps(MLP))
    assert load_spec("mlp.json", tmp_path).source == str(tmp_path / "mlp.json")
    assert code_of(lambda: load_spec("nope.json", tmp_path)) == "K0116"
    (tmp_path / "bad.json").write_text("{not json")
    assert code_of(lambda: load_spec("bad.json", tmp_path)) == "K0223"


def test_builtin_specs_load_by_name_and_are_valid(tmp_path):
    for name in builtin_names():
        spec = load_spec(name, tmp_path)
        assert spec.source == name and spec.groups


def test_shapes_give_sizes_and_whole_absent_groups_are_skipped():
    spec = parse_spec({"permutations": dict(MLP["permutations"], P9=[["te.fc.weight", 0]])}, "x")
    sized, absent = check_shapes(spec, SHAPES)
    assert [(s.group.name, s.size) for s in sized] == [("P0", 8), ("P1", 6)]
    assert absent == ["P9"]


@pytest.mark.parametrize("perms, constraints, code", [
    ({"P0": [["fc1.weight", 0], ["fc2.wieght", 1]]}, {}, "K0360"),
    ({"P0": [["fc1.weight", 0], ["fc1.bias", 1]]}, {}, "K0361"),
    ({"P0": [["fc1.weight", 0], ["fc2.weight", 0]]}, {}, "K0362"),
    ({"P0": [["fc1.weight", 0], ["fc2.weight", 1]]}, {"P0": {"blocks": 3}}, "K0363"),
])
def test_shape_problems_are_coded(perms, constraints, code):
    spec = parse_spec({"permutations": perms, "constraints": constraints}, "x.json")
    assert code_of(lambda: check_shapes(spec, SHAPES)) == code


def test_auto_spec_couples_each_layer_to_the_next_in_natural_order():
    shapes = {f"net.{i}.weight": s for i, s in [(10, (3, 5)), (2, (5, 7)), (0, (7, 4))]}
    shapes.update({"net.0.bias": (7,), "net.2.bias": (5,)})
    spec = auto_spec(shapes)
    assert to_json(spec)["permutations"] == {
        "P0": [["net.0.weight", 0], ["net.0.bias", 0], ["net.2.weight", 1]],
        "P1": [["net.2.weight", 0], ["net.2.bias", 0], ["net.10.weight", 1]]}


@pytest.mark.parametrize("shapes", [
    {"a.weight": (3, 4)},                                          # one layer: nothing to permute
    {"a.weight": (3, 4), "b.weight": (2, 5)},                      # not a chain
    {"a.weight": (3, 4, 3, 3), "b.weight": (2, 3)},                # a conv
    {"a.weight": (3, 4), "b.weight": (2, 3), "c.bias": (2,)},      # a bias without weight
    {"a.weight": (3, 4), "b.weight": (2, 3), "norm.scale": (3,)},
])
def test_auto_spec_refuses_what_is_not_a_chain(shapes):
    assert code_of(lambda: auto_spec(shapes)) == "K0364"


def test_ranges_of_a_fused_axis_may_go_to_different_permutations_but_never_overlap():
    qkv = {"permutations": {"heads": [["qkv.weight", 0, 0, 8], ["qkv.weight", 0, 8, 16]],
                            "v": [["qkv.weight", 0, 16, 24], ["proj.weight", 1]]},
           "constraints": {"heads": {"blocks": 2, "inner": "fixed"}}}
    sized, _ = check_shapes(parse_spec(qkv, "x"), {"qkv.weight": (24, 4), "proj.weight": (4, 8)})
    assert [(s.group.name, s.size, s.blocks) for s in sized] == [("heads", 8, 2), ("v", 8, 8)]
    assert to_json(parse_spec(qkv, "x")) == qkv
    overlap = {"permutations": {"a": [["qkv.weight", 0, 0, 8]], "b": [["qkv.weight", 0, 4, 12]]}}
    assert code_of(lambda: parse_spec(overlap, "x")) == "K0223"
    whole = {"permutations": {"a": [["qkv.weight", 0]], "b": [["qkv.weight", 0, 4, 12]]}}
    assert code_of(lambda: parse_spec(whole, "x")) == "K0223"
    past = {"permutations": {"a": [["qkv.weight", 0, 16, 32]]}}
    assert code_of(lambda: check_shapes(parse_spec(past, "x"), {"qkv.weight": (24, 4)})) == "K0361"


def test_fixed_head_blocks_may_differ_in_length_across_axes_grouped_query_attention():
    gqa = {"permutations": {"kv": [["q.weight", 0], ["k.weight", 0]]},
           "constraints": {"kv": {"blocks": 2, "inner": "fixed"}}}
    sized, _ = check_shapes(parse_spec(gqa, "x"), {"q.weight": (16, 4), "k.weight": (8, 4)})
    assert (sized[0].size, sized[0].blocks) == (16, 2)
    gqa["constraints"]["kv"]["inner"] = "free"
    assert code_of(lambda: check_shapes(parse_spec(gqa, "x"),
                                        {"q.weight": (16, 4), "k.weight": (8, 4)})) == "K0362"


def test_layer_placeholder_makes_one_permutation_per_layer_of_the_model():
    spec = parse_spec({"permutations": {"mlp.{layer}": [["l.{layer}.up.weight", 0],
                                                        ["l.{layer}.down.weight", 1]]}}, "x")
    shapes = {f"l.{i}.{n}.weight": s for i in (0, 1, 10) for n, s in (("up", (8, 4)),
                                                                     ("down", (4, 8)))}
    sized, _ = check_shapes(spec, shapes)
    assert [s.group.name for s in sized] == ["mlp.0", "mlp.1", "mlp.10"]
    assert sized[2].group.axes[1].key == "l.10.down.weight"
    bad = {"permutations": {"mlp": [["l.{layer}.up.weight", 0]]}}
    assert code_of(lambda: parse_spec(bad, "x")) == "K0223"


def helped(call) -> tuple[str, str]:
    with pytest.raises(KmxError) as exc:
        call()
    (diag,) = exc.value.diagnostics
    return diag.code, diag.help or ""


def test_a_range_with_of_scales_with_the_axis_and_must_come_out_whole():
    # GEGLU written for 2 x 1280 rows: on 24 rows the halves are [0, 12) and [12, 24)
    geglu = {"permutations": {"ff": [["proj.weight", 0, 0, 1280, 2560],
                                     ["proj.weight", 0, 1280, 2560, 2560], ["out.weight", 1]]}}
    spec = parse_spec(geglu, "x")
    assert to_json(spec) == geglu
    sized, _ = check_shapes(spec, {"proj.weight": (24, 4), "out.weight": (4, 12)})
    assert [(a.start, a.stop, a.of) for a in sized[0].group.axes] == [
        (0, 12, None), (12, 24, None), (None, None, None)]
    assert sized[0].size == 12
    code, help = helped(lambda: check_shapes(spec, {"proj.weight": (25, 4), "out.weight": (4, 12)}))
    assert code == "K0361" and "make_rebasin_specs.py NAME --from" in help
    # ranges in proportions never overlap when they split the axis, and are checked as such
    assert code_of(lambda: parse_spec({"permutations": {"a": [["w", 0, 0, 3, 4]],
                                                        "b": [["w", 0, 1, 2, 2]]}}, "x")) == "K0223"
    assert parse_spec({"permutations": {"a": [["w", 0, 0, 1, 2]], "b": [["w", 0, 2, 4, 4]]}}, "x")


@pytest.mark.parametrize("entry", [["w", 0, 0, 5, 4], ["w", 0, 0, 2, 0], ["w", 0, 0, 2, 4, 8]])
def test_a_range_past_its_of_or_a_sixth_element_is_refused(entry):
    assert code_of(lambda: parse_spec({"permutations": {"a": [entry]}}, "x")) == "K0223"


def test_builtin_sdxl_on_a_uniformly_shrunk_sdxl_says_heads_are_counts():
    from karmixlang.demo.synth import load_layout, scaled_shape

    # at a tenth, 640 channels become 64, which SDXL's 10 heads do not divide
    shapes = {k: scaled_shape(v.shape, 0.1) for k, v in load_layout("sdxl").items()}
    code, help = helped(lambda: check_shapes(load_spec("sdxl", "."), shapes))
    assert code == "K0363" and "is a count" in help and "make_rebasin_specs.py NAME --from" in help
    # at a half they do, and every range scales
    shapes = {k: scaled_shape(v.shape, 0.5) for k, v in load_layout("sdxl").items()}
    sized, skipped = check_shapes(load_spec("sdxl", "."), shapes)
    assert skipped == [] and len(sized) == len(load_spec("sdxl", ".").groups)
