"""The checkpoints phase one reads are inputs like any other, even when no save reads one
(typically `to=`): the plan lists them, a run refuses one that changes under it (K0410), the
lock pins them, and a re-merge recomputes the keys a permutation moves when one changed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import cli, recipe
from karmixlang.api import compile as compile_recipe
from karmixlang.demo.synth import write_model
from karmixlang.diagnostics import KmxError
from karmixlang.io import writer as writer_mod
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.runtime.rebasin import Perm
from rebasin.test_kmx import write_pair
from rebasin.test_match import apply_all, random_perms, setup
from runtime.test_reliability import on_write

# `a` is only the model `b` is aligned to: no save reads it.
TEXT = """
    model a = "a.safetensors"
    model b = "b.safetensors"
    save "out/x.safetensors" = align(b, to=a)
"""


def rewrite_to(folder, seed: int) -> dict:
    """Rewrite a.safetensors in place as another random permutation of the same model (same
    header, other bytes); b aligned to it is then exactly it."""
    _, state, sized, spec, _ = setup("mlp")
    perms = {n: Perm(p.block, p.inner) for n, p in random_perms(spec, state, seed).items()}
    new = {k: v.float().numpy() for k, v in apply_all(state, sized, perms).items()}
    write_model(os.path.join(folder, "a.safetensors"), new)
    return new


def run(path, **kw):
    return execute(compile_recipe(path), RunOptions(threads=1, **kw))


def test_the_plan_lists_the_model_only_phase_one_reads(workdir, capsys):
    write_pair(workdir, "mlp")
    path = recipe(workdir, TEXT)
    code, out, err = cli(capsys, "plan", path)
    assert code == 0, err
    inputs = out.split("Inputs (2):\n")[1].split("\n\n")[0].splitlines()
    assert inputs[0].startswith("  #1   model b                  b.safetensors  ")
    assert inputs[1].startswith("  -    model a.safetensors      a.safetensors  ")
    assert inputs[2] == "       read by the permutation phase only (no save reads it)"
    code, out, _ = cli(capsys, "plan", path, "--json")
    data = json.loads(out)
    assert [(i["node"], i["path"], i.get("read_by")) for i in data["inputs"]] == [
        (1, "b.safetensors", None), (None, "a.safetensors", "permutation")]
    assert data["totals"]["inputs"] == 2


def test_the_lock_pins_the_model_only_phase_one_reads(workdir, capsys):
    write_pair(workdir, "mlp")
    path = recipe(workdir, TEXT, "merge.kmx")
    code, out, err = cli(capsys, "lock", path)
    assert code == 0 and "written (2 inputs)" in out + err, out + err
    lock = json.load(open(path + ".lock"))
    assert [e["path"] for e in lock["inputs"]] == ["a.safetensors", "b.safetensors"]
    rewrite_to(workdir, 12)
    code, out, err = cli(capsys, "run", path, "-q")
    assert code != 0 and "[K0511]" in out + err and "a.safetensors" in out + err


def test_a_to_model_changed_during_the_run_fails_it_unpublished(workdir, monkeypatch):
    write_pair(workdir, "mlp")
    path = recipe(workdir, TEXT)
    monkeypatch.setattr(writer_mod, "_pwrite_all", on_write(1, lambda: rewrite_to(workdir, 12)))
    with pytest.raises(KmxError) as exc:
        run(path)
    d = exc.value.diagnostics[0]
    assert d.code == "K0410" and "a.safetensors" in d.message
    assert not os.path.exists(workdir / "out" / "x.safetensors")


def test_a_remerge_recomputes_the_keys_a_changed_to_model_moves(workdir, capsys):
    write_pair(workdir, "mlp")
    path = recipe(workdir, TEXT)
    first = run(path)
    assert first.reused == 0
    assert run(path, force=True).reused == first.keys  # nothing changed: all reused
    new = rewrite_to(workdir, 12)
    again = run(path, force=True)
    assert again.reused == 0  # every key of the MLP is permuted
    out = load_file(os.path.join(workdir, "out", "x.safetensors"))
    for k, v in new.items():
        assert np.array_equal(out[k], v), k
    code, out, err = cli(capsys, "verify", os.path.join(workdir, "out", "x.safetensors"))
    assert code == 0, out + err
