"""Sweeps in one pass (plan/sweep.py, `--sweep`): every point's output is byte for byte the
file a single run with that point's --set values writes (metadata included), every input
tensor is read once for the whole sweep, outputs are named by interpolation or by the
documented suffix, and two points writing one file, an unknown param and a param swept twice
or also --set are coded errors raised before anything is written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections import Counter

import pytest

from karmixlang.api import compile as compile_recipe, compile_sweep, verify
from karmixlang.diagnostics import KmxError
from karmixlang.io import writer as writer_mod
from karmixlang.io.header import read_checkpoint
from karmixlang.runtime import tensors
from karmixlang.runtime.executor import RunOptions, execute

from conftest import cli, recipe, tiny_models
from test_reliability import failing_after

MERGE = """
param alpha = 0.5
param seed = 4
base bm = "base.safetensors"
model a = "a.safetensors"
model b = "b.safetensors"
save "out/m.safetensors" = lerp(bm, a, alpha) + dare(b - bm, 0.5, seed=seed) * 0.3 with dtype="fp16"
"""

GRID = """
param alpha = 0.5
param beta = 0.2
base bm = "base.safetensors"
model a = "a.safetensors"
model c = "c.safetensors"
save "out/i-${alpha}-${beta}.safetensors" = lerp(bm, a, alpha) + (c - bm) * beta
save "out/s-${beta}.safetensors" = lerp(bm, c, alpha) with dtype="bf16"
"""


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def single_run(folder, path, sets: dict, written: str) -> str:
    """The hash of a single run with `sets` (its output moved aside and removed)."""
    execute(compile_recipe(path, sets), RunOptions(threads=1))
    target = os.path.join(folder, written)
    digest = sha(target)
    os.unlink(target)
    return digest


def sweep(path, sweeps, sets=None, **opts):
    return execute(compile_sweep(path, sets, sweeps), RunOptions(**{"threads": 2, **opts}))


@pytest.fixture
def merge(workdir):
    tiny_models(workdir)
    return recipe(workdir, MERGE, "merge.kmx")


def test_a_3_point_sweep_writes_the_files_of_3_single_runs(merge, workdir):
    result = sweep(merge, [("alpha", ["0.3", "0.5", "0.7"])])
    names = [f"out/m.alpha={v}.safetensors" for v in ("0.3", "0.5", "0.7")]
    assert result.outputs == [str(workdir / n) for n in names]
    swept = {v: sha(workdir / n) for v, n in zip(("0.3", "0.5", "0.7"), names)}
    assert len(set(swept.values())) == 3
    for v, digest in swept.items():
        assert single_run(workdir, merge, {"alpha": v}, "out/m.safetensors") == digest
    meta = read_checkpoint(str(workdir / names[0])).metadata
    assert json.loads(meta["kmx_set"]) == {"alpha": "0.3"}
    assert json.loads(meta["kmx_graph"])["save"]["path"] == "out/m.safetensors"
    assert meta["modelspec.title"] == "m"  # the single run's: the recipe's name for the save
    # what the output records is its own point: kmx verify recomputes it from that
    assert verify(str(workdir / names[0]), threads=1).keys


def test_a_2x2_grid_names_by_interpolation_and_by_suffix(workdir):
    tiny_models(workdir)
    path = recipe(workdir, GRID, "grid.kmx")
    sweep(path, [("alpha", ["0.3", "0.6"]), ("beta", ["1", "2.5"])])
    swept = {p.name: sha(p) for p in (workdir / "out").iterdir()}
    assert len(swept) == 8
    for p in (workdir / "out").iterdir():
        p.unlink()
    for alpha in ("0.3", "0.6"):
        for beta in ("1", "2.5"):
            sets = {"alpha": alpha, "beta": beta}
            # interpolated: no suffix; the other save interpolates beta only: alpha's suffix
            interp = f"i-{alpha}-{beta}.safetensors"
            assert single_run(workdir, path, sets, "out/" + interp) == swept[interp]
            assert sha(workdir / f"out/s-{beta}.safetensors") == \
                swept[f"s-{beta}.alpha={alpha}.safetensors"]
            os.unlink(workdir / f"out/s-{beta}.safetensors")


def test_a_swept_input_records_its_own_points_inputs(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        param donor = "a"
        base bm = "base.safetensors"
        model x = "${donor}.safetensors"
        save "out/m.safetensors" = lerp(bm, x, 0.4)
    """, "donor.kmx")
    sweep(path, [("donor", ["a", "c"])])
    swept = {v: sha(workdir / f"out/m.donor={v}.safetensors") for v in ("a", "c")}
    for v, digest in swept.items():
        assert single_run(workdir, path, {"donor": v}, "out/m.safetensors") == digest
    inputs = json.loads(read_checkpoint(str(workdir / "out/m.donor=c.safetensors"))
                        .metadata["kmx_inputs"])
    assert [os.path.basename(i["path"]) for i in inputs] == ["base.safetensors",
                                                             "c.safetensors"]


def test_the_grid_suffix_joins_the_params_in_sweep_order(merge, workdir):
    compiled = compile_sweep(merge, {}, [("seed", ["1", "2"]), ("alpha", ["0.5"])])
    assert [os.path.relpath(s.path, workdir) for s in compiled.graph.saves] == [
        "out/m.seed=1.alpha=0.5.safetensors", "out/m.seed=2.alpha=0.5.safetensors"]


def test_every_input_tensor_is_read_once_for_the_whole_sweep(merge, workdir, monkeypatch):
    reads = Counter()
    original = tensors.Reader.read

    def counting(self, info, into=None):
        reads[(os.path.basename(info.file), info.name)] += 1
        return original(self, info, into)

    monkeypatch.setattr(tensors.Reader, "read", counting)
    result = sweep(merge, [("alpha", ["0.3", "0.5", "0.7"]), ("seed", ["1", "2"])])
    assert len(result.outputs) == 6
    assert reads and set(reads.values()) == {1}, reads
    assert {f for f, _ in reads} == {"base.safetensors", "a.safetensors", "b.safetensors"}
    single = compile_recipe(merge).plan.data["totals"]["bytes_read"]
    assert result.bytes_read == single


def test_two_points_writing_one_file_is_K0517_before_anything_is_written(merge, workdir):
    with pytest.raises(KmxError) as exc:
        sweep(merge, [("alpha", ["0.3", "0.3"])])
    assert [d.code for d in exc.value.diagnostics] == ["K0517"]
    assert "alpha=0.3 and at alpha=0.3" in exc.value.diagnostics[0].message
    assert not os.path.exists(workdir / "out")


@pytest.mark.parametrize("sweeps,sets,code", [
    ([("alpah", ["0.3"])], {}, "K0518"),
    ([("alpha", ["0.3"]), ("alpha", ["0.5"])], {}, "K0519"),
    ([("alpha", ["0.3"])], {"alpha": "0.4"}, "K0519"),
    ([("alpha", ["0.3", "x"])], {}, "K0211"),  # typed like --set
])
def test_bad_sweeps_are_coded_errors(merge, sweeps, sets, code):
    with pytest.raises(KmxError) as exc:
        compile_sweep(merge, sets, sweeps)
    assert exc.value.diagnostics[0].code == code


def test_a_rerun_needs_force_and_then_reuses_every_key(merge, workdir):
    grid = [("alpha", ["0.3", "0.7"])]
    sweep(merge, grid)
    before = [sha(p) for p in sorted((workdir / "out").iterdir())]
    with pytest.raises(KmxError) as exc:
        sweep(merge, grid)
    assert exc.value.diagnostics[0].code == "K0306"
    result = sweep(merge, grid, force=True)
    assert result.reused == result.keys
    assert [sha(p) for p in sorted((workdir / "out").iterdir())] == before


def test_an_interrupted_sweep_resumes_each_output_from_its_own_point(merge, workdir,
                                                                    monkeypatch):
    grid = [("alpha", ["0.3", "0.7"])]
    sweep(merge, grid)
    clean = {p.name: sha(p) for p in (workdir / "out").iterdir()}
    for p in (workdir / "out").iterdir():
        p.unlink()
    monkeypatch.setattr(writer_mod, "_pwrite_all", failing_after(7, errno.ENOSPC))
    with pytest.raises(KmxError) as exc:
        sweep(merge, grid, threads=1)
    assert exc.value.diagnostics[0].code == "K0402"
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / ".cache"))
    stamp = json.loads((workdir / "out/.m.alpha=0.7.safetensors.kmx-inputs").read_text())
    assert stamp["set"] == {"alpha": "0.7"}
    with pytest.raises(KmxError) as exc:  # another grid is another run
        sweep(merge, [("alpha", ["0.3", "0.7"])], {"seed": "5"}, resume=True)
    assert exc.value.diagnostics[0].code == "K0404"
    result = sweep(merge, grid, resume=True)
    assert result.skipped > 0
    assert {p.name: sha(p) for p in (workdir / "out").iterdir() if not p.name.startswith(".")} \
        == clean


def test_the_plan_shows_the_grid_bytes_and_memory(merge, workdir, capsys):
    code, out, err = cli(capsys, "plan", merge, "--json", "--sweep", "alpha=0.3,0.7",
                         "--sweep", "seed=1,2")
    assert code == 0, err
    data = json.loads(out)
    grid = data["sweep"]
    assert grid["params"] == [{"name": "alpha", "values": ["0.3", "0.7"]},
                              {"name": "seed", "values": ["1", "2"]}]
    assert [p["set"] for p in grid["points"]] == [
        {"alpha": a, "seed": s} for a in ("0.3", "0.7") for s in ("1", "2")]
    assert [p["saves"] for p in grid["points"]] == [[0], [1], [2], [3]]
    assert data["saves"][3]["path"] == "out/m.alpha=0.7.seed=2.safetensors"
    single = compile_recipe(merge).plan.data["totals"]
    assert data["totals"]["bytes_read"] == single["bytes_read"]
    assert grid["bytes_read_separately"] == 4 * single["bytes_read"]
    assert data["totals"]["peak_memory_bytes"] >= single["peak_memory_bytes"]
    code, text, err = cli(capsys, "plan", merge, "--sweep", "alpha=0.3,0.7")
    assert code == 0, err
    assert "Sweep (alpha (2): 2 points, 2 files):" in text
    assert "  alpha=0.7  out/m.alpha=0.7.safetensors" in text
    assert "as 2 single runs:" in text
    code, _, err = cli(capsys, "run", merge, "--sweep", "alpha")
    assert code == 2 and "--sweep expects NAME=VALUE,VALUE,..." in err
