"""`kmx diff OLD NEW`: what a recipe edit does to the merge — exit codes (0 no output
changes, 1 some, 2 error), the keys of each save that change grouped by block and explained
by the nodes that differ, saves and inputs that come and go, `--json`, `REV:path` through
git, and the git diff driver with a real `git diff`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from karmixlang.blocks import slot_of

from conftest import cli, recipe
from vcs_models import write_sdxl_models

MERGE = """
base sdxl = "base.safetensors"
model a = "a.safetensors"
model b = "b.safetensors"
let w = blocks("sdxl", BASE=0.2, IN04={in04}, OUT02=0.7, default=0.4)
save "out/m.safetensors" = {method}(sdxl, a, 0.3) + (b - sdxl) * w
"""


kmx = cli


@pytest.fixture
def models(workdir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(workdir)
    return write_sdxl_models(workdir)


def merge(folder, name, in04=0.5, method="lerp") -> str:
    return recipe(folder, MERGE.format(in04=in04, method=method), name)


def test_a_reformat_or_rename_is_no_output_change(models, workdir, capsys):
    old = merge(workdir, "old.kmx")
    new = recipe(workdir, """
        # reformatted, renamed, a comment
        base   base_model = "base.safetensors"
        model a = "a.safetensors"
        model tuned = "b.safetensors"
        let weights = blocks("sdxl", BASE=0.20, IN04=0.5, OUT02=0.7, default=0.4)
        save "out/m.safetensors" = lerp(base_model, a, 0.3) + (tuned - base_model) * weights
        """, "new.kmx")
    code, out, _ = kmx(capsys, "diff", old, new)
    assert code == 0 and out.strip().endswith("no output changes")
    code, out, _ = kmx(capsys, "diff", old, new, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["changed"] is False and doc["saves"][0]["status"] == "unchanged"


def test_a_block_weight_edit_names_the_block_keys_and_the_weight(models, workdir, capsys):
    code, out, _ = kmx(capsys, "diff", merge(workdir, "old.kmx"), merge(workdir, "new.kmx", 0.6))
    assert code == 1
    assert "out/m.safetensors: 3 of 60 keys change" in out
    assert "3 keys in IN04: lincomb coeffs 0.5 → 0.6  (new.kmx:5)" in out
    code, out, _ = kmx(capsys, "diff", merge(workdir, "old.kmx"), merge(workdir, "new.kmx", 0.6),
                       "--json")
    doc = json.loads(out)
    (save,) = doc["saves"]
    (group,) = save["groups"]
    assert code == 1 and doc["changed"] and save["changed_keys"] == 3
    assert group["where"] == "IN04"
    assert group["keys"] == sorted(k for k in models["base"] if slot_of("sdxl", k) == "IN04")
    assert group["changes"] == [{"kind": "attr", "node": "lincomb", "attr": "coeffs",
                                 "old": 0.5, "new": 0.6, "line": "new.kmx:5",
                                 "text": "lincomb coeffs 0.5 → 0.6"}]


def test_a_method_and_an_input_edit(models, workdir, capsys):
    old = merge(workdir, "old.kmx")
    code, out, _ = kmx(capsys, "diff", old, merge(workdir, "slerp.kmx", method="slerp"))
    assert code == 1 and "60 keys in BASE–VAE: method lerp → slerp" in out
    swapped = recipe(workdir, MERGE.format(in04=0.5, method="lerp").replace(
        '"b.safetensors"', '"c.safetensors"'), "input.kmx")
    shutil.copy(workdir / "b.safetensors", workdir / "c.safetensors")
    code, out, _ = kmx(capsys, "diff", old, swapped, "--json")
    doc = json.loads(out)
    assert code == 1
    assert doc["inputs"] == {"added": [str(workdir / "c.safetensors")],
                             "removed": [str(workdir / "b.safetensors")]}
    (group,) = doc["saves"][0]["groups"]
    assert len(group["keys"]) == 60
    assert [c["text"] for c in group["changes"]] == ["input b.safetensors → c.safetensors"]


def test_saves_that_come_and_go_and_keys_added(models, workdir, capsys):
    old = merge(workdir, "old.kmx")
    more = recipe(workdir, MERGE.format(in04=0.5, method="lerp") +
                  'save "out/second.safetensors" = lerp(sdxl, b, 0.5)\n', "more.kmx")
    code, out, _ = kmx(capsys, "diff", old, more)
    assert code == 1
    assert "out/second.safetensors: new save (60 keys)" in out
    assert "out/m.safetensors: no change" in out
    code, out, _ = kmx(capsys, "diff", more, old)
    assert code == 1 and "out/second.safetensors: no longer saved (60 keys)" in out
    # Selecting keys of a save that has a fallback copies the others instead...
    copied = recipe(workdir, MERGE.format(in04=0.5, method="lerp").replace(
        "lerp(sdxl, a, 0.3) + (b - sdxl) * w", 'select(lerp(sdxl, a, 0.3), "model.*")'),
        "copied.kmx")
    code, out, _ = kmx(capsys, "diff", old, copied)
    assert code == 1 and "source computed → copied from the fallback" in out
    # ... and removes them from a save that has none.
    head = 'model a = "a.safetensors"\nmodel b = "b.safetensors"\n'
    whole = recipe(workdir, head + 'save "out/k.safetensors" = (a + b) / 2\n', "whole.kmx")
    part = recipe(workdir, head + 'save "out/k.safetensors" = select((a + b) / 2, "model.*")\n',
                  "part.kmx")
    code, out, _ = kmx(capsys, "diff", whole, part, "--json")
    (save,) = json.loads(out)["saves"]
    assert code == 1 and save["removed_keys"] == sorted(
        k for k in models["base"] if not k.startswith("model."))
    assert save["groups"] == [] and save["changed_keys"] == len(save["removed_keys"])


def test_errors_exit_2(models, workdir, capsys):
    old = merge(workdir, "old.kmx")
    code, _, err = kmx(capsys, "diff", old, str(workdir / "missing.kmx"))
    assert code == 2 and "K0110" in err
    broken = recipe(workdir, "save = \n", "broken.kmx")
    code, _, err = kmx(capsys, "diff", old, broken)
    assert code == 2 and "K0001" in err
    code, _, err = kmx(capsys, "diff", old)
    assert code == 2 and "expects 2 arguments" in err


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@needs_git
def test_a_revision_is_read_through_git_as_if_at_its_path(models, workdir, capsys):
    os.makedirs(workdir / "recipes")
    path = merge(workdir / "recipes", "merge.kmx").replace(str(workdir) + "/", "")
    # Paths in the recipe are relative to its folder: the models are one level up.
    text = (workdir / path).read_text().replace('"base', '"../base').replace(
        '"a.', '"../a.').replace('"b.', '"../b.')
    (workdir / path).write_text(text)
    git(workdir, "init", "-q", ".")
    git(workdir, "add", path)
    git(workdir, "commit", "-qm", "first")
    (workdir / path).write_text(text.replace("IN04=0.5", "IN04=0.6"))
    code, out, _ = kmx(capsys, "diff", "HEAD:recipes/merge.kmx", path)
    assert code == 1 and "3 keys in IN04: lincomb coeffs 0.5 → 0.6" in out
    code, out, _ = kmx(capsys, "diff", "HEAD:recipes/merge.kmx", "HEAD:recipes/merge.kmx")
    assert code == 0 and "no output changes" in out
    code, _, err = kmx(capsys, "diff", "HEAD:recipes/nope.kmx", path)
    assert code == 2 and "K0501" in err and "nope.kmx" in err
    code, _, err = kmx(capsys, "diff", "nosuchrev:recipes/merge.kmx", path)
    assert code == 2 and "K0501" in err


@needs_git
def test_git_diff_shows_what_an_edit_changes_through_the_driver(models, workdir):
    path = merge(workdir, "merge.kmx")
    git(workdir, "init", "-q", ".")
    (workdir / ".gitattributes").write_text("*.kmx diff=kmx\n")
    # The documented setup, with this interpreter and this checkout's karmixlang.
    git(workdir, "config", "diff.kmx.command",
        f"{sys.executable} -m karmixlang diff --git-driver")
    git(workdir, "add", ".gitattributes", "merge.kmx")
    git(workdir, "commit", "-qm", "first")
    with open(path, "w") as f:
        f.write(MERGE.format(in04=0.6, method="lerp"))
    os.makedirs(workdir / "sub")
    shown = git(workdir / "sub", "diff")  # from a subfolder: git runs drivers at the top
    assert "kmx diff a/merge.kmx b/merge.kmx" in shown
    assert "3 keys in IN04: lincomb coeffs 0.5 → 0.6" in shown
    # A new recipe: git gives /dev/null as its old side.
    recipe(workdir, MERGE.format(in04=0.5, method="lerp").replace("out/m", "out/n"), "n.kmx")
    git(workdir, "add", "n.kmx")
    assert "out/n.safetensors: new save (60 keys)" in git(workdir, "diff", "--cached")


def test_a_change_over_many_loose_keys_names_a_few_and_counts_the_rest():
    from karmixlang.plan.diff import describe_keys

    loose = [f"k{i}.w" for i in range(6)] + ["model.diffusion_model.out.0.weight"]
    assert describe_keys(loose, None) == "k0.w, k1.w, k2.w, 4 other keys"
    assert describe_keys(loose[:3], None) == "k0.w, k1.w, k2.w"
