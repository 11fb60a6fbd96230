"""Flux.1 transformer names: diffusers (FluxTransformer2DModel) -> BFL's (without a prefix).

Renames are a prefix table; the keys that BFL fuses (q/k/v of every attention, and a single
block's linear1 = q, k, v and the MLP input) are `FUSED`: diffusers name -> (BFL key, part,
units), the units being each part's share of the fused rows (the MLP is 4x the width).
`final_layer.adaLN_modulation.1` holds (shift, scale) where diffusers' `norm_out.linear` holds
(scale, shift): it is the stored rows swapped (`SWAPPED`), still a concat along dim 0.
"""

from __future__ import annotations

from karmixlang.io.layouts.renames import table

DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
MLP_RATIO = 4

_DOUBLE = table(("norm1.linear.", "img_mod.lin."), ("norm1_context.linear.", "txt_mod.lin."),
                ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
                ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
                ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
                ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
                ("attn.to_out.0.", "img_attn.proj."), ("attn.to_add_out.", "txt_attn.proj."),
                ("ff.net.0.proj.", "img_mlp.0."), ("ff.net.2.", "img_mlp.2."),
                ("ff_context.net.0.proj.", "txt_mlp.0."), ("ff_context.net.2.", "txt_mlp.2."))
_SINGLE = table(("norm.linear.", "modulation.lin."), ("proj_out.", "linear2."),
                ("attn.norm_q.weight", "norm.query_norm.scale"),
                ("attn.norm_k.weight", "norm.key_norm.scale"))

TRANSFORMER = table(
    ("x_embedder.", "img_in."), ("context_embedder.", "txt_in."),
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
    ("proj_out.", "final_layer.linear."),
    *((f"transformer_blocks.{i}.", f"double_blocks.{i}.", _DOUBLE) for i in range(DOUBLE_BLOCKS)),
    *((f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _SINGLE)
      for i in range(SINGLE_BLOCKS)))


def _fused() -> dict[str, tuple[str, int, tuple[int, ...]]]:
    out = {}
    for end in ("weight", "bias"):
        for i in range(DOUBLE_BLOCKS):
            for p, x in enumerate("qkv"):
                out[f"transformer_blocks.{i}.attn.to_{x}.{end}"] = (
                    f"double_blocks.{i}.img_attn.qkv.{end}", p, (1, 1, 1))
                out[f"transformer_blocks.{i}.attn.add_{x}_proj.{end}"] = (
                    f"double_blocks.{i}.txt_attn.qkv.{end}", p, (1, 1, 1))
        for i in range(SINGLE_BLOCKS):
            units = (1, 1, 1, MLP_RATIO)
            for p, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
                out[f"single_transformer_blocks.{i}.{name}.{end}"] = (
                    f"single_blocks.{i}.linear1.{end}", p, units)
    return out


FUSED = _fused()
SWAPPED = {f"norm_out.linear.{end}": f"final_layer.adaLN_modulation.1.{end}"
           for end in ("weight", "bias")}
