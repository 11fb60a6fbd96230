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
