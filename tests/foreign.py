"""Test helper: a canonical (single-file) checkpoint rewritten in another naming — diffusers
UNet/VAE/Flux transformer, HF CLIP — by splitting, transposing and reshaping its arrays, so
tests can read it back through kmx's views and compare with the canonical arrays."""

from __future__ import annotations

import numpy as np

from karmixlang.io.layouts import PREFIX, flux, sd

_FLUX_FUSED = {}
for _name, (_key, _part, _units) in flux.FUSED.items():
    _FLUX_FUSED.setdefault(_key, [None] * len(_units))[_part] = (_name, _units)


def _rows(n: int, units, part: int) -> slice:
    unit = n // sum(units)
    return slice(unit * sum(units[:part]), unit * sum(units[:part + 1]))


def component_names(bare: str, component: str, form: str, arch: str, shape) -> dict:
    """foreign key -> function(canonical array) -> foreign array, for one canonical bare key."""
    if component == "unet" and arch == "flux" and form == "diffusers":
        if bare in _FLUX_FUSED:
            return {n: (lambda a, u=u, p=p: a[_rows(a.shape[0], u, p)])
                    for p, (n, u) in enumerate(_FLUX_FUSED[bare])}
        for name, key in flux.SWAPPED.items():
            if key == bare:  # stored (scale, shift), canonical (shift, scale)
                return {name: lambda a: np.concatenate(np.split(a, 2)[::-1])}
        return {flux.TRANSFORMER.backward(bare): lambda a: a}
    if component == "unet" and form == "diffusers":
        return {sd.UNET[arch].backward(bare): lambda a: a}
    if component == "vae" and form == "diffusers":
        name = sd.VAE.backward(bare)
        if len(shape) == 4 and ".mid.attn_1." in bare:
            return {name: lambda a: a.reshape(a.shape[:2])}
        return {name: lambda a: a}
    if component == "clip_g" and form == "hf":
        if bare == "text_projection":
            return {"text_projection.weight": lambda a: np.ascontiguousarray(a.T)}
        if ".attn.in_proj_" in bare:
            layer, end = bare.split(".")[2], bare.rsplit("_", 1)[1]
            return {f"text_model.encoder.layers.{layer}.self_attn.{x}_proj.{end}":
                    (lambda a, p=p: a[_rows(a.shape[0], (1, 1, 1), p)])
                    for p, x in enumerate("qkv")}
        if bare == "logit_scale":
            return {}
        return {sd.CLIP_G.backward(bare): lambda a: a}
    return {bare: lambda a: a}


def component(arrays: dict, arch: str, comp: str, form: str) -> dict:
    """The `comp` keys of a canonical checkpoint of `arch`, as a component file in `form`."""
    prefix = PREFIX[arch][comp]
    out = {}
    for key, a in arrays.items():
        if key.startswith(prefix):
            for name, make in component_names(key[len(prefix):], comp, form, arch,
                                              a.shape).items():
                out[name] = np.ascontiguousarray(make(a))
    return out
