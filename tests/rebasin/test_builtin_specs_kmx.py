"""The built-in specs through `kmx run`: `align(...)` recovers a random permutation of every
group of shrunk SD1.5 and SDXL checkpoints exactly with `spec="sd1"` / `spec="sdxl"` by name (the
built-in ranges scale to the shrunk widths), of a shrunk Flux checkpoint with a spec file of its
sizes made by tools/make_rebasin_specs.py (its parts are not in the real proportions), and
`spec="llama"` by name does on a LLaMA-named model of any depth."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import rebasin_np as R
import rebasin_synth as S
from conftest import cli, recipe
from karmixlang.demo.synth import load_layout, make_model, write_model
from rebasin.test_kmx import align_and_compare


def write_pair(folder, a, groups, seed):
    """TO = a, FROM = a with a random permutation of every group."""
    rng = np.random.default_rng(seed)
    b = R.apply(a, groups, {g.name: R.random_perm(g, a, rng) for g in groups})
    assert all(any(not np.array_equal(b[e.key], a[e.key]) for e in g.entries) for g in groups)
    write_model(os.path.join(folder, "a.safetensors"), dict(a))
    write_model(os.path.join(folder, "b.safetensors"), b)


def builtin(name):
    with open(S.BUILTIN_DIR / f"{name}.json") as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_align_by_name_recovers_a_shrunk_checkpoint_exactly(workdir, capsys, name):
    # the random permutation is drawn from the built-in file itself (its [KEY, AXIS, START,
    # STOP, OF] ranges scaled by the numpy reference), every group of it
    a = S.model(name)
    groups = R.parse_spec(builtin(name))
    write_pair(workdir, a, groups, seed=21)
    path = align_and_compare(workdir, capsys, a, name)
    code, plan, err = cli(capsys, "plan", path)
    assert code == 0, err
    assert f"spec {name} ({len(groups)} groups" in plan and "skipped" not in plan


def test_align_by_name_recovers_demo_synth_sd1_at_a_tenth(workdir, capsys):
    # another maker of small checkpoints: demo.synth's uniform shrink of the real layout (UNet
    # and CLIP, 8 heads of 4 channels at the first level); a few groups, one of each kind
    layout = {k: v for k, v in load_layout("sd1").items() if k.startswith(("model.diff", "cond_"))}
    a = make_model(layout, 0.1, 3, dtype="float32")
    chosen = ["unet.input_blocks.1.0.hidden", "unet.input_blocks.1.1.transformer_blocks.0.attn1.heads",
              "unet.input_blocks.1.1.transformer_blocks.0.ff", "unet.input_blocks.1.1.width",
              "clip_l.0.mlp"]
    groups = [g for g in R.parse_spec(builtin("sd1")) if g.name in chosen]
    assert len(groups) == len(chosen)
    write_pair(workdir, a, groups, seed=23)
    path = recipe(workdir, f"""
        base a = "a.safetensors"
        model b = "b.safetensors"
        save "aligned.safetensors" = align(b, to=a, spec="sd1", groups={json.dumps(chosen)})
    """)
    code, _, err = cli(capsys, "run", path, "-q")
    assert code == 0, err
    out = load_file(os.path.join(workdir, "aligned.safetensors"))
    assert [k for k in a if not np.array_equal(out[k], a[k])] == []


def test_align_recovers_a_shrunk_flux_checkpoint_with_a_spec_of_its_sizes(workdir, capsys):
    # Flux without its T5 (the biggest part, and its groups are plain MLPs): T5's groups,
    # none of whose keys the file has, are skipped
    a = {k: v for k, v in S.model("flux").items() if not k.startswith("text_encoders.t5xxl.")}
    spec = S.spec("flux")
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f)
    groups = [g for g in R.parse_spec(spec) if g.entries[0].key in a]
    write_pair(workdir, a, groups, seed=21)
    path = align_and_compare(workdir, capsys, a, "spec.json")
    code, plan, err = cli(capsys, "plan", path)
    assert code == 0, err
    assert f"spec spec.json ({len(groups)} groups" in plan
    skipped = len(spec["permutations"]) - len(groups)
    assert f"{skipped} group(s) skipped" in plan


def test_align_with_the_builtin_llama_spec_by_name(workdir, capsys):
    rng = np.random.default_rng(4)
    a = {"model.embed_tokens.weight": rng.standard_normal((20, 8)).astype(np.float32)}
    for i in range(3):
        m = f"model.layers.{i}.mlp"
        a |= {f"{m}.gate_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
              f"{m}.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
              f"{m}.down_proj.weight": rng.standard_normal((8, 16)).astype(np.float32),
              f"model.layers.{i}.input_layernorm.weight": np.ones(8, np.float32)}
    groups = R.parse_spec(R.expand_layers(builtin("llama"), a))
    assert len(groups) == 3
    write_pair(workdir, a, groups, seed=22)
    align_and_compare(workdir, capsys, a, "llama")
