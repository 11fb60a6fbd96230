"""The rules of a save into a folder, on small hand-made folders (no transformers): what the
checker and the plan refuse, what --force may replace, and the plan's list of side files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from karmixlang.api import compile as compile_recipe
from karmixlang.cli import main
from karmixlang.diagnostics import KmxError

from conftest import recipe

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "folder-save.plan.txt")


def hf_folder(path, seed: int, layers: int = 3, vocab: int = 10) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(path)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(vocab, 4)).astype(np.float32),
               "model.norm.weight": rng.normal(size=(4,)).astype(np.float32)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = rng.normal(size=(8, 4)).astype(
            np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "num_hidden_layers": 32, "vocab_size": vocab,
                   "torch_dtype": "bfloat16"}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "WordLevel", "unk_token": "t0",
                             "vocab": {f"t{i}": i for i in range(vocab)}},
                   "added_tokens": []}, f)
    for name in ("tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write(json.dumps({"from": os.path.basename(path)}))


@pytest.fixture
def folders(workdir):
    hf_folder(workdir / "base", 0)
    hf_folder(workdir / "a", 1)
    return workdir


def run(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *args, "-q", "--threads", "1"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, err


def one(folders, target="out/merged", options="") -> str:
    return recipe(folders, f"""
        base o = "base"
        model a = "a"
        save "{target}" = lerp(o, a, 0.5){options}
    """)


def codes(path) -> list[str]:
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    return [d.code for d in exc.value.diagnostics]


def test_the_plan_lists_the_folders_files_and_their_sources(folders, capsys):
    path = one(folders, options=' with tokenizer=a, dtype="fp16"')
    assert main(["plan", path, "--threads", "1"]) == 0
    text = capsys.readouterr().out.replace(str(folders), "<tmp>")
    with open(GOLDEN, encoding="utf-8") as f:
        assert text == f.read()
    data = compile_recipe(path).plan.data["saves"][0]["folder"]
    assert data["source"] == "a"
    assert [f["name"] for f in data["files"]] == [
        "README.md", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert data["files"][1]["from"] == "from `a`, with num_hidden_layers=3, torch_dtype=float16"


def test_a_folder_save_writes_the_folder_and_force_replaces_it_whole(folders, capsys):
    path = one(folders)
    assert run(capsys, path)[0] == 0
    out = folders / "out" / "merged"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "base"}
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["torch_dtype"]) == (3, 10, "float32")
    rc, err = run(capsys, path)
    assert rc == 1 and "K0306" in err  # an existing folder needs --force
    (out / "stale.safetensors.index.json").write_text("{}")
    rc, err = run(capsys, path, "--force")
    assert rc == 1 and "K0343" in err  # not only what a folder save writes: left alone
    assert (out / "stale.safetensors.index.json").exists()
    os.unlink(out / "stale.safetensors.index.json")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"old shard")
    assert run(capsys, path, "--force")[0] == 0
    assert "model-00009-of-00009.safetensors" not in os.listdir(out)  # replaced whole
    assert sorted(os.listdir(folders / "out")) == ["merged"]  # no hidden folder left


@pytest.mark.parametrize("target", ["base", ".", "a/.."])
def test_a_folder_save_never_replaces_a_folder_holding_an_input_or_the_recipe(folders, target):
    assert codes(one(folders, target)) == ["K0305"]


def test_a_file_where_the_folder_goes_is_refused(folders):
    (folders / "out").mkdir()
    (folders / "out" / "merged").write_text("a file")
    assert codes(one(folders)) == ["K0342"]


def test_a_folder_save_needs_a_config_source(folders):
    os.unlink(folders / "a" / "config.json")
    assert codes(one(folders, options=" with tokenizer=a")) == ["K0340"]
    path = recipe(folders, """
        model o = "base"
        model a = "a"
        save "out/m" = 0.5*o + 0.5*a
    """)
    assert codes(path) == ["K0341"]


@pytest.mark.parametrize("text", [
    'save "m" = a - o with delta=true',
    'save "m" = a - o with lora=4',
])
def test_options_that_do_not_fit_a_folder_save_are_k0219(folders, text):
    path = recipe(folders, f'base o = "base"\nmodel a = "a"\n{text}\n')
    assert "K0219" in codes(path)


def test_a_side_file_gone_by_publishing_time_publishes_nothing(folders):
    from karmixlang.runtime.executor import RunOptions, execute

    compiled = compile_recipe(one(folders))
    os.unlink(folders / "base" / "tokenizer.json")  # planned as copied, gone before the run
    with pytest.raises(KmxError) as exc:
        execute(compiled, RunOptions(threads=1))
    d = exc.value.diagnostics[0]
    assert d.code == "K0520" and "tokenizer.json" in d.message and d.span.line == 3
    assert not os.path.lexists(folders / "out" / "merged")


def test_kmx_verify_recomputes_a_folder_saves_tensors(folders, capsys):
    path = one(folders)
    assert run(capsys, path)[0] == 0
    for target in ("out/merged", "out/merged/model.safetensors"):
        assert main(["verify", str(folders / target)]) == 0, capsys.readouterr().err
        assert "verified" in capsys.readouterr().err
    assert sorted(os.listdir(folders / "out")) == ["merged"]
