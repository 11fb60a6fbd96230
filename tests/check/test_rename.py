"""rename(MODEL, PATTERN, REPLACEMENT): lowered into views on the loads below it, and its laws."""

from __future__ import annotations

import re

from conftest import recipe, tiny_models
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from karmixlang.api import compile
from karmixlang.io import views
from karmixlang.io.header import CheckpointHeader, TensorInfo

NAME = st.from_regex(r"[a-z]{1,3}(\.[a-z0-9_]{1,4}){0,3}", fullmatch=True)


def header(keys) -> CheckpointHeader:
    infos = {k: TensorInfo(k, "F32", (1,), "f", 4 * i, 4 * i + 4) for i, k in enumerate(keys)}
    return CheckpointHeader("m.safetensors", infos, {}, ("f",), 4 * len(infos))


@settings(max_examples=60, deadline=None)
@given(st.sets(NAME, min_size=1, max_size=12), NAME, NAME)
def test_rename_then_rename_back_is_the_identity_on_keys(keys, old, new):
    assume(not old.startswith(new) and not new.startswith(old))
    assume(not any(k.startswith(new) for k in keys))
    there = views.rename(header(keys), "^" + re.escape(old), new.replace("\\", r"\\"), None)
    back = views.rename(there, "^" + re.escape(new), old.replace("\\", r"\\"), None)
    assert set(back.tensors) == set(keys)
    assert all(back.tensors[k].name == k for k in keys)  # each key still reads its own bytes


def test_rename_becomes_a_view_of_the_loads_and_keeps_selects_before_it(workdir):
    tiny_models(workdir, names=("a", "b"))
    path = recipe(workdir, r'''
        base a = "a.safetensors"
        model b = "b.safetensors"
        let r = rename(select(0.5*a + 0.5*b, "model.*"), "^model\\.", "m.")
        save "x.safetensors" = a | rename(r, "^m\\.", "model.")
        ''')
    c = compile(path)
    assert not any(n.op == "rename" for n in c.graph.nx())
    loads = [n for n in c.graph.nx() if n.op == "load" and n.attr("view")]
    assert len(loads) == 2
    for n in loads:  # the select matched the original names, so it comes first
        assert n.attr("view") == (("select", ("model.*",)), ("rename", "^model\\.", "m."),
                                  ("rename", "^m\\.", "model."))
    inputs = {i["name"]: i for i in c.plan.data["inputs"]}
    assert inputs["b"]["renamed_by"] == [["^model\\.", "m."], ["^m\\.", "model."]]
    # renamed back: the keys of a, pos_ids (an integer buffer) copied from a
    save = c.plan.data["saves"][0]
    assert (save["keys"], save["computed"], save["copied"]) == (6, 5, 1)
    assert "views: 2 rename(s)" in " ".join(c.plan.data["optimizer"])


def test_rename_of_a_cluster_renames_each_member(workdir):
    tiny_models(workdir, names=("a", "b", "c"))
    path = recipe(workdir, r'''
        base a = "a.safetensors"
        cluster pool = ["b.safetensors", "c.safetensors"]
        save "x.safetensors" = mean(rename(pool, "^vae\\.", "first_stage_model.")) | a
        ''')
    c = compile(path)
    views_ = {n.attr("path"): n.attr("view") for n in c.graph.nx() if n.op == "load"}
    assert sum(1 for v in views_.values() if v) == 2
