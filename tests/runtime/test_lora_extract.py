"""`save ... with lora=RANK`: a Delta written as a kohya LoRA (truncated SVD per key), against
numpy's SVD (tests/lora_np.py); extracting at full rank and applying the file gives the
delta back to rounding; what a LoRA cannot hold is left out and listed."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lora_np as L
from karmixlang.api import compile as compile_recipe
from karmixlang.check.checker import check_program
from karmixlang.demo.synth import write_model
from karmixlang.plan.report import render_text
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe

CONV3 = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
INPROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def run(path):
    compiled = compile_recipe(path, threads=1)
    execute(compiled, RunOptions(threads=1))
    return compiled


def extract(workdir, keys, save: str):
    """Writes two models of `keys`, base b and tuned t, and runs `save "x.safetensors" = SAVE`:
    (base, tuned, the compiled recipe)."""
    base, tuned = L.base_model(keys, 0), L.base_model(keys, 1)
    write_model(workdir / "base.safetensors", base)
    write_model(workdir / "tuned.safetensors", tuned)
    c = run(recipe(workdir, f"""
        base b = "base.safetensors"
        model t = "tuned.safetensors"
        save "x.safetensors" = {save}
    """))
    return base, tuned, c


def assert_applied_back(workdir, base, tuned, atol=2e-5):
    """Applying x.safetensors to base gives tuned back, keys a LoRA leaves out (1-D: norms,
    biases) unchanged."""
    run(recipe(workdir, """
        base b = "base.safetensors"
        lora x = "x.safetensors"
        save "back.safetensors" = b + x
    """, "back.kmx"))
    back = load_file(workdir / "back.safetensors")
    assert set(back) == set(tuned)
    for k, v in tuned.items():
        np.testing.assert_allclose(back[k], v if v.ndim > 1 else base[k], atol=atol, err_msg=k)


def test_full_rank_extraction_applied_gives_the_delta_back(workdir):
    base, tuned, _ = extract(workdir, L.SDXL_KEYS, "t - b with lora=64, lora_conv=64")
    assert_applied_back(workdir, base, tuned)


def test_truncated_factors_are_numpys_best_rank_r_approximation(workdir):
    base, tuned, c = extract(workdir, L.SDXL_KEYS,
                             '0.5*(t - b) with lora=2, lora_conv=1, dtype="fp32"')
    x = load_file(workdir / "x.safetensors")
    for key, rank in (("model.diffusion_model.input_blocks.4.1.proj_in.weight", 2),
                      (CONV3, 1),
                      ("conditioner.embedders.0.transformer.text_model.encoder.layers.0."
                       "mlp.fc1.weight", 2)):
        name = L.kohya_name(key)
        delta = 0.5 * (tuned[key].astype(np.float64) - base[key])
        up, down = L.svd_lora(delta, rank)
        assert x[f"{name}.lora_down.weight"].shape[0] == rank and float(x[f"{name}.alpha"]) == rank
        got = L.lora_delta(x[f"{name}.lora_up.weight"], x[f"{name}.lora_down.weight"],
                           x[f"{name}.alpha"], delta.shape)
        np.testing.assert_allclose(got, (up @ down).reshape(delta.shape), atol=1e-5, err_msg=key)
    assert c.plan.data["saves"][0]["bytes_written"] == \
        sum(v.nbytes for v in x.values())  # the plan shows the LoRA's size


def test_openclip_in_proj_becomes_kohyas_q_k_v_modules(workdir):
    base, tuned, _ = extract(workdir, L.SDXL_KEYS, "t - b with lora=4")
    x = load_file(workdir / "x.safetensors")
    delta = tuned[INPROJ].astype(np.float64) - base[INPROJ]
    for i, part in enumerate("qkv"):
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj"
        got = x[f"{name}.lora_up.weight"].astype(np.float64) @ x[f"{name}.lora_down.weight"]
        np.testing.assert_allclose(got, delta[4 * i:4 * (i + 1)], atol=2e-5)


def test_what_a_lora_cannot_hold_is_left_out_and_listed(workdir):
    _, _, c = extract(workdir, L.SDXL_KEYS, "t - b with lora=8")
    info = c.plan.data["saves"][0]["lora"]
    left = {x["key"]: x["reason"] for x in info["left_out"]}
    assert set(left) == {CONV3, "model.diffusion_model.input_blocks.4.1.norm.weight",
                         "model.diffusion_model.input_blocks.4.1.norm.bias"}
    assert "lora_conv" in left[CONV3]
    assert (info["rank"], info["conv_rank"], info["modules"], info["arch"]) == (8, None, 9, "sdxl")
    with safe_open(workdir / "x.safetensors", "np") as f:
        meta, names = f.metadata(), set(f.keys())
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"],
            meta["modelspec.architecture"]) == ("8", "8", "networks.lora",
                                                "stable-diffusion-xl-v1-base/lora")
    assert not any(n.startswith("lora_unet_input_blocks_1_0_in_layers_2") for n in names)
    text = render_text(c.plan)
    assert "a LoRA (sdxl, kohya names), rank 8, no 3×3 convs: 9 modules, 27 tensors" in text
    assert "3 key(s) left out" in text


@pytest.mark.parametrize("keys, names", [
    (L.FLUX_KEYS, {"lora_unet_double_blocks_0_img_attn_qkv"}),  # BFL's transformer alone
    (L.FLUX_AIO_KEYS, {"lora_unet_double_blocks_0_img_attn_qkv",  # ComfyUI's whole checkpoint
                       "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                       "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"}),
])
def test_flux_extraction_round_trips_in_kohya_names(workdir, keys, names):
    base, tuned, _ = extract(workdir, keys, "t - b with lora=16")
    with safe_open(workdir / "x.safetensors", "np") as f:
        assert {n + ".lora_up.weight" for n in names} <= set(f.keys())
    assert_applied_back(workdir, base, tuned)


@pytest.mark.parametrize("opts, code", [
    ("lora=0", "K0218"), ("lora=2.5", "K0218"), ('lora="8"', "K0218"),
    ("lora_conv=8", "K0218"), ("lora=8, shard=\"1GB\"", "K0218"),
    ("lora=8, delta=true", "K0218"),
])
def test_extraction_options_are_checked(tmp_path, opts, code):
    _, diags = check_program(recipe(tmp_path, f"""
        base b = "base.safetensors"
        model t = "tuned.safetensors"
        save "x.safetensors" = t - b with {opts}
    """))
    assert code in [d.code for d in diags]


def test_extracting_from_a_model_is_an_error(tmp_path):
    _, diags = check_program(recipe(tmp_path, """
        base b = "base.safetensors"
        model t = "tuned.safetensors"
        save "x.safetensors" = t with lora=8
    """))
    assert [d.code for d in diags if d.is_error] == ["K0217"]


def test_sd1_extraction_names_the_unet_as_kohya_does_and_round_trips(workdir):
    """sd-scripts names an SD1.x UNet in diffusers' names, its text encoder `lora_te_`."""
    base, tuned, _ = extract(workdir, L.SD1_KEYS, "t - b with lora=8, lora_conv=64")
    with safe_open(workdir / "x.safetensors", "np") as f:
        modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                   for k in f.keys()}
    assert modules == {"lora_unet_down_blocks_0_attentions_0_proj_in",
                       "lora_unet_down_blocks_0_resnets_0_conv1",
                       "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k",
                       "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    assert_applied_back(workdir, base, tuned)
