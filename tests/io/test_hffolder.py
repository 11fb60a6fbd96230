"""io/hffolder.py: the planned side files of a folder save, and publishing a folder whole."""

import json
import os

import pytest

from karmixlang.io.hffolder import (CONFIG, FolderSave, SideFile, is_folder_path, model_card,
                                    plan_side_files, publish, staging_path, true_config,
                                    write_side_files)

TENSORS = [("model.embed_tokens.weight", "BF16", (50, 8)),
           ("model.layers.0.mlp.up_proj.weight", "BF16", (16, 8)),
           ("model.layers.2.mlp.up_proj.weight", "BF16", (16, 8)),
           ("model.norm.weight", "F32", (8,))]


def test_a_path_is_a_folder_unless_it_ends_in_safetensors():
    assert is_folder_path("out/merged") and is_folder_path("out/merged/")
    assert not is_folder_path("out/merged.safetensors")
    assert staging_path("out/merged/") == os.path.join("out", ".merged.kmx-partial")


def test_the_config_is_made_true_for_the_written_tensors():
    cfg, changed = true_config({"num_hidden_layers": 32, "vocab_size": 7, "torch_dtype": "float32",
                                "hidden_size": 8}, TENSORS)
    assert cfg == {"num_hidden_layers": 3, "vocab_size": 50, "torch_dtype": "bfloat16",
                   "hidden_size": 8}
    assert changed == ["num_hidden_layers=3", "vocab_size=50", "torch_dtype=bfloat16"]
    gpt2, _ = true_config({"n_layer": 1, "dtype": "float16"}, TENSORS)
    assert gpt2 == {"n_layer": 3, "dtype": "bfloat16"}  # whichever field the config has


def _source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / CONFIG).write_text(json.dumps({"num_hidden_layers": 3, "vocab_size": 50}))
    (src / "tokenizer.json").write_text("{}")
    (src / "merges.txt").write_text("a b\n")
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    return src


def test_side_files_are_planned_and_substitutable(tmp_path):
    src = _source(tmp_path)
    folder = plan_side_files(str(tmp_path / "out"), str(src), "`base`", TENSORS, b"card")
    assert [f.name for f in folder.files] == ["README.md", CONFIG, "merges.txt", "tokenizer.json"]
    assert folder.get("tokenizer.json").copy_from == str(src / "tokenizer.json")
    assert json.loads(folder.get(CONFIG).content())["torch_dtype"] == "bfloat16"
    union = folder.with_files(SideFile("tokenizer.json", "generated: union", generated=b"[1]"),
                              drop=("merges.txt",)).with_config(vocab_size=60)
    assert [f.name for f in union.files] == ["README.md", CONFIG, "tokenizer.json"]
    assert union.get("tokenizer.json").content() == b"[1]"
    assert json.loads(union.get(CONFIG).content())["vocab_size"] == 60
    assert "vocab_size=60" in union.get(CONFIG).origin
    assert folder.get("merges.txt") is not None  # the original is unchanged
    with pytest.raises(ValueError):
        SideFile("a", "x")
    with pytest.raises(ValueError):
        SideFile("../a", "x", generated=b"")


def test_publish_replaces_a_folder_whole(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    folder = plan_side_files(str(out), str(src), "`base`", TENSORS, b"card")
    staging = staging_path(str(out))
    os.mkdir(staging)
    write_side_files(staging, folder)
    assert sorted(os.listdir(out)) == ["old.txt"]  # nothing under the final name yet
    publish(staging, str(out))
    assert sorted(os.listdir(out)) == ["README.md", CONFIG, "merges.txt", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no staging, no old folder left


def test_the_model_card_has_hub_front_matter():
    recipe = "save \"m\" = a\n```x```"
    card = model_card("m", ["base", "a"], ["ties", "lerp"], recipe, "1.0").decode()
    front = card.split("---\n")[1]
    assert front.splitlines() == ['base_model:', '- "base"', '- "a"',
                                  "library_name: transformers", "tags:", "- merge", "- kmx"]
    assert "`ties`, `lerp`" in card and "````kmx\nsave \"m\" = a\n```x```\n````" in card
