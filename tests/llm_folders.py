"""Tiny LLaMA-shaped Hugging Face model folders with real tokenizer files, for tests.

`llama_folder(path, tokens, ...)` writes what `LlamaForCausalLM.save_pretrained` and a fast
tokenizer's `save_pretrained` would: `config.json`, `model.safetensors` (LLaMA's key names,
random weights from numpy; fp32), `tokenizer.json` made with the `tokenizers` library (a
WordLevel model whose vocabulary is `tokens` in that order, ids 0.., then `added` as added
special tokens), and `tokenizer_config.json`. No transformers import: it is slow to import,
and only the tests that load an output folder need it.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 32, 64, 4, 2


def llama_config(vocab_size: int, layers: int = 2) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": vocab_size, "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def llama_tensors(vocab_size: int, layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab_size, HIDDEN),
           "lm_head.weight": w(vocab_size, HIDDEN),
           "model.norm.weight": 1 + w(HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            p + "self_attn.q_proj.weight": w(HEADS * head, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * head),
            p + "mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE)})
    return out


def write_tokenizer(folder: str, tokens: list[str], added: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(added)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": tokens[0],
                   "model_max_length": 64}, f)


def llama_folder(path, tokens: list[str], added: list[str] = (), seed: int = 0,
                 layers: int = 2, pad_to: int | None = None) -> str:
    """A model folder whose vocabulary is `tokens` then `added`; `pad_to`: the embedding's
    rows when more than the tokens (config.json `vocab_size`, as models pad it)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    rows = pad_to or len(tokens) + len(added)
    write_tokenizer(path, list(tokens), list(added))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llama_config(rows, layers), f, indent=2)
    save_file(llama_tensors(rows, layers, seed), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    return path
