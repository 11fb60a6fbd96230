"""Block layouts for MBW (`blocks("sdxl", ...)`, `blocks("sd1", ...)`, `blocks("flux", ...)`): the
slot names and which tensor keys each slot covers. Shared by the checker (slot names), the plan (slot per key) and
the runtime (the weight of a key). docs/blocks.md documents the same rules.
"""

from __future__ import annotations

import re

SLOTS: dict[str, tuple[str, ...]] = {
    "sd1": ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(12)),
    "sdxl": ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(9)),
    # supermerger's Flux slots: the text encoders, the input embeddings, 19 double and 38
    # single transformer blocks, the final layer (61 in all)
    "flux": ("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(19))
    + tuple(f"S{i:02d}" for i in range(38)) + ("OUT",),
}
OPTIONAL_SLOTS: dict[str, tuple[str, ...]] = {"sd1": (), "sdxl": ("VAE",), "flux": ()}

# UNet prefixes of the two layouts (LDM/SGM key names).
_UNET = "model.diffusion_model."
_TEXT = ("cond_stage_model.", "conditioner.")
_VAE = "first_stage_model."
_IN = re.compile(r"input_blocks\.(\d+)\.")
_OUT = re.compile(r"output_blocks\.(\d+)\.")
_FLUX_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.")
_FLUX_IN = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")


def slot_of(arch: str, key: str) -> str | None:
    """The slot a key belongs to, or None when the key is outside the block layout.

    Rules (the supermerger convention): text encoders -> BASE; `time_embed` and `label_emb`
    (SDXL's class embedding) -> BASE, as they condition every block; the UNet's first conv
    `input_blocks.0` -> IN00; `middle_block` -> M00; `output_blocks.N` -> OUTNN; the final
    `out.` norm/conv -> the last OUT slot; VAE -> VAE for SDXL when given, else None (the key
    keeps the default weight); anything else -> None. Flux: `_flux_slot`.
    """
    if arch == "flux":
        return _flux_slot(key)
    if key.startswith(_TEXT):
        return "BASE"
    if key.startswith(_VAE):
        return "VAE" if arch == "sdxl" else None
    if not key.startswith(_UNET):
        return None
    rest = key[len(_UNET):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "BASE"
    if m := _IN.match(rest):
        return f"IN{int(m.group(1)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    if m := _OUT.match(rest):
        return f"OUT{int(m.group(1)):02d}"
    if rest.startswith("out."):
        return SLOTS[arch][-1]
    return None


def _flux_slot(key: str) -> str | None:
    """Flux (BFL names, with or without `model.diffusion_model.`): CLIP-L -> CLIP, T5 -> T5;
    the input embeddings (img_in, txt_in, time_in, vector_in, guidance_in) -> IN;
    double_blocks.N -> DNN; single_blocks.N -> SNN; final_layer -> OUT; the VAE and anything
    else -> None (supermerger leaves the VAE out of block merging)."""
    if key.startswith("text_encoders.clip_l."):
        return "CLIP"
    if key.startswith("text_encoders.t5xxl."):
        return "T5"
    rest = key[len(_UNET):] if key.startswith(_UNET) else key
    if m := _FLUX_BLOCK.match(rest):
        return f"{m.group(1)[0].upper()}{int(m.group(2)):02d}"
    if rest.startswith(_FLUX_IN):
        return "IN"
    if rest.startswith("final_layer."):
        return "OUT"
    return None


def all_slots(arch: str) -> tuple[str, ...]:
    return SLOTS[arch] + OPTIONAL_SLOTS[arch]
