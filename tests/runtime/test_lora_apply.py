"""`lora NAME = PATH` applied: kmx's result against the numpy formulas (tests/lora_np.py) on
LoRA files written as kohya, PEFT and LyCORIS write them, onto real SDXL and Flux key names."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_np as L
from karmixlang.api import compile as compile_recipe
from karmixlang.demo.synth import write_model
from karmixlang.diagnostics import KmxError
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe

UNET = "model.diffusion_model.input_blocks."
LINEAR = UNET + "4.1.proj_in.weight"
CONV3 = UNET + "1.0.in_layers.2.weight"
CONV1 = UNET + "1.0.skip_connection.weight"
TE = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def run(path, **kw):
    compiled = compile_recipe(path, threads=1, memory_limit=kw.pop("memory_limit", None))
    execute(compiled, RunOptions(threads=1, **kw))
    return compiled


def setup(workdir, keys, loras: dict, text: str, prefix: str = ""):
    base = L.base_model(keys, prefix=prefix)
    write_model(workdir / "base.safetensors", base)
    for name, tensors in loras.items():
        write_model(workdir / f"{name}.safetensors", tensors)
    return base, recipe(workdir, text)


def expect(out, base, deltas: dict, atol=1e-5):
    """Every key of the output is base + its delta (zero where the LoRA has none)."""
    assert set(out) == set(base)
    for k, v in base.items():
        want = v.astype(np.float64) + deltas.get(k, 0.0)
        np.testing.assert_allclose(out[k], want, atol=atol, rtol=1e-5, err_msg=k)


_CLIP_L, _T5 = "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer."
# kohya module -> the key it changes. sd-scripts' lora_flux.py names Flux's text encoders
# `lora_te1_` + CLIP-L's Hugging Face module name and `lora_te3_` + T5EncoderModel's (case
# kept: `SelfAttention`, `DenseReluDense`), `.`→`_`; ComfyUI's whole checkpoint holds them
# under text_encoders.clip_l/t5xxl.transformer.
FLUX_TE_MODULES = {
    "lora_unet_double_blocks_0_img_attn_proj":
        "model.diffusion_model.double_blocks.0.img_attn.proj.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        _CLIP_L + "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1":
        _CLIP_L + "text_model.encoder.layers.0.mlp.fc1.weight",
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
        _T5 + "encoder.block.0.layer.0.SelfAttention.q.weight",
    "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0":
        _T5 + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo":
        _T5 + "encoder.block.0.layer.1.DenseReluDense.wo.weight",
}


@pytest.mark.parametrize("keys, modules, alphas, arch", [
    (L.SDXL_KEYS, {L.kohya_name(k): k for k in (LINEAR, CONV3, CONV1, TE)},
     (1.0, 4.0, None, 0.5), "sdxl"),  # linear, 3×3 and 1×1 conv, CLIP-L
    (L.FLUX_AIO_KEYS, FLUX_TE_MODULES, (0.5, 1.5, 2.5, None, 4.5, 5.5), "flux"),
], ids=["sdxl-unet-te1", "flux-te1-clip_l-te3-t5"])
def test_kohya_modules_with_alpha_onto_their_keys(workdir, keys, modules, alphas, arch):
    rng = np.random.default_rng(1)
    lora, deltas = {}, {}
    for (name, key), alpha in zip(modules.items(), alphas):
        t = L.kohya_module(rng, name, keys[key], rank=2, alpha=alpha)
        lora.update(t)
        deltas[key] = 0.8 * L.kohya_expected(t, name, keys[key])
    base, r = setup(workdir, keys, {"style": lora}, """
        base b = "base.safetensors"
        lora style = "style.safetensors"
        save "out.safetensors" = b + 0.8*style
    """)
    c = run(r)
    expect(load_file(workdir / "out.safetensors"), base, deltas)
    (info,) = c.plan.data["loras"]
    n = len(modules)
    assert (info["format"], info["arch"], info["matched"], info["keys"], info["unmatched"]) == \
        ("kohya", arch, n, n, [])


def test_two_loras_scaled_and_a_locon_tucker_module(workdir):
    rng = np.random.default_rng(2)
    n1, n3 = L.kohya_name(LINEAR), L.kohya_name(CONV3)
    style = L.kohya_module(rng, n1, L.SDXL_KEYS[LINEAR], rank=3, alpha=2.0)
    detail = L.kohya_module(rng, n3, L.SDXL_KEYS[CONV3], rank=2, alpha=1.0, tucker=True)
    detail.update(L.kohya_module(rng, n1, L.SDXL_KEYS[LINEAR], rank=1))
    base, r = setup(workdir, L.SDXL_KEYS, {"style": style, "detail": detail}, """
        base b = "base.safetensors"
        lora style = "style.safetensors"
        lora detail = "detail.safetensors"
        save "out.safetensors" = b + 0.8*style + 0.5*detail
    """)
    run(r)
    deltas = {LINEAR: 0.8 * L.kohya_expected(style, n1, L.SDXL_KEYS[LINEAR])
              + 0.5 * L.kohya_expected(detail, n1, L.SDXL_KEYS[LINEAR]),
              CONV3: 0.5 * L.kohya_expected(detail, n3, L.SDXL_KEYS[CONV3])}
    expect(load_file(workdir / "out.safetensors"), base, deltas)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_kohya_and_peft_names_with_and_without_the_comfyui_prefix(workdir, prefix):
    rng = np.random.default_rng(3)
    qkv, lin1 = "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"
    kohya = L.kohya_module(rng, "lora_unet_double_blocks_0_img_attn_qkv", (9, 4), rank=2,
                           alpha=1.0)
    peft = {"diffusion_model.single_blocks.0.linear1.lora_A.weight": L.rand(rng, 3, 4),
            "diffusion_model.single_blocks.0.linear1.lora_B.weight": L.rand(rng, 14, 3)}
    base, r = setup(workdir, L.FLUX_KEYS, {"k": kohya, "p": peft}, """
        model b = "base.safetensors"
        lora k = "k.safetensors"
        lora p = "p.safetensors"
        save "out.safetensors" = b + k + 2*p with fallback=b
    """, prefix=prefix)
    c = run(r)
    deltas = {prefix + qkv: L.kohya_expected(kohya, "lora_unet_double_blocks_0_img_attn_qkv",
                                             (9, 4)),
              prefix + lin1: 2 * L.lora_delta(  # no alpha: scale 1
                  peft["diffusion_model.single_blocks.0.linear1.lora_B.weight"],
                  peft["diffusion_model.single_blocks.0.linear1.lora_A.weight"])}
    expect(load_file(workdir / "out.safetensors"), base, deltas)
    formats = {x["name"]: (x["format"], x["arch"]) for x in c.plan.data["loras"]}
    assert formats == {"k": ("kohya", "flux"), "p": ("peft", "flux")}


def test_loha_linear_and_conv_and_lokr_decomposed_and_full(workdir):
    rng = np.random.default_rng(4)
    n1, n3, nt = L.kohya_name(LINEAR), L.kohya_name(CONV3), L.kohya_name(TE)
    loha = {f"{n1}.hada_w1_a": L.rand(rng, 8, 2), f"{n1}.hada_w1_b": L.rand(rng, 2, 6),
            f"{n1}.hada_w2_a": L.rand(rng, 8, 2), f"{n1}.hada_w2_b": L.rand(rng, 2, 6),
            f"{n1}.alpha": np.array(1.0, np.float32),
            f"{n3}.hada_w1_a": L.rand(rng, 4, 2), f"{n3}.hada_w1_b": L.rand(rng, 2, 27),
            f"{n3}.hada_w2_a": L.rand(rng, 4, 2), f"{n3}.hada_w2_b": L.rand(rng, 2, 27),
            f"{n3}.alpha": np.array(3.0, np.float32)}
    lokr = {f"{n1}.lokr_w1": L.rand(rng, 2, 3), f"{n1}.lokr_w2_a": L.rand(rng, 4, 1),
            f"{n1}.lokr_w2_b": L.rand(rng, 1, 2), f"{n1}.alpha": np.array(0.5, np.float32),
            # both factors full: scale 1 whatever alpha says (LyCORIS)
            f"{nt}.lokr_w1": L.rand(rng, 5, 1), f"{nt}.lokr_w2": L.rand(rng, 1, 5),
            f"{nt}.alpha": np.array(7.0, np.float32),
            f"{n3}.lokr_w1": L.rand(rng, 2, 1), f"{n3}.lokr_w2": L.rand(rng, 2, 3, 3, 3)}
    base, r = setup(workdir, L.SDXL_KEYS, {"ha": loha, "kr": lokr}, """
        base b = "base.safetensors"
        lora ha = "ha.safetensors"
        lora kr = "kr.safetensors"
        save "out.safetensors" = b + ha + kr
    """)
    c = run(r)
    s = L.SDXL_KEYS
    deltas = {
        LINEAR: L.loha_delta(*(loha[f"{n1}.hada_{w}"] for w in ("w1_a", "w1_b", "w2_a", "w2_b")),
                             1.0, s[LINEAR])
        + L.lokr_delta(lokr[f"{n1}.lokr_w1"], lokr[f"{n1}.lokr_w2_a"] @ lokr[f"{n1}.lokr_w2_b"],
                       s[LINEAR], scale=0.5 / 1),
        CONV3: L.loha_delta(*(loha[f"{n3}.hada_{w}"] for w in ("w1_a", "w1_b", "w2_a", "w2_b")),
                            3.0, s[CONV3])
        + L.lokr_delta(lokr[f"{n3}.lokr_w1"], lokr[f"{n3}.lokr_w2"], s[CONV3]),
        TE: L.lokr_delta(lokr[f"{nt}.lokr_w1"], lokr[f"{nt}.lokr_w2"], s[TE]),
    }
    expect(load_file(workdir / "out.safetensors"), base, deltas, atol=1e-4)
    assert sorted(x["format"] for x in c.plan.data["loras"]) == ["lycoris-loha", "lycoris-lokr"]


def _tucker_loha(rng, n):
    """LyCORIS's Tucker LoHa of a [8, 6, 3, 3] conv: t [R, R, 3, 3], _a [R, out], _b [R, in]."""
    t = {f"{n}.hada_t1": L.rand(rng, 3, 3, 3, 3), f"{n}.hada_w1_a": L.rand(rng, 3, 8),
         f"{n}.hada_w1_b": L.rand(rng, 3, 6), f"{n}.hada_t2": L.rand(rng, 3, 3, 3, 3),
         f"{n}.hada_w2_a": L.rand(rng, 3, 8), f"{n}.hada_w2_b": L.rand(rng, 3, 6),
         f"{n}.alpha": np.array(5.0, np.float32)}
    want = L.loha_tucker_delta(*(t[f"{n}.hada_{w}"] for w in
                                 ("t1", "w1_a", "w1_b", "t2", "w2_a", "w2_b")), 5.0)
    return t, want


def _tucker_lokr(rng, n):
    """A whole w1 [2, 2] ⊗ a Tucker w2 [4, 3, 3, 3] of rank 2: scale alpha/2."""
    t = {f"{n}.lokr_w1": L.rand(rng, 2, 2), f"{n}.lokr_t2": L.rand(rng, 2, 2, 3, 3),
         f"{n}.lokr_w2_a": L.rand(rng, 2, 4), f"{n}.lokr_w2_b": L.rand(rng, 2, 3),
         f"{n}.alpha": np.array(1.5, np.float32)}
    w2 = L.tucker_factor(t[f"{n}.lokr_t2"], t[f"{n}.lokr_w2_a"], t[f"{n}.lokr_w2_b"])
    return t, L.lokr_delta(t[f"{n}.lokr_w1"], w2, (8, 6, 3, 3), scale=1.5 / 2)


def _tucker_lokr_both_decomposed(rng, n):
    """w1 = w1_a·w1_b (rank 1) ⊗ a Tucker w2 of rank 4: the rank alpha divides is w2_b's."""
    t = {f"{n}.lokr_w1_a": L.rand(rng, 2, 1), f"{n}.lokr_w1_b": L.rand(rng, 1, 2),
         f"{n}.lokr_t2": L.rand(rng, 4, 4, 3, 3),
         f"{n}.lokr_w2_a": L.rand(rng, 4, 4), f"{n}.lokr_w2_b": L.rand(rng, 4, 3),
         f"{n}.alpha": np.array(3.0, np.float32)}
    w1 = t[f"{n}.lokr_w1_a"].astype(np.float64) @ t[f"{n}.lokr_w1_b"]
    w2 = L.tucker_factor(t[f"{n}.lokr_t2"], t[f"{n}.lokr_w2_a"], t[f"{n}.lokr_w2_b"])
    return t, L.lokr_delta(w1, w2, (8, 6, 3, 3), scale=3.0 / 4)


@pytest.mark.parametrize("make, fmt", [(_tucker_loha, "lycoris-loha"),
                                       (_tucker_lokr, "lycoris-lokr"),
                                       (_tucker_lokr_both_decomposed, "lycoris-lokr")])
def test_tucker_loha_and_lokr_of_a_3x3_conv(workdir, make, fmt):
    keys = {**L.SDXL_KEYS, CONV3: (8, 6, 3, 3)}
    t, want = make(np.random.default_rng(16), L.kohya_name(CONV3))
    base, r = setup(workdir, keys, {"s": t}, """
        base b = "base.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + 0.6*s
    """)
    c = run(r)
    expect(load_file(workdir / "out.safetensors"), base, {CONV3: 0.6 * want}, atol=1e-4)
    (info,) = c.plan.data["loras"]
    assert (info["format"], info["matched"]) == (fmt, 1)


def test_full_diff_of_a_weight_and_its_bias(workdir):
    rng = np.random.default_rng(5)
    w, b = "single_blocks.0.linear1.weight", "single_blocks.0.linear1.bias"
    diff = {"lora_unet_single_blocks_0_linear1.diff": L.rand(rng, 14, 4),
            "lora_unet_single_blocks_0_linear1.diff_b": L.rand(rng, 14)}
    base, r = setup(workdir, L.FLUX_KEYS, {"d": diff}, """
        base b = "base.safetensors"
        lora d = "d.safetensors"
        save "out.safetensors" = b - 0.5*d
    """)
    run(r)
    expect(load_file(workdir / "out.safetensors"), base,
           {w: -0.5 * diff["lora_unet_single_blocks_0_linear1.diff"].astype(np.float64),
            b: -0.5 * diff["lora_unet_single_blocks_0_linear1.diff_b"].astype(np.float64)})


def test_a_lora_in_a_cluster_and_through_a_filter(workdir):
    rng = np.random.default_rng(6)
    n1 = L.kohya_name(LINEAR)
    t = L.kohya_module(rng, n1, L.SDXL_KEYS[LINEAR], rank=2, alpha=2.0)
    base, r = setup(workdir, L.SDXL_KEYS, {"s": t}, """
        base b = "base.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + sum([s: 0.25, clamp(s, -0.1, 0.1)])
    """)
    run(r)
    d = L.kohya_expected(t, n1, L.SDXL_KEYS[LINEAR])
    expect(load_file(workdir / "out.safetensors"), base,
           {LINEAR: 0.25 * d + np.clip(d, -0.1, 0.1)})


APPLY = """
    base b = "base.safetensors"
    lora s = "s.safetensors"
    save "out.safetensors" = b + s
"""


def refused(workdir, tensors: dict, text: str = APPLY) -> list:
    """The diagnostics of a recipe that applies lora `s` (tensors) to an SDXL base and is
    refused at plan time: nothing is written."""
    _, r = setup(workdir, L.SDXL_KEYS, {"s": tensors}, text)
    with pytest.raises(KmxError) as e:
        compile_recipe(r)
    assert not (workdir / "out.safetensors").exists()
    return e.value.diagnostics


def _unmatched_lora() -> dict:
    rng = np.random.default_rng(7)
    t = L.kohya_module(rng, L.kohya_name(LINEAR), L.SDXL_KEYS[LINEAR], rank=2)
    for i in range(4):
        t.update(L.kohya_module(rng, f"lora_unet_no_such_block_{i}", (3, 3), rank=1))
    return t


def test_an_unmatched_module_is_an_error_naming_it(workdir):
    (d,) = refused(workdir, _unmatched_lora())
    assert d.code == "K0322" and d.span.line == 3
    assert "4 of 5 module(s) of lora `s`" in d.message
    assert "`lora_unet_no_such_block_0`" in d.message and "and 1 more" in d.message


def test_unmatched_warn_merges_what_matches_and_the_plan_lists_the_rest(workdir):
    base, r = setup(workdir, L.SDXL_KEYS, {"s": _unmatched_lora()},
                    APPLY.replace("b + s", 'b + s with unmatched="warn"'))
    c = run(r)
    assert [w.code for w in c.warnings] == ["K0322"]
    (info,) = c.plan.data["loras"]
    assert info["unmatched"] == [f"lora_unet_no_such_block_{i}" for i in range(4)]
    assert (info["matched"], info["modules"]) == (1, 5)
    out = load_file(workdir / "out.safetensors")
    assert not np.array_equal(out[LINEAR], base[LINEAR])
    np.testing.assert_array_equal(out[CONV3], base[CONV3])


def test_a_module_of_another_width_is_an_error(workdir):
    rng = np.random.default_rng(8)
    (d,) = refused(workdir, L.kohya_module(rng, L.kohya_name(LINEAR), (8, 5), rank=2))
    assert d.code == "K0323" and "8×5" in d.message  # the key is 8×6


def _dora_file(rng, axis_rows: bool):
    name = L.kohya_name(LINEAR)
    t = L.kohya_module(rng, name, L.SDXL_KEYS[LINEAR], rank=2, alpha=1.0)
    t[f"{name}.dora_scale"] = np.abs(L.rand(rng, 8, 1) if axis_rows else L.rand(rng, 1, 6))
    return name, t


@pytest.mark.parametrize("axis_rows", [True, False])
def test_a_dora_is_normalised_against_the_base(workdir, axis_rows):
    """ΔW = m·(W + s·up·down)/‖W + s·up·down‖ − W, the norm per output row (m: [out, 1]) or
    per input column (m: [1, in]), scaled like any delta."""
    rng = np.random.default_rng(9)
    name, t = _dora_file(rng, axis_rows)
    base, r = setup(workdir, L.SDXL_KEYS, {"s": t}, APPLY.replace("b + s", "b + 0.7*s"))
    run(r)
    w = base[LINEAR].astype(np.float64)
    new = w + L.kohya_expected(t, name, L.SDXL_KEYS[LINEAR])
    m = t[f"{name}.dora_scale"].astype(np.float64)
    norm = np.sqrt((new ** 2).sum(axis=1 if axis_rows else 0, keepdims=True))
    expect(load_file(workdir / "out.safetensors"), base, {LINEAR: 0.7 * (m * new / norm - w)})


def test_a_dora_with_no_base_is_refused_before_anything_runs(workdir):
    _, t = _dora_file(np.random.default_rng(9), True)
    (d,) = refused(workdir, t, APPLY.replace("base b", "model b"))
    assert d.code == "K0324"


def test_a_lora_alone_has_nothing_to_map_onto(workdir):
    rng = np.random.default_rng(10)
    (d,) = refused(workdir, L.kohya_module(rng, L.kohya_name(LINEAR), (8, 6), rank=2), """
        lora s = "s.safetensors"
        save "out.safetensors" = 2*s with delta=true
    """)
    assert d.code == "K0325"


def test_a_lora_key_out_of_core_gives_the_same_result(workdir):
    rng = np.random.default_rng(11)
    keys = {LINEAR: (512, 256)}
    name = L.kohya_name(LINEAR)
    t = L.kohya_module(rng, name, keys[LINEAR], rank=4, alpha=2.0)
    base, r = setup(workdir, keys, {"s": t}, """
        base b = "base.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + 0.5*s
    """)
    c = run(r, memory_limit=1_500_000)
    assert c.schedule.jobs[0].ooc is not None
    expect(load_file(workdir / "out.safetensors"), base,
           {LINEAR: 0.5 * L.kohya_expected(t, name, keys[LINEAR])}, atol=1e-4)


def test_the_lora_terms_survive_the_executables_serialization(workdir):
    """What a Ray worker receives holds each key's modules, and the LoRA's file."""
    from karmixlang.plan.executable import Executable

    rng = np.random.default_rng(12)
    n3 = L.kohya_name(CONV3)
    t = L.kohya_module(rng, n3, L.SDXL_KEYS[CONV3], rank=2, alpha=1.0, tucker=True)
    _, r = setup(workdir, L.SDXL_KEYS, {"s": t}, """
        base b = "base.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + s
    """)
    exe = compile_recipe(r).schedule.executable
    back = Executable.loads(exe.dumps())
    assert [j.lora for j in back.jobs] == [j.lora for j in exe.jobs]
    (job,) = [j for j in back.jobs if j.key == CONV3]
    ((shape, (term,)),) = job.lora.values()
    assert shape == L.SDXL_KEYS[CONV3] and term.kind == "lora" and term.rank == 2
    assert str(workdir / "s.safetensors") in back.part([job]).files


def test_a_loras_modules_enter_the_fingerprints_of_the_keys_it_changes_only(workdir):
    from karmixlang.plan.fingerprint import header_identity, key_fingerprints

    rng = np.random.default_rng(13)
    n1 = L.kohya_name(LINEAR)
    write_model(workdir / "r3.safetensors", L.kohya_module(rng, n1, L.SDXL_KEYS[LINEAR], 3))
    _, r = setup(workdir, L.SDXL_KEYS,
                 {"s": L.kohya_module(rng, n1, L.SDXL_KEYS[LINEAR], rank=2)}, """
        base b = "base.safetensors"
        lora s = "${f}.safetensors"
        param f = "s"
        save "out.safetensors" = b + s
    """)

    def prints(f):
        exe = compile_recipe(r, {"f": f}).schedule.executable
        return key_fingerprints(exe, header_identity(exe))[0]

    two, three = prints("s"), prints("r3")
    assert {k for k in two if two[k] != three[k]} == {LINEAR}


def test_modules_onto_row_slices_of_fused_keys_sdxl_te2_and_diffusers_flux(workdir):
    """q, k and v modules each change their third of OpenCLIP's in_proj_weight (kohya's
    `lora_te2_` in Hugging Face names) and of Flux's qkv / linear1 (diffusers names)."""
    rng = np.random.default_rng(14)
    te2 = "lora_te2_text_model_encoder_layers_0_"
    inproj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    cfc = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    lora = {}
    for x in "qv":
        lora.update(L.kohya_module(rng, f"{te2}self_attn_{x}_proj", (4, 4), rank=2, alpha=1.0))
    lora.update(L.kohya_module(rng, f"{te2}mlp_fc1", (6, 4), rank=1))
    base, r = setup(workdir, L.SDXL_KEYS, {"s": lora}, """
        base b = "base.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + s
    """)
    c = run(r)
    want = np.zeros((12, 4))
    want[0:4] = L.kohya_expected(lora, f"{te2}self_attn_q_proj", (4, 4))
    want[8:12] = L.kohya_expected(lora, f"{te2}self_attn_v_proj", (4, 4))
    expect(load_file(workdir / "out.safetensors"), base,
           {inproj: want, cfc: L.kohya_expected(lora, f"{te2}mlp_fc1", (6, 4))})
    assert c.plan.data["loras"][0]["keys"] == 2


def test_diffusers_flux_q_and_mlp_onto_linear1(workdir):
    rng = np.random.default_rng(15)
    pre = "transformer.single_transformer_blocks.0."
    peft = {f"{pre}attn.to_q.lora_A.weight": L.rand(rng, 2, 4),
            f"{pre}attn.to_q.lora_B.weight": L.rand(rng, 2, 2),
            f"{pre}proj_mlp.lora_A.weight": L.rand(rng, 1, 4),
            f"{pre}proj_mlp.lora_B.weight": L.rand(rng, 8, 1),
            f"{pre}proj_mlp.alpha": np.array(0.5, np.float32)}
    base, r = setup(workdir, L.FLUX_KEYS, {"p": peft}, """
        base b = "base.safetensors"
        lora p = "p.safetensors"
        save "out.safetensors" = b + p
    """)
    run(r)
    want = np.zeros((14, 4))
    want[0:2] = L.lora_delta(peft[f"{pre}attn.to_q.lora_B.weight"],
                             peft[f"{pre}attn.to_q.lora_A.weight"])
    want[6:14] = L.lora_delta(peft[f"{pre}proj_mlp.lora_B.weight"],
                              peft[f"{pre}proj_mlp.lora_A.weight"], 0.5)
    expect(load_file(workdir / "out.safetensors"), base, {"single_blocks.0.linear1.weight": want})
