"""Checkpoint namings: which architecture and naming an input's keys are in, and where each of
its keys goes in the canonical layout (docs/layouts.md).

Canonical names are the single-file names of ../shared/data/layouts and karmixlang/data: SD1.x
LDM (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`), SDXL SGM
(`conditioner.embedders.0.transformer.`, `conditioner.embedders.1.model.`) and Flux as ComfyUI
saves it (`model.diffusion_model.`, `vae.`, `text_encoders.clip_l.transformer.`,
`text_encoders.t5xxl.transformer.`). Torch-free: names and shapes only.

`pieces(naming, key, arch)` says where a stored key of a recognised naming goes: one or more
`Piece`s, each a canonical key and the rows of it the stored tensor fills. The view that reads
an input in the canonical naming is built from them (io/views.py); LoRA module mapping uses
them too (a LoRA on diffusers `to_q` targets rows [0, n/3) of a fused `qkv` key).
"""

from __future__ import annotations

from dataclasses import dataclass

from karmixlang.io.layouts import flux, sd
from karmixlang.io.layouts.detect import Naming, detect

__all__ = ["Naming", "Piece", "PREFIX", "detect", "pieces", "canonical_name"]

# per architecture, the single-file prefix of each component
PREFIX: dict[str, dict[str, str]] = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "clip_l": "cond_stage_model.transformer."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "clip_l": "conditioner.embedders.0.transformer.",
             "clip_g": "conditioner.embedders.1.model."},
    "flux": {"unet": "model.diffusion_model.", "vae": "vae.",
             "clip_l": "text_encoders.clip_l.transformer.",
             "t5": "text_encoders.t5xxl.transformer."},
}


@dataclass(frozen=True)
class Piece:
    """Where one stored tensor goes: canonical `key`, as part `part` of the parts concatenated
    along dim 0, whose relative row counts are `units`; `transpose`: stored as the 2-D
    transpose; `conv`: stored as a Linear [o, i] for a 1x1 conv [o, i, 1, 1]; `src`: only the
    `src[0]`-th of `src[1]` equal row blocks of the stored tensor (the Flux norm_out swap)."""

    key: str
    part: int = 0
    units: tuple[int, ...] = (1,)
    transpose: bool = False
    conv: bool = False
    src: tuple[int, int] | None = None

    def rows(self, n: int) -> tuple[int, int]:
        """The row range [start, stop) of this part in a canonical tensor of `n` rows."""
        unit, rest = divmod(n, sum(self.units))
        if rest:
            raise ValueError(f"{n} rows do not split as {self.units}")
        return unit * sum(self.units[:self.part]), unit * sum(self.units[:self.part + 1])


def _component_pieces(naming: Naming, key: str) -> tuple[Piece, ...] | None:
    """Pieces of a key of one component, named without its single-file prefix."""
    form, comp = naming.form, naming.component
    if form in ("ldm", "bfl", "openclip") or (form == "hf" and comp in ("clip_l", "t5")):
        return (Piece(key),)  # the canonical names, without the prefix
    if comp == "unet" and naming.arch == "flux":
        return _flux(key)
    if comp == "unet":
        name = sd.UNET[naming.arch].forward(key)
        return None if name is None else (Piece(name),)
    if comp == "vae":
        name = sd.VAE.forward(key)
        if name is None:
            return None
        return (Piece(name, conv=".mid.attn_1." in name
                      and name.endswith(sd.VAE_LINEAR_ATTENTION)),)
    if comp == "clip_g":
        return _clip_g(key)
    return None


def _flux(key: str) -> tuple[Piece, ...] | None:
    if key in flux.FUSED:
        name, part, units = flux.FUSED[key]
        return (Piece(name, part, units),)
    if key in flux.SWAPPED:  # (scale, shift) stored, (shift, scale) canonical
        name = flux.SWAPPED[key]
        return (Piece(name, 0, (1, 1), src=(1, 2)), Piece(name, 1, (1, 1), src=(0, 2)))
    name = flux.TRANSFORMER.forward(key)
    return None if name is None else (Piece(name),)


def _clip_g(key: str) -> tuple[Piece, ...] | None:
    if key == "text_projection.weight":
        return (Piece("text_projection", transpose=True),)
    head, _, tail = key.rpartition(".")
    for part, x in enumerate("qkv"):
        if head.endswith(f".self_attn.{x}_proj") and head.startswith("text_model.encoder.layers."):
            layer = head.split(".")[3]
            return (Piece(f"transformer.resblocks.{layer}.attn.in_proj_{tail}", part, (1, 1, 1)),)
    if key.endswith("position_ids"):
        return None  # OpenCLIP has no such buffer
    name = sd.CLIP_G.forward(key)
    return None if name is None else (Piece(name),)


def pieces(naming: Naming, key: str, arch: str) -> tuple[Piece, ...] | None:
    """Where stored `key` of an input in `naming` goes in `arch`'s single-file layout; None
    when it has no place there (a buffer the canonical layout lacks)."""
    if naming.style == "single-file":
        return (Piece(key),)
    prefix = PREFIX.get(arch, {}).get(naming.component)
    found = None if prefix is None else _component_pieces(naming, key)
    if found is None:
        return None
    return tuple(Piece(prefix + p.key, p.part, p.units, p.transpose, p.conv, p.src)
                 for p in found)


def canonical_name(naming: Naming, key: str, arch: str) -> str | None:
    """The canonical key a stored key goes to (whole or in part), or None."""
    found = pieces(naming, key, arch)
    return None if found is None else found[0].key
