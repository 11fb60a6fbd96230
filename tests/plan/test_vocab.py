"""Vocabularies at plan time: reading them from each kind of tokenizer file, the target
vocabulary and row gather of each input (plan/vocab.py), the plan's section, and the errors."""

from __future__ import annotations

import json
import os
import sys

import pytest

from karmixlang import api
from karmixlang.diagnostics import KmxError
from karmixlang.io.vocab import read_vocabulary
from karmixlang.plan.report import render_text
from karmixlang.plan.vocab import _runs
from conftest import recipe
from llm_folders import llama_folder

A = ["<unk>", "the", "cat", "sat", "on", "mat"]
B = ["<unk>", "mat", "dog", "the", "ran", "cat"]  # other order, two new words


@pytest.fixture
def here(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture
def folders(here):
    llama_folder("models/a", A, ["<|a|>"], seed=1)
    llama_folder("models/b", B, ["<|b|>", "<|a|>"], seed=2, pad_to=10)
    return here


def _compile(folder, text):
    return api.compile(recipe(folder, text))


def _codes(folder, text):
    with pytest.raises(KmxError) as exc:
        _compile(folder, text)
    return [d.code for d in exc.value.diagnostics]


def test_vocabularies_are_read_from_each_kind_of_file(here):
    llama_folder("m", A, ["<|a|>"], pad_to=12)
    v = read_vocabulary("m")
    assert v.ids == {t: i for i, t in enumerate(A + ["<|a|>"])} and v.rows == 12
    assert [e["content"] for e in v.added] == ["<|a|>"] and v.added[0]["special"]
    os.remove("m/tokenizer.json")
    assert read_vocabulary("m") is None
    json.dump({t: i for i, t in enumerate(A)}, open("m/vocab.json", "w"))
    json.dump({"<|x|>": 6}, open("m/added_tokens.json", "w"))
    v = read_vocabulary("m")
    assert v.ids["<|x|>"] == 6 and v.ids["mat"] == 5 and v.source.endswith("vocab.json")
    with open("m/vocab.json", "w") as f:
        f.write("[1, 2]")
    with pytest.raises(KmxError) as exc:
        read_vocabulary("m")
    assert exc.value.diagnostics[0].code == "K0345"


def test_a_sentencepiece_model_is_read_with_its_library(here):
    sentencepiece = pytest.importorskip("sentencepiece")
    os.makedirs("sp")
    with open("corpus.txt", "w") as f:
        f.write("the cat sat on the mat\nthe dog ran\n" * 20)
    sentencepiece.SentencePieceTrainer.Train(input="corpus.txt", model_prefix="sp/tokenizer",
                                             vocab_size=10, model_type="word",
                                             minloglevel=2)
    v = read_vocabulary("sp")
    sp = sentencepiece.SentencePieceProcessor(model_file="sp/tokenizer.model")
    assert len(v.ids) == sp.GetPieceSize() == v.rows
    assert all(v.ids[sp.IdToPiece(i)] == i for i in range(sp.GetPieceSize()))


def test_without_sentencepiece_a_tokenizer_model_is_a_coded_error(here, monkeypatch):
    os.makedirs("sp")
    open("sp/tokenizer.model", "wb").close()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` fails
    with pytest.raises(KmxError) as exc:
        read_vocabulary("sp")
    assert exc.value.diagnostics[0].code == "K0345"
    assert "karmixlang[sentencepiece]" in exc.value.diagnostics[0].message


def test_runs_compress_consecutive_rows():
    assert _runs([0, 1, 2, 5, 6, -1, -1, 3]) == ((0, 3), (5, 2), (-1, 2), (3, 1))
    assert _runs([]) == ()


def test_union_reads_each_input_in_the_union_order(folders):
    c = _compile(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                 'save "out" = 0.5*a + 0.5*b with tokenizer="union"\n')
    v = c.schedule.vocab[0]
    # a's 7 tokens, then b's tokens a lacks in b's id order: dog, ran, <|b|>
    assert (v.mode, v.rows, v.tokens) == ("union", 10, 10)
    assert [e["content"] for e in v.added] == ["dog", "ran", "<|b|>"]
    assert [e["id"] for e in v.added] == [7, 8, 9] and v.added[2]["special"]
    assert [(i.tokens, i.rows, i.lacking) for i in v.inputs] == [(7, 7, 3), (8, 10, 2)]
    headers = {n.attr("path"): h for n, h in c.schedule.headers.items()}
    emb_a = headers[os.path.abspath("models/a")].tensors["lm_head.weight"]
    emb_b = headers[os.path.abspath("models/b")].tensors["model.embed_tokens.weight"]
    assert emb_a.shape == emb_b.shape == (10, 32)
    assert emb_a.gather == ((0, 7), (-1, 3)) and emb_a.mean == ((0, 7),)
    # union rows: <unk> the cat sat on mat <|a|> dog ran <|b|>, each from b's own id
    assert emb_b.gather == ((0, 1), (3, 1), (5, 1), (-1, 2), (1, 1), (7, 1), (2, 1), (4, 1),
                            (6, 1))
    assert emb_b.mean == ((0, 8),)  # b's token rows only, not its padding
    assert "model.norm.weight" not in v.inputs[0].keys  # only token rows are gathered


def test_the_plan_shows_each_vocabulary(folders):
    c = _compile(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                 'save "out" = 0.5*a + 0.5*b with tokenizer="union"\n')
    text = render_text(c.plan)
    start = text.index("    rows matched by token")
    assert text[start:].splitlines()[:3] == [
        "    rows matched by token: the union vocabulary of models/a/tokenizer.json + 3 added, "
        "10 tokens in 10 rows",
        "      models/a: 7 tokens in 7 rows, lacks 3 (its mean row there); lm_head.weight, "
        "model.embed_tokens.weight",
        "      models/b: 8 tokens in 10 rows, lacks 2 (its mean row there); lm_head.weight, "
        "model.embed_tokens.weight"]
    # the folder's side files: the union's tokenizer generated, the rest from the base
    assert "      tokenizer.json         generated: the union vocabulary" in text
    assert "      config.json            from `a`, with vocab_size=10" in text
    data = c.plan.data["saves"][0]["vocabulary"]
    assert data["mode"] == "union" and data["inputs"][1]["lacking"] == 2
    shapes = {j.key: j.outputs[0].shape for j in c.schedule.jobs}
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (10, 32)


def test_tokenizer_model_keeps_its_rows_and_padding(folders):
    c = _compile(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                 'save "out.safetensors" = 0.5*a + 0.5*b with tokenizer=b\n')
    v = c.schedule.vocab[0]
    assert (v.mode, v.rows, v.tokens, v.added) == ("model", 10, 8, ())
    headers = {n.attr("path"): h for n, h in c.schedule.headers.items()}
    emb_a = headers[os.path.abspath("models/a")].tensors["model.embed_tokens.weight"]
    # b's rows: <unk> mat dog the ran cat <|b|> <|a|> + 2 padding rows
    assert emb_a.gather == ((0, 1), (5, 1), (-1, 1), (1, 1), (-1, 1), (2, 1), (-1, 1), (6, 1),
                            (-1, 2))
    b = headers[os.path.abspath("models/b")].tensors["model.embed_tokens.weight"]
    assert not b.gather  # the tokenizer model is read as it is, padding included


def test_tokenizer_may_name_a_model_of_an_imported_file(folders):
    recipe(folders, 'model b = "models/b"\n', name="lib.kmx")
    c = _compile(folders, 'import "lib.kmx" as lib\nbase a = "models/a"\n'
                 'save "out.safetensors" = 0.5*a + 0.5*lib.b with tokenizer=lib.b\n')
    assert c.schedule.vocab[0].rows == 10 and c.schedule.vocab[0].file.endswith(
        os.path.join("b", "tokenizer.json"))


def test_without_tokenizer_rows_follow_the_base_when_vocabularies_differ(folders):
    c = _compile(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                 'save "out.safetensors" = 0.5*a + 0.5*b\n')
    assert c.schedule.vocab[0].mode == "model" and c.schedule.vocab[0].rows == 7
    llama_folder("models/a2", A, ["<|a|>"], seed=3)
    c = _compile(folders, 'base a = "models/a"\nmodel a2 = "models/a2"\n'
                 'save "out.safetensors" = 0.5*a + 0.5*a2\n')
    assert c.schedule.vocab == {}  # one vocabulary: rows are read by index, no view


def test_vocabulary_errors(folders):
    llama_folder("models/bare", A, seed=3)
    os.remove("models/bare/tokenizer.json")
    assert _codes(folders, 'base a = "models/a"\nmodel m = "models/bare"\n'
                  'save "o" = 0.5*a + 0.5*m with tokenizer="union"\n') == ["K0345"]
    llama_folder("models/short", A + ["x"], seed=4, pad_to=3)
    assert _codes(folders, 'base a = "models/a"\nmodel m = "models/short"\n'
                  'save "o" = 0.5*a + 0.5*m with tokenizer="union"\n') == ["K0346"]
    os.rename("models/bare", "models/slow")
    json.dump({t: i for i, t in enumerate(A)}, open("models/slow/vocab.json", "w"))
    assert _codes(folders, 'base m = "models/slow"\nmodel b = "models/b"\n'
                  'save "o" = 0.5*m + 0.5*b with tokenizer="union"\n') == ["K0347"]
    assert _codes(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                  'save "u" = 0.5*a + 0.5*b with tokenizer="union"\n'
                  'save "v.safetensors" = 0.5*a + 0.5*b with tokenizer=b\n') == ["K0348"]
    assert _codes(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                  'save "o.safetensors" = 0.5*a + 0.5*b with tokenizer="b"\n') == ["K0349"]
    assert _codes(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                  'save "o.safetensors" = 0.5*a + 0.5*b with tokenizer="union"\n'
                  ) == ["K0349"]  # a single file cannot hold the union's tokenizer
    assert _codes(folders, 'base a = "models/a"\nmodel b = "models/b"\n'
                  'save "o.safetensors" = 0.5*a + 0.5*b with tokenizer=0.5*a + 0.5*b\n'
                  ) == ["K0349"]
