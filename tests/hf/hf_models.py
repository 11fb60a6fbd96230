"""Tiny LLaMA- and Mistral-shaped Hugging Face folders made with transformers, with a real
tokenizer.json made with the `tokenizers` library and a chat template, for folder saves."""

from __future__ import annotations

import os

import numpy as np

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "ball",
         "and", "then", "slept", "."]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                 "{% endfor %}")


def tokenizer(words=WORDS):
    """A word-level tokenizer (a real tokenizer.json once saved) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config(kind: str, layers: int = 2, vocab: int = len(SPECIALS) + len(WORDS)):
    from transformers import LlamaConfig, MistralConfig

    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[kind]
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
               tie_word_embeddings=False)


def make_folder(path, kind: str, seed: int, layers: int = 2, words=WORDS) -> dict:
    """A model folder at `path` (fp32 safetensors, config, generation config, tokenizer
    files); returns its tensors as numpy arrays."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind, layers, len(SPECIALS) + len(words)))
    with torch.no_grad():  # norms away from 1, so a wrong norm merge shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer(words).save_pretrained(path)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def logits(folder_or_model, state: dict | None = None, text: str = "the big cat sat on a mat"):
    """Logits of `text`, from a folder loaded with transformers' Auto classes, or from the
    config of `folder_or_model` with the numpy `state` loaded into it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder_or_model)
    ids = tok(text, return_tensors="pt")["input_ids"]
    if state is None:
        model = AutoModelForCausalLM.from_pretrained(folder_or_model)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder_or_model))
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        return model(ids).logits.numpy()


def exists(path) -> bool:
    return os.path.lexists(path)
