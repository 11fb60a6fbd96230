"""A save into a folder writes a Hugging Face model folder that transformers loads, with the
same logits as the merge computed directly (numpy); the folder appears whole or not at all."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from karmixlang.cli import main  # noqa: E402
from karmixlang.io import writer as writer_mod  # noqa: E402

from conftest import recipe  # noqa: E402
from hf_models import CHAT_TEMPLATE, logits, make_folder  # noqa: E402


def run(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *args, "-q", "--threads", "1"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, err


@pytest.fixture(scope="module", params=["llama", "mistral"])
def models(request, tmp_path_factory):
    """base, a and b: three folders of one architecture (2 layers), different weights."""
    root = tmp_path_factory.mktemp(request.param)
    arrays = {n: make_folder(root / n, request.param, seed=i) for i, n in
              enumerate(("base", "a", "b"))}
    return request.param, root, arrays


MERGE = """
    base o = "base"
    model a = "a"
    model b = "b"
    save "merged" = o + 0.6*(a - o) + 0.3*(b - o) with dtype="fp32"
"""


def test_a_folder_save_loads_with_transformers_and_gives_the_merges_logits(models, capsys,
                                                                           monkeypatch):
    kind, root, arrays = models
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / ".cache"))
    out = root / "merged"
    rc, err = run(capsys, recipe(root, MERGE), "--force")
    assert rc == 0, err
    o, a, b = (arrays[n] for n in ("base", "a", "b"))
    expected = {k: o[k] + 0.6 * (a[k] - o[k]) + 0.3 * (b[k] - o[k]) for k in o}
    got = logits(str(out))
    want = logits(str(root / "base"), expected)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits(str(root / "base")), atol=1e-3)  # the merge matters
    names = sorted(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 20
    assert cfg["model_type"] == kind
    card = (out / "README.md").read_text()
    assert card.startswith('---\nbase_model:\n- "base"\n- "a"\n- "b"\n')
    assert "- merge" in card and "save \"merged\"" in card and "`weighted sum`" in card
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(root / "base")
    assert tok("the red dog")["input_ids"] == ref("the red dog")["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s>user: hi</s>"
    assert tok.chat_template == CHAT_TEMPLATE
    assert sorted(p for p in os.listdir(root) if p.startswith(".")) == [".cache"]


def test_sharded_folder_and_tokenizer_option(models, capsys, monkeypatch):
    """`shard=` splits the tensors (an index beside them); `tokenizer=` names the model the
    config and tokenizer files come from; bf16 gives the config its dtype."""
    kind, root, arrays = models
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / ".cache"))
    path = recipe(root, """
        base o = "base"
        model a = "a"
        save "sharded" = lerp(o, a, 0.25) with shard="10KB", tokenizer=a, dtype="bf16"
    """, "shard.kmx")
    rc, err = run(capsys, path, "--force")
    assert rc == 0, err
    out = root / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.isfile(out / s) for s in shards)
    assert json.loads((out / "config.json").read_text()).get(
        "dtype", json.loads((out / "config.json").read_text()).get("torch_dtype")) == "bfloat16"
    o, a = arrays["base"], arrays["a"]
    import torch
    want = {k: torch.from_numpy(o[k] + 0.25 * (a[k] - o[k])).to(torch.bfloat16).float().numpy()
            for k in o}
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-2, atol=1e-2, err_msg=k)
    assert (out / "tokenizer.json").read_bytes() == (root / "a" / "tokenizer.json").read_bytes()


def test_an_interrupted_folder_save_leaves_nothing_under_its_name(models, capsys, monkeypatch):
    kind, root, _ = models
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / ".cache"))
    path = recipe(root, MERGE.replace('"merged"', '"stopped"'), "stop.kmx")
    real = writer_mod._pwrite_all
    calls = {"n": 0}

    def interrupt(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "_pwrite_all", interrupt)
    rc, err = run(capsys, path)
    assert rc != 0 and "K0403" in err
    assert not os.path.lexists(root / "stopped")
    assert os.path.isdir(root / ".stopped.kmx-partial")  # hidden: no loader picks it up
    monkeypatch.setattr(writer_mod, "_pwrite_all", real)
    rc, err = run(capsys, path, "--resume")
    assert rc == 0, err
    assert (root / "stopped" / "config.json").is_file()
    assert not os.path.lexists(root / ".stopped.kmx-partial")
