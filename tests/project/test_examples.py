"""Every example checks, formats clean, plans as its golden plan says, and runs on synthetic
checkpoints; the AstolfoKarmix outputs equal the same merges written out by hand."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from karmixlang.api import compile as compile_recipe
from karmixlang.check.checker import check_program
from karmixlang.plan.report import render_text
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.demo.synth import write_demo_pool, write_sharded_llm

from conftest import recipe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.kmx"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    write_demo_pool(root / "models", arch="sdxl", scale=1 / 32, n_per_cluster=2, seed=11)
    write_sharded_llm(root / "models" / "llm", n_layers=2, hidden=32, seed=5, shards=2,
                      n_finetunes=2)
    return root


def place(models: Path, name: str, tmp_path: Path) -> Path:
    """The example copied beside a `models` folder, so the plan's paths are relative."""
    os.symlink(models / "models", tmp_path / "models")
    target = tmp_path / f"{name}.kmx"
    shutil.copy(EXAMPLES / f"{name}.kmx", target)
    return target


def test_there_are_examples():
    assert {"astolfokarmix", "mbw-sdxl", "three-stage", "llm-ties"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_checks_and_formats_clean(name):
    from karmixlang.syntax.fmt import format_source

    path = EXAMPLES / f"{name}.kmx"
    program, diags = check_program(str(path))
    assert program is not None and not diags, diags
    text = path.read_text()
    assert format_source(text, str(path))[0] == text


@pytest.mark.parametrize("name", NAMES)
def test_example_plan_is_golden_and_it_runs(name, models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    path = place(models, name, tmp_path)
    compiled = compile_recipe(str(path))
    text = render_text(compiled.plan) + "\n"
    golden = EXAMPLES / f"{name}.plan.txt"
    if os.environ.get("KMX_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    result = execute(compiled, RunOptions(threads=2))
    for out in result.outputs:
        files = [out] if os.path.exists(out) else sorted(Path(out).parent.glob("*.safetensors"))
        assert files and all(os.path.getsize(f) > 0 for f in files)


HAND_WRITTEN = """
    param seed = 250608
    base sdxl = "models/base-a.safetensors"
    base noob = "models/base-b.safetensors"
    model donor = "models/vae-donor.safetensors"
    cluster pool = balanced([["models/a/a-0.safetensors", "models/a/a-1.safetensors"],
                             ["models/b/b-0.safetensors", "models/b/b-1.safetensors"]])
    let noob_center = geometric_median([elect(della(pool - noob, p=0.1, eps=-0.05, seed=seed, rescale=false), rule="mass"), zeros_like(noob)], eps=1e-6, maxiter=100, ftol=1e-20)
    let xl_center = geometric_median([elect(della(pool - sdxl, p=0.1, eps=-0.05, seed=seed, rescale=false), rule="mass"), zeros_like(sdxl)], eps=1e-6, maxiter=100, ftol=1e-20)
    save "hand/noob.safetensors" = noob + noob_center | select(donor, "first_stage_model.*") with dtype="fp16"
    save "hand/xl.safetensors" = sdxl + xl_center | select(donor, "first_stage_model.*") with dtype="fp16"
"""


def test_astolfokarmix_equals_the_merges_written_by_hand(models, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    path = place(models, "astolfokarmix", tmp_path)
    execute(compile_recipe(str(path)), RunOptions(threads=2))
    hand = recipe(tmp_path, HAND_WRITTEN, "hand.kmx")
    execute(compile_recipe(hand), RunOptions(threads=2))
    for ours, theirs in (("astolfokarmix-noob", "noob"), ("astolfokarmix-xl", "xl")):
        with safe_open(str(tmp_path / "out" / f"{ours}.safetensors"), "pt") as a, \
                safe_open(str(tmp_path / "hand" / f"{theirs}.safetensors"), "pt") as b:
            assert list(a.keys()) == list(b.keys())
            for k in a.keys():
                assert a.get_tensor(k).equal(b.get_tensor(k)), k
