"""Small SD1.5-, SDXL- and Flux-layout checkpoints that the built-in re-basin specs fit.

The packaged layouts shrunk by demo.synth.scaled_shape (a width's new size depends on its old
size only, so tensors that share a width still do), except the widths whose shrunk size has
to keep a count the specs rely on: attention inner widths stay whole heads (SD1: 8 heads,
SDXL: width/64, Flux: width/128 — each head only HEAD_DIM wide), and the feed-forward and
text-encoder MLP widths, which nothing else shares, are made small. The GroupNorms' 32 groups
divide every shrunk channel count (320·0.1 = 32: one channel per group at the first level).
VAE and EMA keys are left out: no built-in spec names them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np

from karmixlang.demo.synth import KeySpec, load_layout, make_model, scaled_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "karmixlang" / "data" / "rebasin"

SCALE = 0.1
HEAD_DIM = 2
FF = 12  # feed-forward / MLP hidden units
HEADS = {
    "sd1": lambda width: 8,
    "sdxl": lambda width: width // 64,
    "flux": lambda width: width // 128,
}

_QKV = re.compile(r"attn[12]\.to_[qkv]\.weight$")
_MLP_UP = re.compile(r"(mlp\.(fc1|c_fc)|ff\.net\.0\.proj|DenseReluDense\.wi_[01]|_mlp\.0|mlp\.(gate|up)_proj)\.(weight|bias)$")
_MLP_DOWN = re.compile(r"(mlp\.(fc2|c_proj)|ff\.net\.2|DenseReluDense\.wo|_mlp\.2|mlp\.down_proj)\.weight$")


def _shape(name: str, key: str, real: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(scaled_shape(real, SCALE))
    heads = HEADS[name]
    if _QKV.search(key):
        shape[0] = heads(real[0]) * HEAD_DIM
    elif re.search(r"attn[12]\.to_out\.0\.weight$", key):
        shape[1] = heads(real[1]) * HEAD_DIM
    elif key.endswith("ff.net.0.proj.weight") or key.endswith("ff.net.0.proj.bias"):
        shape[0] = 2 * FF  # GEGLU: value and gate halves
    elif _MLP_UP.search(key):
        shape[0] = FF
    elif _MLP_DOWN.search(key):
        shape[1] = FF
    return tuple(shape)


def _flux_shape(key: str, real: tuple[int, ...]) -> tuple[int, ...]:
    """Flux: the width 3072 is 24 heads; shrunk to 24 heads of HEAD_DIM, so the fused qkv and
    linear1/linear2 keep their q | k | v | mlp layout."""
    width, mlp = 24 * HEAD_DIM, FF
    sizes = {3072: width, 9216: 3 * width, 12288: mlp, 21504: 3 * width + mlp,
             15360: width + mlp, 18432: 6 * width, 6144: 2 * width, 128: HEAD_DIM}
    if key.startswith("model.diffusion_model."):
        return tuple(sizes.get(d, s) for d, s in zip(real, scaled_shape(real, SCALE)))
    return _shape("flux", key, real)


def layout(name: str) -> dict[str, KeySpec]:
    """The shrunk layout of "sd1", "sdxl" or "flux" (shapes as they will be written)."""
    out = {}
    for key, spec in load_layout(name).items():
        if spec.component in ("vae", "ema") or key.startswith(("first_stage_model.", "model_ema.", "vae.")):
            continue
        shape = _flux_shape(key, spec.shape) if name == "flux" else _shape(name, key, spec.shape)
        out[key] = replace(spec, shape=shape)
    return out


@lru_cache(maxsize=4)
def model(name: str, seed: int = 0) -> Mapping[str, np.ndarray]:
    """A float32 checkpoint of the shrunk layout (random values, real key names), read-only:
    it is shared between tests."""
    out = make_model(layout(name), 1.0, seed, dtype="float32")
    for x in out.values():
        x.flags.writeable = False
    return MappingProxyType(out)


@lru_cache(maxsize=4)
def spec(name: str) -> dict:
    """The built-in spec of `name` made by tools/make_rebasin_specs.py for the shrunk layout
    (the same code as the packaged file; only the sizes in it — GEGLU and fused ranges, head
    counts — are the shrunk model's)."""
    import make_rebasin_specs as make

    heads = (lambda width: 8) if name == "sd1" else (lambda width: width // HEAD_DIM)
    shapes = {k: v.shape for k, v in layout(name).items()}
    return make.SPECS[name](shapes, heads).to_json()
