"""Which architecture and naming a checkpoint's keys are in, from key names (and one shape: the
VAE's latent channels tell a Flux VAE from an SD one)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# `vae.` (Flux's VAE in ComfyUI files) is too common a prefix to say "Flux" on its own
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                        "conditioner.embedders.", "text_encoders.")
_FITS = {"sd": ("sd1", "sdxl"), "any": ("sd1", "sdxl", "flux")}
_COMPONENT_TEXT = {"unet": "UNet", "vae": "VAE", "clip_l": "CLIP-L text encoder",
                   "clip_g": "OpenCLIP-G text encoder", "t5": "T5 text encoder"}
_ARCH_TEXT = {"sd1": "SD1.x", "sdxl": "SDXL", "flux": "Flux", "sd2": "SD2.x",
              "sd": "SD1.x/SDXL"}
FLUX_LATENT_CHANNELS = 16


@dataclass(frozen=True)
class Naming:
    """arch: "sd1", "sdxl", "flux", "sd2"; "sd" (an SD VAE: fits sd1 and sdxl), "any" (a
    CLIP-L: fits all three) or "unknown". style: "single-file" (prefixed names, whole or
    partial) or "component" (one component without prefix). form: how a component is named:
    "ldm", "bfl", "openclip", "hf" (the canonical names without prefix), or "diffusers" (and
    "hf" for SDXL's second text encoder, whose q/k/v OpenCLIP fuses)."""

    arch: str
    style: str
    component: str | None = None
    form: str | None = None

    def fits(self, arch: str) -> bool:
        return self.arch == arch or arch in _FITS.get(self.arch, ())

    @property
    def known(self) -> bool:
        return self.arch != "unknown"

    def describe(self) -> str:
        if self.style == "single-file":
            return f"{_ARCH_TEXT.get(self.arch, self.arch)} single-file"
        if not self.known:
            return "unrecognised naming"
        arch = _ARCH_TEXT.get(self.arch)
        what = f"{self.form} {_COMPONENT_TEXT[self.component]}"
        return f"{what} ({arch})" if arch else what


UNKNOWN = Naming("unknown", "unknown")


def detect(shapes: Mapping[str, tuple[int, ...]]) -> Naming:
    """The naming of a checkpoint from its keys (and their shapes)."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(SINGLE_FILE_PREFIXES):
        return Naming(_single_file_arch(has), "single-file")
    if has("double_blocks."):
        return Naming("flux", "component", "unet", "bfl")
    if has("single_transformer_blocks.") or "x_embedder.weight" in keys:
        return Naming("flux", "component", "unet", "diffusers")
    if has("input_blocks."):
        return Naming("sdxl" if has("label_emb.") else "sd1", "component", "unet", "ldm")
    if has("down_blocks.") and has("mid_block."):
        return Naming("sdxl" if has("add_embedding.") else "sd1", "component", "unet",
                      "diffusers")
    for form, probe in (("ldm", "decoder.up."), ("diffusers", "decoder.up_blocks.")):
        if has(probe) or has(probe.replace("decoder.up", "encoder.down")):
            conv_in = shapes.get("decoder.conv_in.weight", ())
            flux_vae = len(conv_in) > 1 and conv_in[1] == FLUX_LATENT_CHANNELS
            return Naming("flux" if flux_vae else "sd", "component", "vae", form)
    if has("text_model.encoder.layers."):
        if "text_projection.weight" in keys:
            return Naming("sdxl", "component", "clip_g", "hf")
        return Naming("any", "component", "clip_l", "hf")
    if has("transformer.resblocks."):
        return Naming("sdxl", "component", "clip_g", "openclip")
    if has("encoder.block.") and "shared.weight" in keys:
        return Naming("flux", "component", "t5", "hf")
    return UNKNOWN


def _single_file_arch(has) -> str:
    if has("model.diffusion_model.double_blocks.") or has("text_encoders."):
        return "flux"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("model.diffusion_model.label_emb.") or has("conditioner."):
        return "sdxl"
    if has("model.diffusion_model.input_blocks.") or has("cond_stage_model.transformer."):
        return "sd1"
    return "sd" if has("first_stage_model.") else "unknown"
