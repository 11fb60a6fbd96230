"""`kmx lock` and the lock check of `kmx plan`/`kmx run`: the lock's exact content (against
hashlib), refusing a stale lock without writing, --update, and a run that refuses a changed
input at plan time (size) or while it reads (same size, other bytes) without publishing."""

from __future__ import annotations

import hashlib
import json
import os

from karmixlang import __version__
from conftest import cli, recipe, tiny_models

TEXT = """
    base o = "models/base.safetensors"
    model a = "models/a.safetensors"
    save "out.safetensors" = lerp(o, a, 0.5)
"""


def kmx(capsys, *argv) -> tuple[int, str]:
    code, out, err = cli(capsys, *argv)
    return code, out + err


def project(workdir) -> str:
    (workdir / "models").mkdir()
    tiny_models(workdir / "models", names=("base", "a"))
    return recipe(workdir, TEXT, "merge.kmx")


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_lock_lists_each_input_sorted_with_its_sha256(workdir, capsys):
    path = project(workdir)
    rc, out = kmx(capsys, "lock", path)
    assert rc == 0 and "written (2 inputs)" in out
    text = open(path + ".lock").read()
    models = workdir / "models"
    expected = {"kmx_lock": 1, "kmx_version": __version__, "inputs": [
        {"path": f"models/{n}.safetensors", "resolved": str(models / f"{n}.safetensors"),
         "size": os.path.getsize(models / f"{n}.safetensors"),
         "sha256": sha(models / f"{n}.safetensors")} for n in ("a", "base")]}
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert kmx(capsys, "lock", path) == (0, f"{path}.lock: up to date (2 inputs)\n")
    assert "lock: every input matches" in kmx(capsys, "plan", path)[1]


def test_a_stale_lock_is_reported_and_kept_until_update(workdir, capsys):
    path = project(workdir)
    kmx(capsys, "lock", path)
    before = open(path + ".lock").read()
    tiny_models(workdir / "models", names=("a",), seed=5)  # same size, other bytes
    rc, out = kmx(capsys, "lock", path)
    assert rc == 1 and "K0513" in out and "models/a.safetensors`: SHA-256" in out
    assert open(path + ".lock").read() == before
    rc, out = kmx(capsys, "lock", "--update", path)
    assert rc == 0 and "updated" in out
    assert sha(workdir / "models/a.safetensors") in open(path + ".lock").read()


def test_a_run_refuses_an_input_of_another_size_before_reading(workdir, capsys):
    path = project(workdir)
    kmx(capsys, "lock", path)
    data = (workdir / "models/a.safetensors").read_bytes()
    (workdir / "models/a.safetensors").write_bytes(data + b"\0")
    for command in ("plan", "run"):
        rc, out = kmx(capsys, command, path)
        assert rc == 1 and "K0511" in out and "bytes, the lock says" in out
    assert not (workdir / "out.safetensors").exists()
    assert kmx(capsys, "run", "--no-lock", "-q", path)[0] == 0  # trailing bytes: still valid


def test_a_changed_input_of_the_same_size_aborts_the_run_unpublished(workdir, capsys):
    path = project(workdir)
    kmx(capsys, "lock", path)
    locked = sha(workdir / "models/a.safetensors")
    tiny_models(workdir / "models", names=("a",), seed=9)  # not in the hash cache yet
    rc, out = kmx(capsys, "run", "-q", path)
    assert rc == 1 and "K0511" in out and locked in out and sha(
        workdir / "models/a.safetensors") in out and "nothing was published" in out
    assert sorted(os.listdir(workdir)) == [".cache", "merge.kmx", "merge.kmx.lock", "models"]
    # Now the hash is cached: the plan refuses it without reading a tensor.
    rc, out = kmx(capsys, "plan", path)
    assert rc == 1 and "K0511" in out
    assert kmx(capsys, "run", "-q", "--no-lock", path)[0] == 0


def test_inputs_missing_from_the_lock_or_no_longer_read_name_the_fix(workdir, capsys):
    path = project(workdir)
    kmx(capsys, "lock", path)
    recipe(workdir, TEXT.replace('"models/a.safetensors"', '"models/base.safetensors"'),
           "merge.kmx")
    # o and a now name one file: the lock lists a file the recipe does not read
    rc, out = kmx(capsys, "plan", path)
    assert rc == 1 and "K0510" in out and "models/a.safetensors" in out
    assert "kmx lock --update" in out


def test_an_unreadable_lock_is_a_diagnostic(workdir, capsys):
    path = project(workdir)
    open(path + ".lock", "w").write("{not json")
    rc, out = kmx(capsys, "run", "-q", path)
    assert rc == 1 and "K0512" in out
    assert kmx(capsys, "lock", "--update", path)[0] == 0
