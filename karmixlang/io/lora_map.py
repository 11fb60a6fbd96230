"""Which checkpoint key each LoRA module changes, from names and shapes only (docs/lora.md).

Both sides are brought to one form, (component, name with `.` turned into `_`): a module
`lora_unet_input_blocks_4_1_proj_in` and a key `model.diffusion_model.input_blocks.4.1.proj_in
.weight` both become ("unet", "input_blocks_4_1_proj_in"). kohya's names are the single-file
names with `.`→`_`, so building this form of every key of the other operands and looking each
module up is exact; PEFT/diffusers names written in the checkpoint's own naming (a ComfyUI
Flux LoRA: `diffusion_model.double_blocks.0.img_attn.qkv`) map the same way. Two keys with one
form are ambiguous and match nothing.

Modules named in a component's own naming — diffusers' UNet and Flux transformer, the Hugging
Face names of SDXL's OpenCLIP encoder (kohya's `lora_te2_`), kohya's SD1.x UNet — are found
through the name tables of io/layouts: each key's foreign names, in the same `_`-joined form,
with the rows of a fused key (q, k, v of `in_proj_weight` or of Flux's `qkv`/`linear1`) that
each one fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from karmixlang.io.layouts import PREFIX, Naming, detect, flux, pieces, sd
from karmixlang.io.lora import LoraFile, Module

# The prefix of a checkpoint key -> its component. The empty prefix last: a Flux transformer
# published by BFL has none.
KEY_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("conditioner.embedders.0.transformer.", "te1"),  # SDXL CLIP-L
    ("cond_stage_model.transformer.", "te1"),  # SD1.x CLIP-L
    ("text_encoders.clip_l.transformer.", "te1"),  # Flux (ComfyUI) CLIP-L
    ("text_encoders.t5xxl.transformer.", "te3"),  # Flux (ComfyUI) T5
    ("", "unet"),
)
# The prefix of a module name -> its component; `_` separates kohya's, `.` dotted ones.
MODULE_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("base_model.model.", "unet"), ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"), ("unet.", "unet"), ("transformer.", "unet"),
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
)


@dataclass(frozen=True)
class Match:
    module: Module
    key: str
    rows: tuple[int, int] | None = None  # a row slice of a fused key (None: the whole key)


@dataclass
class Mapping:
    matches: list[Match]
    unmatched: list[Module]
    misfits: list[tuple[Module, str, str]]  # (module, key, why its shape does not fit)

    def by_key(self) -> dict[str, list[Match]]:
        out: dict[str, list[Match]] = {}
        for m in self.matches:
            out.setdefault(m.key, []).append(m)
        return out


def key_form(key: str) -> tuple[str, str, str] | None:
    """(component, `_`-joined name, "weight"|"bias") of a checkpoint key, or None."""
    for suffix in ("weight", "bias"):
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1]
            break
    else:
        return None
    for prefix, comp in KEY_PREFIXES:
        if stem.startswith(prefix):
            return comp, stem[len(prefix):].replace(".", "_"), suffix
    return None


def module_form(name: str) -> tuple[str, str]:
    """(component, `_`-joined name) of a module name."""
    for prefix, comp in MODULE_PREFIXES:
        if name.startswith(prefix):
            return comp, name[len(prefix):].replace(".", "_")
    return "unet", name.replace(".", "_")


def index(keys) -> dict[tuple[str, str, str], str | None]:
    """Every key by its form; None where two keys share one (ambiguous)."""
    out: dict[tuple[str, str, str], str | None] = {}
    for k in keys:
        form = key_form(k)
        if form is not None:
            out[form] = None if form in out and out[form] != k else k
    return out


def fits(m: Module, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> str | None:
    """Why the module's change does not fit a key of `shape` (None: it fits)."""
    want_rows = rows[1] - rows[0] if rows else (shape[0] if shape else 1)
    want_cols = math.prod(shape[1:]) if m.target == "weight" else 1
    if m.target == "bias" and len(shape) != 1:
        return f"a bias diff onto a key of shape {list(shape)}"
    if (m.rows, m.cols) != (want_rows, want_cols):
        return f"it changes {m.rows}×{m.cols}, the key is {list(shape)}"
    return None


# Foreign namings by architecture: (component of a module, naming, canonical prefix part)
_FOREIGN = {
    "sd1": (("unet", Naming("sd1", "component", "unet", "diffusers"), "unet"),),
    "sdxl": (("unet", Naming("sdxl", "component", "unet", "diffusers"), "unet"),
             ("te2", Naming("sdxl", "component", "clip_g", "hf"), "clip_g")),
    "flux": (("unet", Naming("flux", "component", "unet", "diffusers"), "unet"),),
}


@lru_cache(maxsize=1)
def _flux_fused() -> dict[str, list[str]]:
    """Flux's fused keys -> the diffusers names of their parts."""
    out: dict[str, list[str]] = {}
    for name, (canon, _, _) in flux.FUSED.items():
        out.setdefault(canon, []).append(name)
    return out


def _foreign_names(arch: str, comp: str, stem: str) -> list[str]:
    """The names a canonical key (without its prefix) has in the component's foreign naming
    (several for a fused key)."""
    if arch == "flux":
        back = flux.TRANSFORMER.backward(stem)
        return _flux_fused().get(stem, []) + ([back] if back else [])
    if comp == "clip_g":
        head, _, tail = stem.rpartition(".in_proj_")
        if tail and head.startswith("transformer.resblocks."):
            layer = head.split(".")[2]
            return [f"text_model.encoder.layers.{layer}.self_attn.{x}_proj.{tail}"
                    for x in "qkv"]
        back = sd.CLIP_G.backward(stem)
        return [back] if back else []
    back = sd.UNET[arch].backward(stem)
    return [back] if back else []


def foreign_index(shapes: dict[str, tuple[int, ...]]) -> dict[tuple, tuple[str, tuple | None]]:
    """(component, `_`-joined foreign name, target) -> (key, rows or None), for every key of
    `shapes` that a foreign naming of its architecture names."""
    arch = detect(shapes).arch
    out: dict[tuple, tuple[str, tuple | None]] = {}
    for comp, naming, part in _FOREIGN.get(arch, ()):
        prefix = PREFIX[arch][part]
        for key, shape in shapes.items():
            stem = key[len(prefix):] if key.startswith(prefix) else \
                key if arch == "flux" and part == "unet" else None
            if stem is None:
                continue
            for name in _foreign_names(arch, part, stem):
                found = pieces(naming, name, arch)
                if not found or found[0].key != prefix + stem or found[0].transpose:
                    continue
                piece = found[0]
                try:
                    rows = piece.rows(shape[0]) if piece.units != (1,) else None
                except ValueError:  # rows that do not split: its modules cannot fit
                    continue
                for suffix in ("weight", "bias"):
                    if name.endswith("." + suffix):
                        form = (comp, name[: -len(suffix) - 1].replace(".", "_"), suffix)
                        out[form] = (key, rows)
    return out


def map_modules(lora: LoraFile, shapes: dict[str, tuple[int, ...]]) -> Mapping:
    """Each module of `lora` onto a key of `shapes` (key -> shape: the other operands')."""
    idx = index(shapes)
    foreign = None  # built only when some module is not in the checkpoint's own naming
    mapping = Mapping([], [], [])
    for m in lora.modules:
        comp, name = module_form(m.name)
        key, rows = idx.get((comp, name, m.target)), None
        if key is None:
            foreign = foreign_index(shapes) if foreign is None else foreign
            key, rows = foreign.get((comp, name, m.target), (None, None))
        if key is None:
            mapping.unmatched.append(m)
            continue
        why = fits(m, shapes[key], rows)
        if why is not None:
            mapping.misfits.append((m, key, why))
        else:
            mapping.matches.append(Match(m, key, rows))
    return mapping


def guess_arch(lora: LoraFile) -> str:
    """The model family a LoRA's module names suggest (shown in the plan)."""
    names = [module_form(m.name) for m in lora.modules]
    if any(n.startswith(("double_blocks", "single_blocks")) for _, n in names):
        return "flux"
    if any(c == "te2" for c, _ in names) or \
            any(n.startswith(("input_blocks", "output_blocks", "middle_block")) for _, n in names):
        return "sdxl"
    if any(n.startswith(("down_blocks", "up_blocks", "mid_block")) for _, n in names):
        return "sd1"
    return "unknown"


# Extraction: the kohya module names of a checkpoint key (the reverse of the mapping above).
KOHYA_PREFIXES = (
    ("model.diffusion_model.", "lora_unet_"),
    ("conditioner.embedders.0.transformer.", "lora_te1_"),
    ("cond_stage_model.transformer.", "lora_te_"),
    ("text_encoders.clip_l.transformer.", "lora_te1_"),
    ("text_encoders.t5xxl.transformer.", "lora_te3_"),
)
_CLIP_G = PREFIX["sdxl"]["clip_g"]
_FLUX_BARE = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.",
              "vector_in.", "guidance_in.", "final_layer.")


def kohya_modules(key: str, arch: str = "unknown") -> list[tuple[str, int, int]] | None:
    """The kohya modules a LoRA holding `key`'s change has: (name, part, parts) each — a
    fused OpenCLIP in_proj_weight is three modules, its q, k and v thirds — or None when
    kohya has no name for the key (a VAE, a bias, an unknown model). kohya names an SD1.x
    UNet in diffusers' names (sd-scripts loads it from diffusers), SDXL's in its own."""
    if key.startswith(_CLIP_G):
        stem = key[len(_CLIP_G):]
        names = _foreign_names("sdxl", "clip_g", stem)
        if not names or not all(n.endswith(".weight") for n in names):
            return None
        return [("lora_te2_" + n[: -len(".weight")].replace(".", "_"), i, len(names))
                for i, n in enumerate(names)]
    if not key.endswith(".weight"):
        return None
    stem = key[: -len(".weight")]
    unet = KOHYA_PREFIXES[0][0]
    if arch == "sd1" and stem.startswith(unet):
        name = sd.UNET["sd1"].backward(key[len(unet):])  # with `.weight`: inner tables need it
        return None if name is None else \
            [("lora_unet_" + name[: -len(".weight")].replace(".", "_"), 0, 1)]
    for prefix, lora in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return [(lora + stem[len(prefix):].replace(".", "_"), 0, 1)]
    if stem.startswith(_FLUX_BARE):  # a Flux transformer as BFL publishes it
        return [("lora_unet_" + stem.replace(".", "_"), 0, 1)]
    return None
