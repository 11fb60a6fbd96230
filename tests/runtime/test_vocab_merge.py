"""Merges of models whose vocabularies differ: every token's row lands where the target
tokenizer looks the token up, checked against numpy computed from each model's own tokenizer
(the `tokenizers` library) and weights."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from karmixlang.api import compile as compile_recipe
from karmixlang.plan.executable import Executable
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe
from llm_folders import llama_folder

A = ["<unk>", "the", "cat", "sat", "on", "mat"]
B = ["<unk>", "mat", "dog", "the", "ran", "cat"]
C = ["<unk>", "bird", "the", "flew"]
ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture
def models(workdir):
    out = {}
    for name, tokens, added, seed, pad in (("a", A, ["<|a|>"], 1, None),
                                           ("b", B, ["<|b|>", "<|a|>"], 2, 10),
                                           ("c", C, [], 3, None)):
        folder = llama_folder(workdir / name, tokens, added, seed=seed, pad_to=pad)
        out[name] = (load_file(f"{folder}/model.safetensors"),
                     Tokenizer.from_file(f"{folder}/tokenizer.json"))
    return out


def token_row(model, key: str, token: str) -> np.ndarray:
    """The model's row of the token, or its mean row over its own tokens' rows (fp64, then
    stored as its fp32)."""
    weights, tok = model
    vocab = tok.get_vocab(with_added_tokens=True)
    if token in vocab:
        return weights[key][vocab[token]]
    return weights[key][sorted(set(vocab.values()))].astype(np.float64).mean(0).astype(np.float32)


def merge(workdir, text):
    c = compile_recipe(recipe(workdir, text))
    execute(c, RunOptions())
    out = workdir / "out"
    return c, load_file(str(out / "model.safetensors" if out.is_dir() else f"{out}.safetensors"))


def test_union_puts_each_tokens_row_where_the_union_tokenizer_looks_it_up(workdir, models):
    c, out = merge(workdir, """
        base a = "a"
        model b = "b"
        model c = "c"
        save "out" = 0.5*a + 0.25*b + 0.25*c with tokenizer="union"
    """)
    union = Tokenizer.from_str(dict(c.schedule.vocab[0].files)["tokenizer.json"].decode())
    vocab = union.get_vocab(with_added_tokens=True)
    # a's tokens keep their ids; b's then c's new tokens follow, in their own id order
    assert sorted(vocab, key=vocab.get) == A + ["<|a|>", "dog", "ran", "<|b|>", "bird", "flew"]
    assert union.encode("the dog <|b|> flew").ids[1:] == [vocab["dog"], vocab["<|b|>"],
                                                          vocab["flew"]]
    for key in ROW_KEYS:
        assert out[key].shape == (len(vocab), 32)
        for token, i in vocab.items():
            want = (np.float32(0.5) * token_row(models["a"], key, token)
                    + np.float32(0.25) * token_row(models["b"], key, token)
                    + np.float32(0.25) * token_row(models["c"], key, token))
            np.testing.assert_allclose(out[key][i], want, rtol=1e-6, atol=1e-7, err_msg=token)
    layer = "model.layers.1.mlp.up_proj.weight"  # every other key is merged by index, as always
    np.testing.assert_allclose(out[layer], 0.5 * models["a"][0][layer] + 0.25 * (
        models["b"][0][layer] + models["c"][0][layer]), rtol=1e-6, atol=1e-7)


def test_tokenizer_model_keeps_its_ids_and_padding_rows(workdir, models):
    _, out = merge(workdir, """
        base a = "a"
        model b = "b"
        save "out.safetensors" = 0.5*a + 0.5*b with tokenizer=b
    """)
    vocab = models["b"][1].get_vocab(with_added_tokens=True)
    key = "model.embed_tokens.weight"
    assert out[key].shape == (10, 32)
    for token, i in vocab.items():
        want = 0.5 * token_row(models["a"], key, token) + 0.5 * models["b"][0][key][i]
        np.testing.assert_allclose(out[key][i], want, rtol=1e-6, atol=1e-7)
    for i in (8, 9):  # b's padding rows: its own, and a's mean row
        want = 0.5 * token_row(models["a"], key, "no such token") + 0.5 * models["b"][0][key][i]
        np.testing.assert_allclose(out[key][i], want, rtol=1e-6, atol=1e-7)


def test_a_row_gather_survives_the_executable_round_trip(workdir, models):
    c = compile_recipe(recipe(workdir, """
        base a = "a"
        model b = "b"
        save "out" = 0.5*a + 0.5*b with tokenizer="union"
    """))
    exe = c.schedule.executable
    again = Executable.loads(exe.dumps())
    job = next(j for j in again.jobs if j.key == "lm_head.weight")
    assert job.tensors == next(j for j in exe.jobs if j.key == "lm_head.weight").tensors
    assert any(t.gather and t.mean for t in job.tensors.values())
