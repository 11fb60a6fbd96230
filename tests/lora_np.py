"""An independent numpy oracle for LoRA files (docs/lora.md), and LoRA files written the way
the training tools name them, onto real key names (../shared/data/layouts) with small shapes.
Everything is float64; nothing here imports kmx's runtime."""

from __future__ import annotations

import numpy as np

# Real keys of each family (karmixlang/data layouts) with small shapes of the same rank.
SDXL_KEYS = {
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (8, 6),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (6, 6),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (4, 3, 3, 3),
    "model.diffusion_model.input_blocks.1.0.skip_connection.weight": (4, 3, 1, 1),
    "model.diffusion_model.input_blocks.4.1.norm.weight": (6,),
    "model.diffusion_model.input_blocks.4.1.norm.bias": (6,),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (5, 5),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (7, 5),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (6, 4),
}
SD1_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (6, 6, 1, 1),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (6, 4, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (6, 5),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (5, 5),
}
FLUX_KEYS = {
    "double_blocks.0.img_attn.qkv.weight": (9, 4),
    "double_blocks.0.img_attn.proj.weight": (4, 4),
    "single_blocks.0.linear1.weight": (14, 4),  # q, k, v and a 4× wider MLP: 7 units of 2
    "single_blocks.0.linear1.bias": (14,),
}

# A Flux checkpoint as ComfyUI saves it whole (flux-flux.json): the transformer under
# `model.diffusion_model.`, CLIP-L in Hugging Face names under `text_encoders.clip_l.transformer.`,
# T5-XXL (T5EncoderModel names) under `text_encoders.t5xxl.transformer.`.
FLUX_AIO_KEYS = {
    **{"model.diffusion_model." + k: s for k, s in FLUX_KEYS.items()},
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (5, 5),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (7, 5),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.bias": (7,),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (6, 6),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    ".weight": (4, 3),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10, 6),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight": (6, 10),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.layer_norm.weight": (6,),
}


def base_model(keys: dict, seed: int = 0, prefix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}


def kohya_name(key: str) -> str:
    """The kohya module of a single-file key (the form the tools write)."""
    stem = key.rsplit(".", 1)[0]
    for prefix, lora in (("model.diffusion_model.", "lora_unet_"),
                         ("conditioner.embedders.0.transformer.", "lora_te1_")):
        if stem.startswith(prefix):
            return lora + stem[len(prefix):].replace(".", "_")
    return "lora_unet_" + stem.replace(".", "_")


# ------------------------------------------------------------------ the formulas

def lora_delta(up, down, alpha=None, shape=None, mid=None):
    """ΔW = up·down·alpha/rank (rank = down's rows; no alpha: scale 1), conv kernels
    flattened to rows × (in·kh·kw) and reshaped to the key's shape."""
    up, down = np.asarray(up, np.float64), np.asarray(down, np.float64)
    rank = down.shape[0]
    d2 = down.reshape(rank, -1)
    if mid is not None:  # W[o,i,h,w] = Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i]
        mid = np.asarray(mid, np.float64)
        out = np.zeros((up.shape[0], d2.shape[1]) + mid.shape[2:])
        for o in range(out.shape[0]):
            for i in range(out.shape[1]):
                for a in range(mid.shape[0]):
                    for b in range(mid.shape[1]):
                        out[o, i] += up.reshape(up.shape[0], -1)[o, a] * mid[a, b] * d2[b, i]
        delta = out
    else:
        delta = up.reshape(up.shape[0], -1) @ d2
    scale = 1.0 if alpha is None else float(alpha) / rank
    return (delta * scale).reshape(shape if shape is not None else delta.shape)


def loha_delta(w1a, w1b, w2a, w2b, alpha, shape):
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank, rank = w1b's rows."""
    w1 = np.asarray(w1a, np.float64) @ np.asarray(w1b, np.float64).reshape(len(w1b), -1)
    w2 = np.asarray(w2a, np.float64) @ np.asarray(w2b, np.float64).reshape(len(w2b), -1)
    return (w1 * w2 * float(alpha) / w1b.shape[0]).reshape(shape)


def tucker_factor(t, a, b):
    """LyCORIS's Tucker ("CP") rebuild of one factor: W[p, r, h, w] = Σ_ij t[i, j, h, w]·a[i, p]·
    b[j, r], t [R, R, kh, kw], a [R, out] (the `_a`/up side), b [R, in] (the `_b`/down side)."""
    t, a, b = (np.asarray(x, np.float64) for x in (t, a, b))
    out = np.zeros((a.shape[1], b.shape[1]) + t.shape[2:])
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += np.multiply.outer(np.outer(a[i], b[j]), t[i, j])
    return out


def loha_tucker_delta(t1, w1a, w1b, t2, w2a, w2b, alpha):
    """ΔW = T(t1, w1a, w1b) ⊙ T(t2, w2a, w2b) · alpha/rank, rank = w1b's rows (hada_w1_b)."""
    return tucker_factor(t1, w1a, w1b) * tucker_factor(t2, w2a, w2b) * float(alpha) / len(w1b)


def lokr_delta(w1, w2, shape, scale=1.0):
    """ΔW = kron(w1, w2)·scale, w2 4-D for a conv (w1 widened to 4-D)."""
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return (np.kron(w1, w2) * scale).reshape(shape)


def svd_lora(delta: np.ndarray, rank: int):
    """The best rank-r factors of a key's delta (as rows × rest)."""
    m = delta.reshape(delta.shape[0], -1).astype(np.float64)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


# ------------------------------------------------------------------ files as the tools write them

def rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


def kohya_module(rng, name: str, shape: tuple, rank: int, alpha=None, tucker=False) -> dict:
    """kohya LoRA/LoCon tensors of one module onto a key of `shape` (2-D or conv)."""
    out, inn, kernel = shape[0], shape[1], tuple(shape[2:])
    one = (1,) * len(kernel)
    if tucker:
        t = {f"{name}.lora_down.weight": rand(rng, rank, inn, 1, 1),
             f"{name}.lora_mid.weight": rand(rng, rank, rank, *kernel),
             f"{name}.lora_up.weight": rand(rng, out, rank, 1, 1)}
    else:
        t = {f"{name}.lora_down.weight": rand(rng, rank, inn, *kernel),
             f"{name}.lora_up.weight": rand(rng, out, rank, *one)}
    if alpha is not None:
        t[f"{name}.alpha"] = np.array(alpha, np.float32)
    return t


def kohya_expected(t: dict, name: str, shape: tuple):
    mid = t.get(f"{name}.lora_mid.weight")
    return lora_delta(t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"],
                      t.get(f"{name}.alpha"), shape, mid=mid)
