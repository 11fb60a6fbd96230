"""Small SDXL-layout checkpoints for the version-control tests (kmx diff, re-merge): a few
keys of every block of the real layout, shrunk, so block-wise edits touch real key names."""

from __future__ import annotations

import os

from karmixlang.blocks import slot_of
from karmixlang.demo.synth import load_layout, make_model, write_model


def small_layout(per_slot: int = 3) -> dict:
    """The first `per_slot` float keys of each SDXL block, plus a few keys outside them."""
    counts: dict[str | None, int] = {}
    out = {}
    for key, spec in load_layout("sdxl").items():
        if not spec.dtype.startswith("float") or spec.optional:
            continue
        slot = slot_of("sdxl", key)
        if counts.get(slot, 0) < per_slot:
            counts[slot] = counts.get(slot, 0) + 1
            out[key] = spec
    return out


def write_sdxl_models(folder, names=("base", "a", "b"), per_slot: int = 3) -> dict:
    """`names` as fp16 SDXL-layout checkpoints in `folder`; returns their arrays."""
    layout = small_layout(per_slot)
    base = make_model(layout, 1 / 64, seed=0)
    models = {}
    for i, name in enumerate(names):
        arrays = base if i == 0 else make_model(layout, 1 / 64, seed=i, base=base)
        write_model(os.path.join(folder, f"{name}.safetensors"), arrays)
        models[name] = arrays
    return models
