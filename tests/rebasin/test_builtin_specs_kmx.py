"""The built-in specs through `kmx run`: `align(...)` recovers a random permutation of every
group of shrunk SD1.5, SDXL and Flux checkpoints exactly (spec files of the checkpoints' sizes made
by tools/make_rebasin_specs.py), and `spec="llama"` by name does on a LLaMA-named model of any
depth."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import rebasin_np as R
import rebasin_synth as S
from conftest import cli, recipe
from karmixlang.demo.synth import write_model


def write_pair(folder, a, groups, seed):
    """TO = a, FROM = a with a random permutation of every group."""
    rng = np.random.default_rng(seed)
    b = R.apply(a, groups, {g.name: R.random_perm(g, a, rng) for g in groups})
    write_model(os.path.join(folder, "a.safetensors"), dict(a))
    write_model(os.path.join(folder, "b.safetensors"), b)


def align_and_compare(folder, capsys, a, spec):
    path = recipe(folder, f"""
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "aligned.safetensors" = align(b, to=a, spec="{spec}")
    """)
    code, _, err = cli(capsys, "run", path, "-q")
    assert code == 0, err
    out = load_file(os.path.join(folder, "aligned.safetensors"))
    assert sorted(out) == sorted(a)
    assert [k for k in a if not np.array_equal(out[k], a[k])] == []
    return path


@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_align_recovers_a_shrunk_checkpoint_exactly(workdir, capsys, name):
    # Flux without its T5 (the biggest part, and its groups are plain MLPs): T5's groups,
    # none of whose keys the file has, are skipped
    a = {k: v for k, v in S.model(name).items() if not k.startswith("text_encoders.t5xxl.")}
    spec = S.spec(name)
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f)
    groups = [g for g in R.parse_spec(spec) if g.entries[0].key in a]
    write_pair(workdir, a, groups, seed=21)
    path = align_and_compare(workdir, capsys, a, "spec.json")
    code, plan, err = cli(capsys, "plan", path)
    assert code == 0, err
    assert f"spec spec.json ({len(groups)} groups" in plan
    skipped = len(spec["permutations"]) - len(groups)
    assert (f"{skipped} group(s) skipped" in plan) == (skipped > 0)


def test_align_with_the_builtin_llama_spec_by_name(workdir, capsys):
    rng = np.random.default_rng(4)
    a = {"model.embed_tokens.weight": rng.standard_normal((20, 8)).astype(np.float32)}
    for i in range(3):
        m = f"model.layers.{i}.mlp"
        a |= {f"{m}.gate_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
              f"{m}.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
              f"{m}.down_proj.weight": rng.standard_normal((8, 16)).astype(np.float32),
              f"model.layers.{i}.input_layernorm.weight": np.ones(8, np.float32)}
    with open(S.BUILTIN_DIR / "llama.json") as f:
        groups = R.parse_spec(R.expand_layers(json.load(f), a))
    assert len(groups) == 3
    write_pair(workdir, a, groups, seed=22)
    align_and_compare(workdir, capsys, a, "llama")
