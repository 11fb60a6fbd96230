"""LoRA headers: modules grouped and sized from tensor names and shapes only, in each format;
module names mapped onto real checkpoint keys (../shared/data/layouts, via the packaged
copies) with every prefix variant."""

from __future__ import annotations

import numpy as np
import pytest

import lora_np as L
from karmixlang.demo.synth import load_layout, write_model
from karmixlang.diagnostics import KmxError
from karmixlang.io.header import read_checkpoint
from karmixlang.io.lora import parse_lora, rank_of
from karmixlang.io.lora_map import guess_arch, key_form, map_modules, module_form


def parsed(tmp_path, tensors: dict):
    path = str(tmp_path / "l.safetensors")
    write_model(path, tensors)
    return parse_lora(read_checkpoint(path), path)


def f32(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("tensors, kind, fmt, rows, cols, rank", [
    ({"m.lora_up.weight": f32(8, 2), "m.lora_down.weight": f32(2, 6),
      "m.alpha": f32()}, "lora", "kohya", 8, 6, 2),
    ({"m.lora_up.weight": f32(4, 2, 1, 1), "m.lora_down.weight": f32(2, 3, 3, 3)},
     "lora", "kohya", 4, 27, 2),
    ({"m.lora_up.weight": f32(4, 2, 1, 1), "m.lora_mid.weight": f32(2, 2, 3, 3),
      "m.lora_down.weight": f32(2, 3, 1, 1)}, "lora", "kohya", 4, 27, 2),
    ({"m.lora_B.weight": f32(9, 3), "m.lora_A.weight": f32(3, 4)}, "lora", "peft", 9, 4, 3),
    ({"m.hada_w1_a": f32(8, 2), "m.hada_w1_b": f32(2, 6), "m.hada_w2_a": f32(8, 2),
      "m.hada_w2_b": f32(2, 6), "m.alpha": f32()}, "loha", "lycoris-loha", 8, 6, 2),
    ({"m.hada_w1_a": f32(2, 4), "m.hada_w1_b": f32(2, 3), "m.hada_t1": f32(2, 2, 3, 3),
      "m.hada_w2_a": f32(2, 4), "m.hada_w2_b": f32(2, 3), "m.hada_t2": f32(2, 2, 3, 3)},
     "loha", "lycoris-loha", 4, 27, 2),
    ({"m.lokr_w1": f32(2, 3), "m.lokr_w2_a": f32(4, 1), "m.lokr_w2_b": f32(1, 2),
      "m.alpha": f32()}, "lokr", "lycoris-lokr", 8, 6, 1),
    ({"m.lokr_w1": f32(2, 1), "m.lokr_w2": f32(2, 3, 3, 3)}, "lokr", "lycoris-lokr", 4, 27,
     None),
    ({"m.lokr_w1_a": f32(2, 1), "m.lokr_w1_b": f32(1, 3), "m.lokr_w2": f32(4, 2)},
     "lokr", "lycoris-lokr", 8, 6, 1),
    ({"m.diff": f32(8, 6)}, "diff", "diff", 8, 6, None),
])
def test_each_format_is_one_module_of_the_right_size(tmp_path, tensors, kind, fmt, rows, cols,
                                                     rank):
    lora = parsed(tmp_path, tensors)
    (m,) = lora.modules
    assert (m.name, m.kind, lora.format, m.rows, m.cols, rank_of(m)) == \
        ("m", kind, fmt, rows, cols, rank)


def test_a_diff_b_is_a_module_of_the_bias(tmp_path):
    lora = parsed(tmp_path, {"m.diff": f32(12, 4), "m.diff_b": f32(12)})
    assert sorted((m.target, m.rows, m.cols) for m in lora.modules) == \
        [("bias", 12, 1), ("weight", 12, 4)]


@pytest.mark.parametrize("tensors, code, words", [
    ({"model.diffusion_model.x.weight": f32(2, 2)}, "K0320", "of no LoRA format"),
    ({"m.lora_up.weight": f32(8, 2)}, "K0321", "missing down"),
    ({"m.lora_up.weight": f32(8, 3), "m.lora_down.weight": f32(2, 6)}, "K0321", "does not fit"),
    ({"m.lora_up.weight": f32(8, 2), "m.lora_down.weight": f32(2, 6), "m.hada_w1_a": f32(8, 2)},
     "K0321", "several formats"),
    ({"m.lora_up.weight": f32(8, 2), "m.lora_down.weight": f32(2, 6), "m.alpha": f32(2)},
     "K0321", "not one number"),
    ({"m.hada_w1_a": f32(8, 2), "m.hada_w1_b": f32(2, 6), "m.hada_w2_a": f32(4, 2),
      "m.hada_w2_b": f32(2, 6)}, "K0321", "factors differ"),
])
def test_what_is_not_a_lora_is_refused_with_its_names(tmp_path, tensors, code, words):
    with pytest.raises(KmxError) as e:
        parsed(tmp_path, tensors)
    (d,) = e.value.diagnostics
    assert d.code == code and words in d.message, d.message


SDXL = load_layout("sdxl")
FLUX = load_layout("flux")


def test_every_sdxl_unet_and_clip_l_weight_has_a_kohya_name_that_maps_back():
    keys = {k: s.shape for k, s in SDXL.items() if k.startswith(
        ("model.diffusion_model.", "conditioner.embedders.0.")) and k.endswith(".weight")}
    forms = {key_form(k) for k in keys}
    assert len(forms) == len(keys)  # no two keys share a form: mapping is exact
    for k in keys:
        assert key_form(k)[:2] == module_form(L.kohya_name(k))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("module", ["lora_unet_double_blocks_3_img_attn_qkv",
                                    "diffusion_model.double_blocks.3.img_attn.qkv",
                                    "transformer.double_blocks.3.img_attn.qkv"])
def test_flux_modules_map_with_and_without_the_checkpoint_prefix(tmp_path, prefix, module):
    keys = {prefix + k[len("model.diffusion_model."):]: s.shape for k, s in FLUX.items()
            if k.startswith("model.diffusion_model.")}
    qkv = keys[prefix + "double_blocks.3.img_attn.qkv.weight"]
    lora = parsed(tmp_path, {f"{module}.lora_up.weight": f32(qkv[0], 1),
                             f"{module}.lora_down.weight": f32(1, qkv[1])})
    mapping = map_modules(lora, keys)
    assert [m.key for m in mapping.matches] == [prefix + "double_blocks.3.img_attn.qkv.weight"]
    assert guess_arch(lora) == "flux"


def test_a_module_with_no_key_is_unmatched_not_dropped(tmp_path):
    lora = parsed(tmp_path, {"lora_unet_nowhere.lora_up.weight": f32(2, 1),
                             "lora_unet_nowhere.lora_down.weight": f32(1, 2)})
    mapping = map_modules(lora, {"model.diffusion_model.somewhere.weight": (2, 2)})
    assert [m.name for m in mapping.unmatched] == ["lora_unet_nowhere"] and not mapping.matches


def _layout_keys(name: str, prefix: str) -> dict:
    return {k: s.shape for k, s in load_layout(name).items()
            if k.startswith(prefix) and "float" in s.dtype}


def _matches(tmp_path, keys: dict, modules: dict[str, tuple[int, int]]):
    """Each module (rank 1, sized rows × cols) mapped onto `keys`: {module: (key, rows)}."""
    tensors = {}
    for name, (rows, cols) in modules.items():
        tensors[f"{name}.lora_up.weight"] = f32(rows, 1)
        tensors[f"{name}.lora_down.weight"] = f32(1, cols)
    mapping = map_modules(parsed(tmp_path, tensors), keys)
    assert not mapping.unmatched and not mapping.misfits, (mapping.unmatched, mapping.misfits)
    return {m.module.name: (m.key, m.rows) for m in mapping.matches}


def test_kohya_sd1_unet_modules_in_diffusers_names_map_onto_ldm_keys(tmp_path):
    keys = _layout_keys("sd1", "model.diffusion_model.")
    got = _matches(tmp_path, keys, {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_up_blocks_3_attentions_2_proj_out": (320, 320),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (10240, 1280),
        "lora_unet_down_blocks_1_resnets_0_conv1": (640, 320 * 9)})
    assert got == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None),
        "lora_unet_up_blocks_3_attentions_2_proj_out":
            ("model.diffusion_model.output_blocks.11.1.proj_out.weight", None),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
            ("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", None),
        "lora_unet_down_blocks_1_resnets_0_conv1":
            ("model.diffusion_model.input_blocks.4.0.in_layers.2.weight", None)}


def test_kohya_sdxl_te2_q_k_v_map_onto_thirds_of_the_fused_in_proj(tmp_path):
    keys = _layout_keys("sdxl", "conditioner.embedders.")
    fused = "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
    got = _matches(tmp_path, keys, {
        f"lora_te2_text_model_encoder_layers_5_self_attn_{x}_proj": (1280, 1280) for x in "qkv"} |
        {"lora_te2_text_model_encoder_layers_5_mlp_fc1": (5120, 1280),
         "lora_te1_text_model_encoder_layers_5_mlp_fc1": (3072, 768)})
    assert {got[f"lora_te2_text_model_encoder_layers_5_self_attn_{x}_proj"] for x in "qkv"} == \
        {(fused, (0, 1280)), (fused, (1280, 2560)), (fused, (2560, 3840))}
    assert got["lora_te2_text_model_encoder_layers_5_mlp_fc1"] == (
        "conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_fc.weight", None)
    assert got["lora_te1_text_model_encoder_layers_5_mlp_fc1"][0] == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.5.mlp.fc1.weight"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_flux_modules_map_onto_row_slices_of_qkv_and_linear1(tmp_path, prefix):
    keys = {prefix + k[len("model.diffusion_model."):]: s
            for k, s in _layout_keys("flux", "model.diffusion_model.").items()}
    got = _matches(tmp_path, keys, {
        "transformer.transformer_blocks.2.attn.to_k": (3072, 3072),
        "transformer.transformer_blocks.2.attn.add_v_proj": (3072, 3072),
        "transformer.single_transformer_blocks.7.proj_mlp": (12288, 3072),
        "transformer.single_transformer_blocks.7.attn.to_q": (3072, 3072),
        "lora_transformer_single_transformer_blocks_7_proj_out": (3072, 15360)})
    assert got == {
        "transformer.transformer_blocks.2.attn.to_k":
            (prefix + "double_blocks.2.img_attn.qkv.weight", (3072, 6144)),
        "transformer.transformer_blocks.2.attn.add_v_proj":
            (prefix + "double_blocks.2.txt_attn.qkv.weight", (6144, 9216)),
        "transformer.single_transformer_blocks.7.proj_mlp":
            (prefix + "single_blocks.7.linear1.weight", (9216, 21504)),
        "transformer.single_transformer_blocks.7.attn.to_q":
            (prefix + "single_blocks.7.linear1.weight", (0, 3072)),
        "lora_transformer_single_transformer_blocks_7_proj_out":
            (prefix + "single_blocks.7.linear2.weight", None)}
