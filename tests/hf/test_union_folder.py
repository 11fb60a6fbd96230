"""A union-vocabulary merge saved as a folder: AutoTokenizer on the output folder looks every
token up at the row the merge put it in (numpy, from each model's own tokenizer and weights),
and AutoModelForCausalLM loads it with the union's vocab_size and the reference's logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from karmixlang.cli import main  # noqa: E402

from conftest import recipe  # noqa: E402
from hf_models import logits  # noqa: E402
from llm_folders import llama_folder  # noqa: E402

INPUTS = {"a": (["<unk>", "the", "cat", "sat", "on", "mat"], ["<|a|>"], None),
          "b": (["<unk>", "mat", "dog", "the", "ran", "cat"], ["<|b|>", "<|a|>"], 10),
          "c": (["<unk>", "bird", "the", "flew"], [], None)}
WEIGHTS = {"a": 0.5, "b": 0.25, "c": 0.25}
ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def own_row(weights: dict, tok: Tokenizer, key: str, token: str) -> np.ndarray:
    """The model's row of the token, else its mean row over its own tokens (fp64 → fp32)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if token in vocab:
        return weights[key][vocab[token]]
    rows = sorted(set(vocab.values()))
    return weights[key][rows].astype(np.float64).mean(0).astype(np.float32)


def test_union_folder_loads_and_every_row_is_where_its_token_is(workdir, capsys, monkeypatch):
    from transformers import AutoTokenizer

    models = {}
    for i, (name, (tokens, added, pad)) in enumerate(INPUTS.items()):
        folder = llama_folder(workdir / name, tokens, added, seed=i + 1, pad_to=pad)
        models[name] = (load_file(f"{folder}/model.safetensors"),
                        Tokenizer.from_file(f"{folder}/tokenizer.json"))
    with open(workdir / "a" / "vocab.json", "w") as f:  # a slow file the union must not copy
        json.dump({t: i for i, t in enumerate(INPUTS["a"][0])}, f)
    path = recipe(workdir, """
        base a = "a"
        model b = "b"
        model c = "c"
        save "merged" = 0.5*a + 0.25*b + 0.25*c with tokenizer="union"
    """)
    assert main(["run", path, "-q", "--threads", "1"]) == 0, capsys.readouterr().err
    out = workdir / "merged"
    assert "vocab.json" not in os.listdir(out)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 12 and json.loads((out / "config.json").read_text())["vocab_size"] == 12
    assert tok.convert_ids_to_tokens(tok("the dog <|b|> flew")["input_ids"]) == \
        ["the", "dog", "<|b|>", "flew"]
    merged = load_file(str(out / "model.safetensors"))
    expected = {}
    for key in merged:
        if key in ROW_KEYS:
            rows = [None] * len(vocab)
            for token, i in vocab.items():
                rows[i] = sum(np.float32(w) * own_row(*models[n], key, token)
                              for n, w in WEIGHTS.items())
            expected[key] = np.stack(rows)
        else:
            expected[key] = sum(np.float32(w) * models[n][0][key] for n, w in WEIGHTS.items())
        np.testing.assert_allclose(merged[key], expected[key], rtol=1e-6, atol=1e-6,
                                   err_msg=key)
    text = "the dog ran <|b|> bird flew on mat"
    np.testing.assert_allclose(logits(str(out), text=text),
                               logits(str(out), expected, text=text), rtol=1e-5, atol=1e-5)
