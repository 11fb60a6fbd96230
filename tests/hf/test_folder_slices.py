"""A stacked save into a folder (layer slices, docs/language.md "Layer slices") loads with
transformers with its new layer count and gives the same logits as the model stacked by hand
(numpy), for the overlapping-range merge too."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from karmixlang.cli import main  # noqa: E402

from conftest import recipe  # noqa: E402
from hf_models import config, logits, make_folder  # noqa: E402


def stacked_logits(tokenizer_folder, state: dict, layers: int,
                   text: str = "the big cat sat on a mat") -> np.ndarray:
    """Logits of a LLaMA of `layers` layers (built from hf_models' config, not from the
    output's) holding the numpy `state`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_folder)(text, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_config(config("llama", layers))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        return model(ids).logits.numpy()


def layer(i: int, rest: str) -> str:
    return f"model.layers.{i}.{rest}"


def split(key: str) -> tuple[int, str] | None:
    parts = key.split(".")
    return (int(parts[2]), ".".join(parts[3:])) if parts[1] == "layers" else None


def test_a_stacked_folder_loads_with_its_new_layer_count_and_the_hand_stacked_logits(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    a = make_folder(tmp_path / "a", "llama", seed=0, layers=4)
    b = make_folder(tmp_path / "b", "llama", seed=1, layers=4)
    path = recipe(tmp_path, """
        base a = "a"
        model b = "b"
        save "stacked" = stack(layers(a, 0, 3), 0.25*layers(a, 3, 4) + 0.75*layers(b, 1, 2),
                               layers(b, 2, 4)) with dtype="fp32"
    """)
    rc = main(["run", path, "-q", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    out = tmp_path / "stacked"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6

    # by hand: a's 0-2, then a's 3 blended with b's 1, then b's 2-3; the rest from a
    want = {k: v for k, v in a.items() if split(k) is None}
    for k, v in a.items():
        s = split(k)
        if s is not None and s[0] < 3:
            want[k] = v
        elif s is not None:
            want[layer(3, s[1])] = 0.25 * v + 0.75 * b[layer(1, s[1])]
    for k, v in b.items():
        s = split(k)
        if s is not None and s[0] >= 2:
            want[layer(s[0] + 2, s[1])] = v
    assert len([k for k in want if split(k)]) == 6 * 9

    got = logits(str(out))  # AutoModelForCausalLM.from_pretrained + AutoTokenizer
    np.testing.assert_allclose(got, stacked_logits(tmp_path / "a", want, 6), rtol=1e-5,
                               atol=1e-5)
    assert got.shape[-1] == 20
