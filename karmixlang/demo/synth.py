"""Realistic synthetic checkpoints for the demo, the tests and the benchmarks.

No model weights can be downloaded where kmx is developed and tested, so this module builds
checkpoints with the real key names, dtypes and (optionally reduced) shapes of SD1.5, SDXL and
Flux from the layouts shipped in karmixlang/data/. The values are random, but a pool has the
structure that merge methods look for: fine-tunes of one base share a cluster direction (a
mostly low-rank change, as training makes) on top of their own smaller changes. Integer and
bool buffers, scheduler tables and scalars are identical in every model, as in real
fine-tunes, so a merge has to copy them rather than compute them.

numpy and safetensors.numpy only: torch is imported under runtime/ alone (architecture.md).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

LAYOUT_FILES = {"sd1": "sd1-ldm.json.gz", "sdxl": "sdxl-sgm.json.gz", "flux": "flux-flux.json.gz"}

# Dimensions up to this size are structure, not width: kernel sizes (1, 3), latent channels
# (4, 8 = mean and log-variance, 16, 32), Flux's 2x2-packed latents (64), T5's 32 position
# buckets and 64 heads. Scaling them saves nothing and would break relations a loader checks,
# such as the VAE's latent channels being the UNet's input channels.
STRUCTURAL_DIM = 64
# Rank of the structured part of a change to a matrix (a conv counts as [out, in*kh*kw]).
LOW_RANK = 4
# Float scalars at the values real checkpoints carry: the EMA decay, and CLIP's learned
# temperature, which fine-tunes leave at log(100). Others (EDM sigmas) get 1.0.
SCALARS = {"decay": 0.9999, "logit_scale": math.log(100.0)}
# Relative sizes of the changes in a demo pool: base-b is a heavily retrained base-a (like a
# derivative of SDXL), each cluster moves one way, and each member adds its own smaller change.
BASE_SHIFT = 0.3
CLUSTER_SHIFT = 0.03
VAE_SHIFT = 0.1


@dataclass(frozen=True)
class KeySpec:
    """One key of a layout: its real shape and dtype (as spelled in the layout, "bfloat16"
    included), its component (diffuser, vae, clip_l, ...) and whether real checkpoints may
    lack it (EMA copies, scheduler tables, position_ids)."""

    shape: tuple[int, ...]
    dtype: str
    component: str
    optional: bool = False


def load_layout(name: str) -> dict[str, KeySpec]:
    """The real layout of "sd1", "sdxl" or "flux", keys in the order of the source checkpoint."""
    return dict(_read_layout(name))  # a copy: callers filter and edit theirs freely


@lru_cache(maxsize=None)
def _read_layout(name: str) -> dict[str, KeySpec]:
    if name not in LAYOUT_FILES:
        raise ValueError(f"unknown layout {name!r}; expected one of: {', '.join(LAYOUT_FILES)}")
    blob = (files("karmixlang") / "data" / LAYOUT_FILES[name]).read_bytes()
    keys = json.loads(gzip.decompress(blob))["keys"]
    return {
        key: KeySpec(tuple(v["shape"]), v["dtype"], v["component"], v.get("optional", False))
        for key, v in keys.items()
    }


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """`shape` with every width scaled by `scale` (0 < scale <= 1; 1 gives the real sizes).

    The new size is a function of the old size alone, so tensors that share a dimension in
    the real model still share it; widths stay >= 1, and structural sizes (<= STRUCTURAL_DIM,
    0 included) are kept."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    return tuple(d if d <= STRUCTURAL_DIM else max(1, round(d * scale)) for d in shape)


def _is_float(spec: KeySpec) -> bool:
    return spec.dtype.startswith(("float", "bfloat"))


def _is_trained(spec: KeySpec) -> bool:
    """Trained tensors differ between models; the rest are buffers that real fine-tunes share
    bit for bit (integer and bool buffers, scheduler tables, scalars)."""
    return _is_float(spec) and spec.component != "scheduler" and len(spec.shape) > 0


def _spread(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a trained tensor: matrices and convs at the usual 1/sqrt(fan_in); a 1-D
    weight or scale is a norm gain (every other weight is a matrix or a conv), near 1;
    biases and embedding vectors near 0."""
    if len(shape) >= 2:
        return 0.0, 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    if name.endswith(("weight", "scale")):
        return 1.0, 0.02
    return 0.0, 0.02


def _rms(name: str, shape: tuple[int, ...]) -> float:
    """The typical magnitude of a trained tensor's elements, which sizes of changes are relative
    to: a norm gain moves by ~delta_scale, not by delta_scale times its small spread (which
    float16 could not even represent next to 1)."""
    return math.hypot(*_spread(name, shape))


def _change(
    rng: np.random.Generator, shape: tuple[int, ...], rms: float, size: float
) -> np.ndarray:
    """A fine-tune's change to one tensor, float32, element std ~ size * rms. A matrix changes
    mostly along LOW_RANK directions, as training makes it, so that medians, sign elections and
    spectrum methods have something to find; a vector changes element by element."""
    if len(shape) < 2:
        return rng.standard_normal(shape, dtype=np.float32) * (size * rms)
    rows, cols = shape[0], math.prod(shape[1:])
    rank = max(1, min(LOW_RANK, rows, cols))
    u = rng.standard_normal((rows, rank), dtype=np.float32)
    v = rng.standard_normal((rank, cols), dtype=np.float32)
    # 0.8^2 + 0.6^2 = 1: unit variance, 64% of it in the low-rank part
    x = (u @ v) * (0.8 / math.sqrt(rank))
    x += rng.standard_normal((rows, cols), dtype=np.float32) * 0.6
    return (x * (size * rms)).reshape(shape)


@lru_cache(maxsize=8)
def _schedule(steps: int) -> dict[str, np.ndarray]:
    """The DDPM tables SD checkpoints carry, for the LDM configs' scaled-linear betas."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    cum = np.cumprod(alphas)
    prev = np.append(1.0, cum[:-1])
    var = betas * (1.0 - prev) / (1.0 - cum)
    return {
        "betas": betas,
        "alphas_cumprod": cum,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cum),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cum),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cum),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cum),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cum - 1.0),
        "posterior_variance": var,
        "posterior_log_variance_clipped": np.log(np.maximum(var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - cum),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - cum),
    }


def _buffer(name: str, spec: KeySpec, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    last = name.rsplit(".", 1)[-1]
    if not _is_float(spec):
        # position_ids are arange(n); the others (the EMA update count, the empty v_pred and
        # ztsnr flags) only have to be exact and shared, which arange is too.
        return np.arange(math.prod(shape)).reshape(shape).astype(spec.dtype)
    if spec.component == "scheduler":
        return _schedule(shape[0])[last].astype(dtype)
    return np.full(shape, SCALARS.get(last, 1.0), dtype=dtype)


def _resolve(layout: str | Mapping[str, KeySpec]) -> Mapping[str, KeySpec]:
    return load_layout(layout) if isinstance(layout, str) else layout


def iter_delta(
    layout: str | Mapping[str, KeySpec],
    scale: float,
    seed: int | Sequence[int],
    delta_scale: float = 0.01,
) -> Iterator[tuple[str, np.ndarray]]:
    """make_delta's (name, tensor) pairs one at a time, in layout order."""
    layout = _resolve(layout)
    rng = np.random.default_rng(seed)
    for name, spec in layout.items():
        if _is_trained(spec):
            shape = scaled_shape(spec.shape, scale)
            yield name, _change(rng, shape, _rms(name, shape), delta_scale)


def make_delta(
    layout: str | Mapping[str, KeySpec],
    scale: float,
    seed: int | Sequence[int],
    delta_scale: float = 0.01,
) -> dict[str, np.ndarray]:
    """A structured float32 change to every trained tensor of `layout`, of relative size
    `delta_scale`: the shared direction of a cluster of fine-tunes (make_model's
    `cluster_direction`)."""
    return dict(iter_delta(layout, scale, seed, delta_scale))


def iter_model(
    layout: str | Mapping[str, KeySpec],
    scale: float,
    seed: int | Sequence[int],
    dtype: str = "float16",
    base: Mapping[str, np.ndarray] | None = None,
    delta_scale: float = 0.01,
    cluster_direction: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """make_model's (name, tensor) pairs one at a time, in layout order: a model larger than
    memory can be written key by key. `base` and `cluster_direction` are read in that order
    too, trained keys only."""
    if np.dtype(dtype).kind != "f":
        raise ValueError(f"dtype must be a numpy float dtype, got {dtype!r}")
    layout = _resolve(layout)
    rng = np.random.default_rng(seed)
    direction = {} if cluster_direction is None else cluster_direction
    for name, spec in layout.items():
        shape = scaled_shape(spec.shape, scale)
        if not _is_trained(spec):
            yield name, _buffer(name, spec, shape, dtype)
            continue
        if base is None:
            mean, std = _spread(name, shape)
            x = rng.standard_normal(shape, dtype=np.float32) * std + mean
        else:
            x = base[name].astype(np.float32) + _change(rng, shape, _rms(name, shape), delta_scale)
            if name in direction:
                x += direction[name]
        yield name, x.astype(dtype, copy=False)


def make_model(
    layout: str | Mapping[str, KeySpec],
    scale: float,
    seed: int | Sequence[int],
    dtype: str = "float16",
    base: Mapping[str, np.ndarray] | None = None,
    delta_scale: float = 0.01,
    cluster_direction: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Every key of `layout` (a name for load_layout, or a KeySpec mapping), optional keys
    included, at scaled_shape(shape, scale); trained tensors in `dtype`; buffers (integer and
    bool buffers, scheduler tables, float scalars) the same in every model, floats in `dtype`.

    Without `base`: a base model (trained tensors drawn around the means and stds of _spread).
    With `base`: a fine-tune of it, base + cluster_direction (from make_delta, shared by the
    members of a cluster) + a change of its own of relative size `delta_scale`.
    Deterministic in `seed` (anything np.random.default_rng takes, e.g. (seed, stream))."""
    return dict(iter_model(layout, scale, seed, dtype, base, delta_scale, cluster_direction))


def _replace_into(path: Path, write: Callable[[str], None]) -> Path:
    """Run `write` on a temporary file next to `path`, then rename it into place, so that a
    reader never sees a half-written file; a killed process leaves at most a *.kmx-partial
    file (git-ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.kmx-partial")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_model(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` to a safetensors file at `path`, atomically; returns the path."""
    # safetensors.numpy copies each array's raw buffer, so a strided view (a transpose) would
    # be written scrambled: make those contiguous first.
    arrays = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    return _replace_into(Path(path), lambda tmp: save_file(arrays, tmp, metadata=meta))


def write_tuned_pool(folder: str | os.PathLike, base: Mapping[str, np.ndarray], n: int,
                     rng: np.random.Generator, scale: float = 0.05) -> None:
    """`base` as folder/base.safetensors and `n` fine-tunes of it as folder/m/000.safetensors
    ...: every float tensor plus scale·N(0, 1) noise, the others as they are."""
    write_model(os.path.join(folder, "base.safetensors"), base)
    os.makedirs(os.path.join(folder, "m"), exist_ok=True)
    for i in range(n):
        tuned = {k: (v + (scale * rng.normal(size=v.shape)).astype(v.dtype)
                     if v.dtype.kind == "f" else v) for k, v in base.items()}
        write_model(os.path.join(folder, "m", f"{i:03d}.safetensors"), tuned)


def _tag(**fields: object) -> dict[str, str]:
    return {"kmx_synthetic": json.dumps(fields, sort_keys=True)}


def write_demo_pool(
    directory: str | os.PathLike,
    arch: str = "sdxl",
    scale: float = 1 / 16,
    n_per_cluster: int = 3,
    seed: int = 0,
) -> dict:
    """Write a merge pool shaped like a real one under `directory`:

    base-a.safetensors, base-b.safetensors   two bases; B is A heavily retrained
    a/a-{i}.safetensors, b/b-{i}.safetensors  n_per_cluster fine-tunes of base-a and of base-b;
                                              each cluster shares one direction
    vae-donor.safetensors                     base-a with another VAE (its "vae" component:
                                              first_stage_model.* for SD, vae.* for Flux)

    Returns {"base_a": Path, "base_b": Path, "a": [Path, ...], "b": [Path, ...],
    "vae_donor": Path}. Files are float16 and identical bytes for identical arguments."""
    layout = load_layout(arch)
    root = Path(directory)

    def save(rel: str, tensors: dict[str, np.ndarray], role: str) -> Path:
        return write_model(root / rel, tensors, _tag(arch=arch, scale=scale, seed=seed, role=role))

    base_a = make_model(layout, scale, (seed, 0))
    base_b = make_model(layout, scale, (seed, 1), base=base_a, delta_scale=BASE_SHIFT)
    paths: dict = {
        "base_a": save("base-a.safetensors", base_a, "base-a"),
        "base_b": save("base-b.safetensors", base_b, "base-b"),
    }
    for c, (cluster, base) in enumerate((("a", base_a), ("b", base_b))):
        direction = make_delta(layout, scale, (seed, 2, c), CLUSTER_SHIFT)
        paths[cluster] = [
            save(
                f"{cluster}/{cluster}-{i}.safetensors",
                make_model(layout, scale, (seed, 3, c, i), base=base, cluster_direction=direction),
                f"{cluster}-{i}",
            )
            for i in range(n_per_cluster)
        ]
    vae = {k: s for k, s in layout.items() if s.component == "vae"}
    donor = base_a | make_model(vae, scale, (seed, 4), base=base_a, delta_scale=VAE_SHIFT)
    paths["vae_donor"] = save("vae-donor.safetensors", donor, "vae-donor")
    return paths


def llm_layout(n_layers: int = 2, hidden: int = 64, vocab: int = 256) -> dict[str, KeySpec]:
    """A LLaMA-like layout in Hugging Face key order, with grouped-query attention (k and v
    at a quarter of the width, as Llama 3) and the SwiGLU width rounded up to a multiple of 8."""
    kv, ffn = max(1, hidden // 4), -(-hidden // 3) * 8  # ffn = ceil(8/3 * hidden / 8) * 8

    def spec(*shape: int) -> KeySpec:
        return KeySpec(shape, "bfloat16", "llm")  # as Llama ships; files use make_model's dtype

    layout = {"model.embed_tokens.weight": spec(vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        layout |= {
            p + "self_attn.q_proj.weight": spec(hidden, hidden),
            p + "self_attn.k_proj.weight": spec(kv, hidden),
            p + "self_attn.v_proj.weight": spec(kv, hidden),
            p + "self_attn.o_proj.weight": spec(hidden, hidden),
            p + "mlp.gate_proj.weight": spec(ffn, hidden),
            p + "mlp.up_proj.weight": spec(ffn, hidden),
            p + "mlp.down_proj.weight": spec(hidden, ffn),
            p + "input_layernorm.weight": spec(hidden),
            p + "post_attention_layernorm.weight": spec(hidden),
        }
    layout["model.norm.weight"] = spec(hidden)
    layout["lm_head.weight"] = spec(vocab, hidden)
    return layout


def _write_sharded(
    directory: Path, tensors: dict[str, np.ndarray], shards: int, meta: dict[str, str]
) -> Path:
    """Hugging Face's sharded form: contiguous runs of keys in model-0000i-of-0000n.safetensors
    files and a model.safetensors.index.json whose weight_map names each key's file."""
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and {len(names)} (the keys), got {shards}")
    cuts = [len(names) * i // shards for i in range(shards + 1)]
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[cuts[i] : cuts[i + 1]]
        write_model(directory / file, {k: tensors[k] for k in part}, meta)
        weight_map |= dict.fromkeys(part, file)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    text = json.dumps(index, indent=2) + "\n"
    index_path = directory / "model.safetensors.index.json"
    _replace_into(index_path, lambda tmp: Path(tmp).write_text(text))
    return directory


def write_sharded_llm(
    directory: str | os.PathLike,
    n_layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    shards: int = 2,
    delta: float = 0.01,
    n_finetunes: int = 2,
    vocab: int = 256,
) -> dict:
    """Write a sharded LLaMA-like base in directory/base/ and `n_finetunes` fine-tunes of it
    (sharing one direction, each with its own change of relative size `delta`) in
    directory/ft-{i}/, float16. Returns {"base": Path, "finetunes": [Path, ...]} (folders)."""
    layout = llm_layout(n_layers, hidden, vocab)
    root = Path(directory)

    def meta(role: str) -> dict[str, str]:
        # transformers refuses a safetensors file whose metadata lacks "format": "pt"
        tag = _tag(arch="llama", hidden=hidden, n_layers=n_layers, seed=seed, role=role)
        return {"format": "pt"} | tag

    base = make_model(layout, 1, (seed, 0))
    direction = make_delta(layout, 1, (seed, 1), delta)
    finetunes = []
    for i in range(n_finetunes):
        tuned = make_model(layout, 1, (seed, 2, i), base=base, delta_scale=delta,
                           cluster_direction=direction)
        finetunes.append(_write_sharded(root / f"ft-{i}", tuned, shards, meta(f"ft-{i}")))
    base_dir = _write_sharded(root / "base", base, shards, meta("base"))
    return {"base": base_dir, "finetunes": finetunes}
