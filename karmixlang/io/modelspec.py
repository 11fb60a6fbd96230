"""`modelspec.*` metadata: the Stability AI Model Metadata Standard ("SAI Model Spec", 1.0.0)
that kohya sd-scripts, ComfyUI and A1111/Civitai tools read from a safetensors header.

What kmx writes (docs/plan-format.md, "modelspec.* metadata"):
- `sai_model_spec`, `architecture`, `implementation`, `resolution` (the spec's MUST fields) only
  when the output's keys are a model kmx recognises (io/layouts/detect.py): an SD1.x, SDXL or
  Flux checkpoint, or its UNet/transformer alone; a spec marker with a guessed architecture
  would make a loader pick the wrong code;
- `title`, `hash_sha256`, and `merged_from` / `date` when known, on every output.

`hash_sha256` is "0x" and the SHA-256 of the tensor data after the header (the spec's "all
tensor content, excluding the header"; the same digest as AutoV3 in full). It is planned as a
fixed-length placeholder and filled in per file once the data is written, so no offset moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from karmixlang.io.layouts.detect import detect

PREFIX = "modelspec."
SPEC_VERSION = "1.0.0"  # 1.0.1 only adds `preprocessor` (ControlNets), which kmx never writes
HASH_FIELD = PREFIX + "hash_sha256"
HASH_DIGITS = 64
HASH_PLACEHOLDER = "0x" + "0" * HASH_DIGITS
SGM = "sgm"  # the spec's own example for SD checkpoints; what ComfyUI writes
BFL = "https://github.com/black-forest-labs/flux"  # what kohya sd-scripts writes for Flux


@dataclass(frozen=True)
class Architecture:
    id: str  # modelspec.architecture
    implementation: str
    resolution: str


_FAMILIES = {"sd1": ("stable-diffusion-v1", "512x512"),
             "sdxl": ("stable-diffusion-xl-v1-base", "1024x1024")}
# A LoRA's implementation: the codebase whose names its kohya modules follow (what kohya
# sd-scripts writes): SD1.x module names are diffusers', SDXL's are SGM's.
_LORA_IMPLEMENTATION = {"sd1": "diffusers",
                        "sdxl": "https://github.com/Stability-AI/generative-models", "flux": BFL}


def architecture(shapes: Mapping[str, tuple[int, ...]]) -> Architecture | None:
    """The model `shapes` (key -> shape) is, when its keys hold a recognised denoiser (the
    UNet or Flux transformer); None otherwise: a VAE or text encoder alone, keys of an unknown
    model."""
    naming = detect(shapes)
    keys = shapes.keys()
    if naming.style == "single-file":
        whole = naming.arch in _FAMILIES and any(
            k.startswith("model.diffusion_model.") for k in keys)
        if not (whole or naming.arch == "flux" and any("double_blocks." in k for k in keys)):
            return None
        implementation = BFL if naming.arch == "flux" else SGM
    elif naming.component == "unet" and naming.arch in ("sd1", "sdxl", "flux"):
        implementation = "diffusers" if naming.form == "diffusers" else \
            BFL if naming.arch == "flux" else SGM
    else:
        return None
    if naming.arch in _FAMILIES:
        arch, resolution = _FAMILIES[naming.arch]
        return Architecture(arch, implementation, resolution)
    # Flux dev is guidance-distilled: only it has the guidance embedder.
    dev = any("guidance_in." in k or "guidance_embedder." in k for k in keys)
    return Architecture("flux-1-dev" if dev else "flux-1-schnell", implementation, "1024x1024")


def lora_architecture(family: str) -> Architecture | None:
    """A LoRA (kohya names) for models of `family` ("sd1", "sdxl", "flux"; io/layouts): the
    spec's `BASE/lora`. A Flux LoRA is filed under dev, what nearly every Flux LoRA is for."""
    if family == "flux":
        return Architecture("flux-1-dev/lora", BFL, "1024x1024")
    if family not in _FAMILIES:
        return None
    arch, resolution = _FAMILIES[family]
    return Architecture(arch + "/lora", _LORA_IMPLEMENTATION[family], resolution)


def fields(arch: Architecture | None, title: str, merged_from: list[str],
           date: str | None) -> dict[str, str]:
    """The modelspec.* fields of an output, with HASH_PLACEHOLDER for its hash; the spec's
    MUST fields only with an architecture."""
    out = {PREFIX + "title": title, HASH_FIELD: HASH_PLACEHOLDER}
    if arch is not None:
        out.update({PREFIX + "sai_model_spec": SPEC_VERSION, PREFIX + "architecture": arch.id,
                    PREFIX + "implementation": arch.implementation,
                    PREFIX + "resolution": arch.resolution})
    if merged_from:
        out[PREFIX + "merged_from"] = ", ".join(merged_from)
    if date:
        out[PREFIX + "date"] = date
    return out


def source_title(metadata: Mapping[str, str], stem: str) -> str:
    """How a merge's `merged_from` names one of its inputs: its own modelspec title, else its
    file name without extension. Commas would split the spec's comma-separated list."""
    return (metadata.get(PREFIX + "title") or stem).replace(",", " ")


def date_from_epoch(value: str) -> str:
    """SOURCE_DATE_EPOCH (seconds since 1970, UTC) as an ISO-8601 date and time; ValueError
    when it is not a whole non-negative number."""
    if not value.isdigit():
        raise ValueError(value)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(value)))


def with_hash(header: bytes, data_sha256: str) -> bytes:
    """`header` (a safetensors header as planned) with its hash placeholder replaced by
    `data_sha256` (hex): the same length, so no offset moves."""
    old, new = _field(HASH_PLACEHOLDER), _field("0x" + data_sha256)
    if len(new) != len(old) or header.count(old) != 1:
        raise ValueError("the header has no modelspec hash placeholder to fill in")
    return header.replace(old, new)


def recorded_hash(header: bytes) -> str | None:
    """The data hash (hex) a safetensors header records in modelspec.hash_sha256, if it holds
    a well-formed one."""
    try:
        value = json.loads(header[8:])["__metadata__"][HASH_FIELD]
    except (ValueError, KeyError, TypeError):
        return None
    digits = value[2:] if isinstance(value, str) and value.startswith("0x") else ""
    ok = len(digits) == HASH_DIGITS and all(c in "0123456789abcdef" for c in digits)
    return digits if ok else None


def _field(value: str) -> bytes:
    # As writer.py lays the header out: compact JSON.
    return json.dumps({HASH_FIELD: value}, separators=(",", ":")).encode()[1:-1]

