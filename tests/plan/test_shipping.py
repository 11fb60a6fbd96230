"""A plan that can be shipped: the executable schedule refers to nodes by index, serializes
with a format version and a fingerprint, runs in another process (what a Ray task does,
called here in-process) without the recipe, and execute() never changes it."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.diagnostics import KmxError
from karmixlang.io.dtypes import nbytes
from karmixlang.io.header import read_checkpoint
from karmixlang.plan import compile as compile_stage
from karmixlang.plan.executable import Executable, FormatError, KeyJob
from karmixlang.plan.groups import group_keys
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.runtime.ray.executor import compute_group

from conftest import recipe, tiny_models

MB = 1 << 20
# Two saves, per-key weights, key selection, a random filter per member, a fallback; with
# `big.w` too large for 3 MB, so it is planned out of core.
RECIPE = """
    base o = "base.safetensors"
    model a = "a.safetensors"
    cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
    save "out/x.safetensors" = exclude(lerp(o, a, t=by_key({"model.w": 0.25, "*": 0.5})), "model.bias")
        with fallback=o
    save "out/y.safetensors" = o + median(dare(pool - o, p=0.5, seed=3)) with dtype="fp16"
"""


def shipped_models(folder, nan_in_b=False) -> None:
    rng = np.random.default_rng(1)
    big = {n: {"big.w": rng.normal(size=(256, 256)).astype(np.float16)}
           for n in ("base", "a", "b", "c")}
    if nan_in_b:
        w = rng.normal(size=(6, 5)).astype(np.float32)
        w[2, 3] = np.nan
        big["b"]["model.w"] = w
    tiny_models(folder, extra=big)


def compiled_with_limit(folder, **kw):
    return compile_recipe(recipe(folder, RECIPE), threads=1, memory_limit=3 * MB, **kw)


def test_the_schedule_round_trips_to_an_equal_one_with_the_same_fingerprint(workdir):
    shipped_models(workdir)
    exe = compiled_with_limit(workdir).schedule.executable
    assert [j.key for j in exe.jobs if j.ooc is not None] == ["big.w"]
    text = exe.dumps()
    back = Executable.loads(text)
    assert back == exe and back.fingerprint() == exe.fingerprint() and back.dumps() == text
    doc = json.loads(text)
    assert doc["version"] == 2 and len(doc["fingerprint"]) == 64
    # Plain data, nodes by index: the jobs name rows of the node table.
    steps = {i for j in exe.jobs for i in j.steps}
    assert all(isinstance(i, int) and 0 <= i < len(exe.nodes) for i in steps)
    # A group's part holds its jobs and only the files they read.
    part = exe.part([j for j in exe.jobs if j.key == "big.w"])
    assert [j.key for j in Executable.loads(part.dumps()).jobs] == ["big.w"]
    assert all(f.endswith(".safetensors") for f in part.files) and len(part.files) == 4


def test_a_tampered_or_foreign_schedule_is_refused(workdir):
    shipped_models(workdir)
    exe = compiled_with_limit(workdir).schedule.executable
    doc = exe.to_dict()

    def refused(change) -> str:
        d = copy.deepcopy(doc)
        change(d)
        with pytest.raises(FormatError) as exc:
            Executable.loads(json.dumps(d))
        return str(exc.value)

    def shift_offset(d):
        d["body"]["jobs"][0]["tensors"][0][5] += 4  # read elsewhere in the file

    assert "fingerprint" in refused(shift_offset)
    assert "format 1" in refused(lambda d: d.update(version=1))
    assert "kmx 0.0.0-other" in refused(lambda d: d.update(kmx_version="0.0.0-other"))
    with pytest.raises(FormatError):
        Executable.loads("not json")
    # A Ray task given such a schedule stops the run with K0407 before reading anything.
    d = copy.deepcopy(doc)
    shift_offset(d)
    with pytest.raises(KmxError) as exc:
        compute_group(json.dumps(d), "cpu", "error")
    assert exc.value.diagnostics[0].code == "K0407"
    assert "fingerprint" in exc.value.diagnostics[0].message


def worker_bytes(exe: Executable, nonfinite: str):
    """Every output key's bytes as Ray tasks would compute them, group by group."""
    jobs = {j.key: j for j in exe.jobs}
    got, fallbacks = {}, []
    for group in group_keys(exe.jobs):
        part = exe.part([jobs[k] for k in group.keys]).dumps()
        results, copied = compute_group(part, "cpu", nonfinite)
        assert [k for k, _ in results] == list(group.keys)
        fallbacks += copied
        for key, pieces in results:
            for k, start, data in pieces:
                out = jobs[key].outputs[k]
                buf = got.setdefault((out.save, key), bytearray(nbytes(out.dtype, out.shape)))
                buf[start:start + len(data)] = data
    return got, fallbacks


def file_bytes(exe: Executable) -> dict:
    out = {}
    for i, save in enumerate(exe.saves):
        for key, t in read_checkpoint(save.path).tensors.items():
            with open(t.file, "rb") as f:
                f.seek(t.begin)
                out[(i, key)] = f.read(t.nbytes)
    return out


@pytest.mark.parametrize("nonfinite", ["error", "fallback"])
def test_a_worker_computes_the_local_bytes_without_the_recipe(workdir, monkeypatch, nonfinite):
    shipped_models(workdir, nan_in_b=nonfinite == "fallback")
    compiled = compiled_with_limit(workdir)
    exe = compiled.schedule.executable
    local = execute(compiled, RunOptions(threads=1, nonfinite=nonfinite))
    assert local.fallbacks == (["model.w"] if nonfinite == "fallback" else [])
    # The worker has no recipe to read, and nothing may compile one.
    recipe_path = workdir / "r.kmx"
    recipe_path.unlink()
    monkeypatch.setattr(compile_stage, "check_program", None)
    got, fallbacks = worker_bytes(exe, nonfinite)
    assert fallbacks == local.fallbacks
    want = file_bytes(exe)
    assert set(got) == set(want) and all(bytes(got[k]) == want[k] for k in want)


def snapshot(compiled):
    s = compiled.schedule
    return (copy.deepcopy(s.executable), dict(s.headers), copy.deepcopy(s.copied),
            list(s.save_keys), s.bytes_read, list(s.bytes_written), s.peak_key, s.peak_bytes)


@pytest.mark.parametrize("nonfinite", ["error", "fallback"])
def test_execute_leaves_the_compiled_schedule_unchanged(workdir, nonfinite):
    shipped_models(workdir, nan_in_b=nonfinite == "fallback")
    for compiled in (compiled_with_limit(workdir),  # big.w out of core
                     compile_recipe(str(workdir / "r.kmx"), threads=1)):
        before, text = snapshot(compiled), compiled.schedule.executable.dumps()
        execute(compiled, RunOptions(threads=2, nonfinite=nonfinite, force=True))
        assert snapshot(compiled) == before
        assert compiled.schedule.executable.dumps() == text


def test_fallback_copies_are_planned_per_key(workdir):
    shipped_models(workdir)
    exe = compiled_with_limit(workdir).schedule.executable
    job = next(j for j in exe.jobs if j.key == "model.w")
    # Both saves fall back to o: the copy of the key from o's file is planned with it.
    assert isinstance(job.fallback, KeyJob) and job.no_fallback is None
    copies = job.fallback.outputs
    assert [c.copied for c in copies] == ["non-finite input"] * 2
    assert len({c.node for c in copies}) == 1 and exe.nodes[copies[0].node].op == "load"
    assert job.fallback.steps == (copies[0].node,) and job.fallback.fallback is None
    # A save with no base has no fallback: planned as such, not found out at run time.
    lone = compile_recipe(recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out/z.safetensors" = exclude(mean([a, b]), "pos_ids")
    """, name="z.kmx")).schedule.executable
    assert all(j.fallback is None and j.no_fallback == 0 for j in lone.jobs)
    assert lone.saves[0].written == "out/z.safetensors"


def test_run_options_that_shape_the_plan_must_match_the_compiled_ones(workdir):
    shipped_models(workdir)
    compiled = compiled_with_limit(workdir)
    before = snapshot(compiled)
    for opts in (RunOptions(memory_limit=1 << 30), RunOptions(compute_dtype="fp64")):
        with pytest.raises(ValueError, match="compile"):
            execute(compiled, opts)
    assert snapshot(compiled) == before  # not planned again for the other limit
    assert not os.path.exists(workdir / "out")  # refused before any output is opened
    result = execute(compiled, RunOptions(memory_limit=3 * MB, compute_dtype="fp32"))
    assert result.keys == len(compiled.schedule.jobs)  # the compiled values are accepted
