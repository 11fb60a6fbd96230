"""Stable Diffusion 1.x and XL name tables: diffusers <-> LDM/SGM names of the UNet and the VAE
(without their single-file prefixes), and the SDXL OpenCLIP text encoder <-> Hugging Face CLIP.

The tables are generated from the architectures' structure — levels, resnets per level, which
levels have attention — as the public conversion scripts (diffusers'
convert_original_stable_diffusion_to_diffusers and its SDXL sibling) describe it.
"""

from __future__ import annotations

from karmixlang.io.layouts.renames import Renames, table

_RESNET = table(("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))

# per architecture: which down levels have attention (the up levels mirror them)
_DOWN_ATTENTION = {"sd1": (True, True, True, False), "sdxl": (False, True, True)}


def _unet(arch: str) -> Renames:
    attn = _DOWN_ATTENTION[arch]
    levels = len(attn)
    pairs = [("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."),
             ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0.", _RESNET),
             ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.", _RESNET)]
    if arch == "sdxl":
        pairs += [("add_embedding.linear_1.", "label_emb.0.0."),
                  ("add_embedding.linear_2.", "label_emb.0.2.")]
    for i in range(levels):
        for j in range(2):  # two resnets per down level, after the level's input block
            n = 3 * i + j + 1
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", _RESNET))
            if attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.",
                          f"input_blocks.{3 * (i + 1)}.0.op."))
        up_attn = attn[levels - 1 - i]
        for j in range(3):  # three resnets per up level
            n = 3 * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", _RESNET))
            if up_attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1."))
        if i < levels - 1:  # the upsampler follows the level's last resnet (and attention)
            pairs.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{3 * i + 2}.{2 if up_attn else 1}."))
    return table(*pairs)


UNET = {"sd1": _unet("sd1"), "sdxl": _unet("sdxl")}

_VAE_RESNET = table(("conv_shortcut.", "nin_shortcut."))
# new (to_q) and old (query) diffusers attention names; the canonical side is the same
_VAE_ATTENTION = table(("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
                       ("to_v.", "v."), ("to_out.0.", "proj_out."), ("query.", "q."),
                       ("key.", "k."), ("value.", "v."), ("proj_attn.", "proj_out."))
VAE_LINEAR_ATTENTION = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
_VAE_LEVELS = 4


def _vae() -> Renames:
    same = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
            "quant_conv.", "post_quant_conv.")
    pairs = [(p, p) for p in same]
    pairs += [("encoder.conv_norm_out.", "encoder.norm_out."),
              ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid_block.resnets.{k}.", f"{side}.mid.block_{k + 1}.", _VAE_RESNET)
                  for k in range(2)]
        pairs.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.",
                      _VAE_ATTENTION))
    for i in range(_VAE_LEVELS):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                   _VAE_RESNET) for j in range(2)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                      f"encoder.down.{i}.downsample.conv."))
        up = _VAE_LEVELS - 1 - i  # diffusers counts decoder levels from the bottom
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.",
                   _VAE_RESNET) for j in range(3)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                      f"decoder.up.{up}.upsample.conv."))
    return table(*pairs)


VAE = _vae()

# SDXL's second text encoder: Hugging Face CLIPTextModelWithProjection names -> OpenCLIP names.
# q/k/v (fused in OpenCLIP's in_proj_*) and text_projection (transposed) are in views.py.
CLIP_G_LAYER = table(("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                     ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                     ("mlp.fc2.", "mlp.c_proj."))
CLIP_G_LAYERS = 32
CLIP_G = table(("text_model.embeddings.token_embedding.", "token_embedding."),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.final_layer_norm.", "ln_final."),
               *((f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.",
                  CLIP_G_LAYER) for i in range(CLIP_G_LAYERS)))
