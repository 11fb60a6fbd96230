"""Block layouts for MBW (`blocks("sdxl", ...)`, `blocks("sd1", ...)`): the slot names and which
tensor keys each slot covers. Shared by the checker (slot names), the plan (slot per key) and
the runtime (the weight of a key). docs/blocks.md documents the same rules.
"""

from __future__ import annotations

import re

SLOTS: dict[str, tuple[str, ...]] = {
    "sd1": ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(12)),
    "sdxl": ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",)
    + tuple(f"OUT{i:02d}" for i in range(9)),
}
OPTIONAL_SLOTS: dict[str, tuple[str, ...]] = {"sd1": (), "sdxl": ("VAE",)}

# UNet prefixes of the two layouts (LDM/SGM key names).
_UNET = "model.diffusion_model."
_TEXT = ("cond_stage_model.", "conditioner.")
_VAE = "first_stage_model."
_IN = re.compile(r"input_blocks\.(\d+)\.")
_OUT = re.compile(r"output_blocks\.(\d+)\.")


def slot_of(arch: str, key: str) -> str | None:
    """The slot a key belongs to, or None when the key is outside the block layout.

    Rules (the supermerger convention): text encoders -> BASE; `time_embed` and `label_emb`
    (SDXL's class embedding) -> BASE, as they condition every block; the UNet's first conv
    `input_blocks.0` -> IN00; `middle_block` -> M00; `output_blocks.N` -> OUTNN; the final
    `out.` norm/conv -> the last OUT slot; VAE -> VAE for SDXL when given, else None (the key
    keeps the default weight); anything else -> None.
    """
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


def all_slots(arch: str) -> tuple[str, ...]:
    return SLOTS[arch] + OPTIONAL_SLOTS[arch]
