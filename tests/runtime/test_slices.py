"""Layer slices (`layers`, `stack`; docs/language.md, "Layer slices"): a stack equals the
model stacked by hand in numpy, an overlapping-range merge equals its formula, a stacked
save takes no layer keys from its fallback, the plan-time errors (K0350-K0353) and the plan's
layer map."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from karmixlang.api import compile as compile_recipe
from karmixlang.demo.synth import llm_layout
from karmixlang.diagnostics import KmxError
from karmixlang.plan.report import render_text
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe

LAYER = "model.layers.{}.{}"


def llm(path, n_layers: int, seed: int, rename=None) -> dict[str, np.ndarray]:
    """A LLaMA-shaped fp32 checkpoint with random entries (hidden 8, vocab 16)."""
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(s.shape).astype(np.float32)
               for k, s in llm_layout(n_layers, hidden=8, vocab=16).items()}
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


@pytest.fixture
def pair(workdir):
    return llm(workdir / "a.safetensors", 4, 1), llm(workdir / "b.safetensors", 6, 2)


def run(path) -> dict[str, np.ndarray]:
    compiled = compile_recipe(path)
    result = execute(compiled, RunOptions(threads=2))
    return load_file(result.outputs[0])


def rest_of(key: str) -> tuple[int, str] | None:
    parts = key.split(".")
    return (int(parts[2]), ".".join(parts[3:])) if parts[1] == "layers" else None


def by_hand(parts: list[tuple[dict, int, int]]) -> dict[str, np.ndarray]:
    """The stack written out: each (model, start, end) part's layers renumbered after the
    previous parts', the keys outside the layers from the first part."""
    out = {k: v for k, v in parts[0][0].items() if rest_of(k) is None}
    at = 0
    for model, start, end in parts:
        for k, v in model.items():
            r = rest_of(k)
            if r is not None and start <= r[0] < end:
                out[LAYER.format(r[0] - start + at, r[1])] = v
        at += end - start
    return out


def test_a_stack_equals_the_hand_stacked_model_bit_for_bit(workdir, pair):
    a, b = pair
    path = recipe(workdir, '''
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = stack(layers(a, 0, 3), layers(b, 1, 6), layers(a, 2, 4))
    ''')
    got = run(path)
    want = by_hand([(a, 0, 3), (b, 1, 6), (a, 2, 4)])
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_an_overlapping_range_merge_equals_the_formula(workdir, pair):
    a, b = pair
    path = recipe(workdir, '''
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = stack(layers(a, 0, 2), 0.3*layers(a, 2, 4) + 0.7*layers(b, 1, 3),
                                       layers(b, 3, 6))
    ''')
    got = run(path)
    want = by_hand([(a, 0, 2), (a, 2, 4), (b, 3, 6)])
    for k in list(want):  # output layers 2, 3: a's 2, 3 blended with b's 1, 2
        r = rest_of(k)
        if r is not None and r[0] in (2, 3):
            want[k] = 0.3 * a[k] + 0.7 * b[LAYER.format(r[0] - 1, r[1])]
    assert sorted(got) == sorted(want) and len([k for k in got if rest_of(k)]) == 7 * 9
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_a_stacked_saves_fallback_gives_no_layer_keys_but_the_others(workdir, pair):
    a, b = pair
    path = recipe(workdir, '''
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = exclude(layers(b, 0, 2), "lm_head.*") with fallback=a
    ''')
    got = run(path)
    # b's 2 layers; a (the base, 4 layers) adds no layers 2-3, but the excluded head
    assert {rest_of(k)[0] for k in got if rest_of(k)} == {0, 1}
    assert np.array_equal(got["lm_head.weight"], a["lm_head.weight"])
    assert np.array_equal(got[LAYER.format(1, "mlp.up_proj.weight")],
                          b[LAYER.format(1, "mlp.up_proj.weight")])


def test_a_slice_of_a_cluster_slices_every_member(workdir, pair):
    a, b = pair
    path = recipe(workdir, '''
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = mean(layers([a, b], 1, 3))
    ''')
    got = run(path)
    k = "mlp.gate_proj.weight"
    np.testing.assert_allclose(got[LAYER.format(0, k)],
                               (a[LAYER.format(1, k)] + b[LAYER.format(1, k)]) / 2, rtol=1e-6)
    assert {rest_of(x)[0] for x in got if rest_of(x)} == {0, 1}


def test_the_plan_shows_the_layer_map_and_each_inputs_slices(workdir, pair):
    path = recipe(workdir, '''
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = stack(layers(a, 0, 2), 0.5*layers(a, 2, 4) + 0.5*layers(b, 1, 3),
                                       layers(b, 3, 6))
    ''')
    compiled = compile_recipe(path)
    text = render_text(compiled.plan)
    assert "    layer map (7 layers, model.layers):\n" \
           "      0-1       <- a 0-1\n" \
           "      2-3       <- a 2-3 + b 1-2\n" \
           "      4-6       <- b 3-5\n" in text
    assert "sliced by layers(2, 4)" in text and "stacked from layer 4" in text
    assert "(the only base, without its layer keys: the save is a layer stack)" in text
    save = compiled.plan.data["saves"][0]
    assert save["layer_map"]["map"][1] == {"out": [2, 3], "from": [["a", 2, 3], ["b", 1, 2]]}


def test_a_whole_model_save_has_no_layer_map(workdir, pair):
    path = recipe(workdir, 'base a = "a.safetensors"\nmodel b = "b.safetensors"\n'
                           'save "out.safetensors" = a | select(b, "lm_head.*")\n')
    assert compile_recipe(path).plan.data["saves"][0]["layer_map"] is None


@pytest.mark.parametrize("expr, code, message", [
    ("layers(b, 2, 7)", "K0350", "layers(..., 2, 7): `{b}` has 6 layers (`model.layers.0` to "
                                 "`model.layers.5`)"),
    ("layers(v, 0, 1)", "K0351", "layers(..., 0, 1): `{v}` has no numbered layer keys"),
    ("layers(t, 0, 2)", "K0352", "layers(..., 0, 2): `{t}` has layers under "
                                 "`model.extra.layers` and `model.layers`"),
    ("layers(g, 0, 3)", "K0353", "layers(..., 0, 3): `{g}` has no key of layer 1 "
                                 "(`model.layers.1.*`)"),
    ("stack(layers(a, 0, 2), layers(h, 0, 2))", "K0352",
     "the slices of this save have layers under `model.layers` (`{a}`) and `transformer.h` "
     "(`{h}`)"),
])
def test_plan_time_slice_errors_name_the_input_and_the_range(workdir, pair, expr, code, message):
    a, _ = pair
    save_file({"encoder.conv.weight": a["lm_head.weight"]}, str(workdir / "v.safetensors"))
    two = dict(a) | {k.replace("model.layers", "model.extra.layers"): v
                     for k, v in a.items() if ".layers.0." in k}
    save_file(two, str(workdir / "t.safetensors"))
    save_file({k: v for k, v in a.items() if ".layers.1." not in k}, str(workdir / "g.safetensors"))
    llm(workdir / "h.safetensors", 2, 3, rename=lambda k: k.replace("model.layers", "transformer.h"))
    path = recipe(workdir, "\n".join(f'model {n} = "{n}.safetensors"' for n in "abvtgh")
                  + f'\nsave "out.safetensors" = {expr}\n')
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    d = exc.value.diagnostics[0]
    files = {n: str(workdir / f"{n}.safetensors") for n in "abvtgh"}
    assert (d.code, d.message) == (code, message.format(**files))
    assert d.span.line == 7 and d.span.col == (1 if code == "K0352" and "stack" in expr else 26)
    assert not (workdir / "out.safetensors").exists()


def test_a_lora_in_a_save_of_slices_is_refused(workdir, pair):
    # its modules are matched by key name: after renumbering, layer 2's would land on layer 0
    save_file({"lora_unet_x.lora_up.weight": np.zeros((4, 1), np.float32)},
              str(workdir / "l.safetensors"))
    path = recipe(workdir, '''
        base a = "a.safetensors"
        lora l = "l.safetensors"
        save "out.safetensors" = layers(a + l, 2, 4)
    ''')
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    assert [d.code for d in exc.value.diagnostics] == ["K0351"]
    assert "LoRA" in exc.value.diagnostics[0].message
