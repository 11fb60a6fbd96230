"""io/layouts: naming detection and the name tables, on the real key layouts."""

from __future__ import annotations

import pytest

from karmixlang.demo.synth import load_layout
from karmixlang.io.layouts import PREFIX, Naming, Piece, canonical_name, detect, pieces
from tests.foreign import component_names

LAYOUT = {arch: {k: tuple(s.shape) for k, s in load_layout(arch).items()}
          for arch in ("sd1", "sdxl", "flux")}
FORMS = [("sd1", "unet", "diffusers"), ("sdxl", "unet", "diffusers"), ("sd1", "vae", "diffusers"),
         ("sdxl", "vae", "diffusers"), ("sd1", "clip_l", "hf"), ("sdxl", "clip_l", "hf"),
         ("sdxl", "clip_g", "hf"), ("flux", "unet", "diffusers"), ("flux", "vae", "ldm"),
         ("sd1", "unet", "ldm"), ("sdxl", "clip_g", "openclip"), ("flux", "unet", "bfl")]


def foreign(arch: str, comp: str, form: str) -> dict[str, tuple[str, tuple]]:
    """foreign key -> (canonical key, canonical shape) for one component of a layout."""
    prefix, out = PREFIX[arch][comp], {}
    for key, shape in LAYOUT[arch].items():
        if key.startswith(prefix):
            for name in component_names(key[len(prefix):], comp, form, arch, shape):
                assert name not in out, f"two canonical keys named {name}"
                out[name] = (key, shape)
    return out


@pytest.mark.parametrize("arch,comp,form", FORMS)
def test_every_canonical_key_round_trips_through_the_other_naming(arch, comp, form):
    names = foreign(arch, comp, form)
    naming = detect({k: () for k in names} | _vae_probe(names, arch))
    assert (naming.component, naming.form) == (comp, form) and naming.fits(arch)
    covered: dict[str, list[Piece]] = {}
    for name, (key, shape) in names.items():
        got = pieces(naming, name, arch)
        assert got and all(p.key == key for p in got), (name, got, key)
        covered.setdefault(key, []).extend(got)
    prefix = PREFIX[arch][comp]
    # HF's CLIPTextModelWithProjection has no logit_scale (CLIPModel holds it)
    expected = {k for k in LAYOUT[arch] if k.startswith(prefix)
                and not (form == "hf" and k.endswith("logit_scale"))}
    assert set(covered) == expected
    for key, parts in covered.items():  # the parts tile the canonical rows exactly once
        n = LAYOUT[arch][key][0] if LAYOUT[arch][key] else 1
        spans = sorted(p.rows(n) for p in parts)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _vae_probe(names, arch):
    # the one shape detection reads: a Flux VAE's 16 latent channels
    probe = "decoder.conv_in.weight"
    if probe in names:
        return {probe: (512, 16 if arch == "flux" else 4, 3, 3)}
    return {}


@pytest.mark.parametrize("diffusers,ldm,arch", [
    # facts from the public conversion scripts
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "sd1"),
    ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight", "sd1"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight", "sd1"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight", "sdxl"),
    ("up_blocks.1.resnets.2.conv_shortcut.weight", "output_blocks.5.0.skip_connection.weight",
     "sd1"),
    ("mid_block.resnets.1.time_emb_proj.bias", "middle_block.2.emb_layers.1.bias", "sdxl"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight", "sdxl"),
    ("conv_norm_out.weight", "out.0.weight", "sd1"),
    ("down_blocks.0.resnets.1.conv2.weight", "input_blocks.2.0.out_layers.3.weight", "sdxl"),
])
def test_unet_names_match_the_conversion_scripts(diffusers, ldm, arch):
    naming = Naming(arch, "component", "unet", "diffusers")
    assert canonical_name(naming, diffusers, arch) == "model.diffusion_model." + ldm


def test_vae_old_and_new_attention_names_and_the_conv_reshape():
    naming = Naming("sd", "component", "vae", "diffusers")
    for name in ("encoder.mid_block.attentions.0.to_q.weight",
                 "encoder.mid_block.attentions.0.query.weight"):
        assert pieces(naming, name, "sd1") == (
            Piece("first_stage_model.encoder.mid.attn_1.q.weight", conv=True),)
    assert pieces(naming, "decoder.up_blocks.0.resnets.0.conv1.weight", "sdxl") == (
        Piece("first_stage_model.decoder.up.3.block.0.conv1.weight"),)
    assert not pieces(naming, "decoder.mid_block.attentions.0.group_norm.weight", "sd1")[0].conv


def test_fused_and_swapped_flux_keys():
    naming = Naming("flux", "component", "unet", "diffusers")
    p = pieces(naming, "single_transformer_blocks.3.proj_mlp.weight", "flux")
    assert p == (Piece("model.diffusion_model.single_blocks.3.linear1.weight", 3, (1, 1, 1, 4)),)
    assert p[0].rows(21504) == (9216, 21504)
    k = pieces(naming, "transformer_blocks.0.attn.add_k_proj.bias", "flux")[0]
    assert (k.key, k.rows(9216)) == ("model.diffusion_model.double_blocks.0.txt_attn.qkv.bias",
                                     (3072, 6144))
    shift_scale = pieces(naming, "norm_out.linear.weight", "flux")
    assert [(p.part, p.src) for p in shift_scale] == [(0, (1, 2)), (1, (0, 2))]


def test_clip_text_encoders_take_the_prefix_of_the_architecture():
    hf = Naming("any", "component", "clip_l", "hf")
    name = "text_model.final_layer_norm.weight"
    assert canonical_name(hf, name, "sd1") == "cond_stage_model.transformer." + name
    assert canonical_name(hf, name, "sdxl") == "conditioner.embedders.0.transformer." + name
    g = Naming("sdxl", "component", "clip_g", "hf")
    assert pieces(g, "text_projection.weight", "sdxl") == (
        Piece("conditioner.embedders.1.model.text_projection", transpose=True),)
    assert pieces(g, "text_model.embeddings.position_ids", "sdxl") is None


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "flux"])
def test_single_file_layouts_are_detected(arch):
    naming = detect(LAYOUT[arch])
    assert (naming.arch, naming.style) == (arch, "single-file")
    assert pieces(naming, "x.y", arch) == (Piece("x.y"),)


def test_components_and_unknown_files_are_detected():
    vae = {k[len("first_stage_model."):]: s for k, s in LAYOUT["sd1"].items()
           if k.startswith("first_stage_model.")}
    assert detect(vae) == Naming("sd", "component", "vae", "ldm")
    assert detect(vae).fits("sd1") and detect(vae).fits("sdxl") and not detect(vae).fits("flux")
    prefixed_vae = {"first_stage_model." + k: s for k, s in vae.items()}
    assert detect(prefixed_vae) == Naming("sd", "single-file")
    unet = {k[len("model.diffusion_model."):]: s for k, s in LAYOUT["sdxl"].items()
            if k.startswith("model.diffusion_model.")}
    assert detect(unet) == Naming("sdxl", "component", "unet", "ldm")
    assert detect({"model.w": (2,), "pos_ids": (1, 5)}).known is False
    assert "SDXL" in detect(LAYOUT["sdxl"]).describe()
    assert detect(unet).describe() == "ldm UNet (SDXL)"
