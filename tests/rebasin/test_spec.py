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
