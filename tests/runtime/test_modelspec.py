"""modelspec.* metadata on outputs (the Stability AI model spec, as A1111, ComfyUI and Civitai
read it): fields present and well-formed on SDXL- and SD1.5-layout outputs, the hash equal to
hashlib's SHA-256 of the bytes after the header (file by file when sharded), what the recipe's
metadata may set, reproducible bytes, the date from SOURCE_DATE_EPOCH."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
from safetensors import safe_open

import lora_np as L
from karmixlang.api import compile as compile_recipe, verify
from karmixlang.demo.synth import load_layout, make_model, write_model
from karmixlang.diagnostics import KmxError
from karmixlang.io import modelspec
from karmixlang.io.provenance import OMITTED
from karmixlang.runtime.executor import RunOptions, execute

from conftest import cli, recipe, tiny_models
from vcs_models import write_sdxl_models

MERGE = """
    model a = "a.safetensors"
    model b = "b.safetensors"
    save "out/merge.safetensors" = 0.5*a + 0.5*b{with_}
"""
ISO_8601 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def run(path, **kw):
    execute(compile_recipe(path, threads=1), RunOptions(threads=1, **kw))


def metadata(path) -> dict[str, str]:
    with safe_open(path, "np") as f:
        return f.metadata()


def data_sha256(path) -> str:
    """hashlib's SHA-256 of a safetensors file's bytes after its header."""
    with open(path, "rb") as f:
        raw = f.read()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def write_sd1_models(folder) -> None:
    """Two SD1.5-layout checkpoints: the first keys of each component, shrunk."""
    keys, counts = {}, {}
    for key, spec in load_layout("sd1").items():
        if spec.dtype.startswith("float") and counts.get(spec.component, 0) < 4:
            counts[spec.component] = counts.get(spec.component, 0) + 1
            keys[key] = spec
    for seed, name in enumerate(("a", "b")):
        write_model(folder / f"{name}.safetensors", make_model(keys, 1 / 64, seed=seed))


@pytest.mark.parametrize("layout,arch,resolution", [
    ("sdxl", "stable-diffusion-xl-v1-base", "1024x1024"),
    ("sd1", "stable-diffusion-v1", "512x512"),
])
def test_a_merge_carries_the_spec_fields(workdir, layout, arch, resolution):
    write_sdxl_models(workdir, ("a", "b")) if layout == "sdxl" else write_sd1_models(workdir)
    run(recipe(workdir, MERGE.format(with_="")))
    out = workdir / "out" / "merge.safetensors"
    meta = metadata(out)
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
        "modelspec.implementation": "sgm", "modelspec.resolution": resolution,
        "modelspec.title": "merge", "modelspec.merged_from": "a, b",
        "modelspec.hash_sha256": "0x" + data_sha256(out)}
    assert "kmx_recipe" in meta and "kmx_inputs" in meta  # kmx's own provenance stays


def test_the_recipes_metadata_wins_but_not_over_the_hash(workdir):
    write_sdxl_models(workdir, ("a", "b"))
    run(recipe(workdir, MERGE.format(with_=' with metadata={"modelspec.title": "My Merge", '
                                     '"modelspec.hash_sha256": "0x12", '
                                     '"modelspec.date": "2024-05-01"}')))
    out = workdir / "out" / "merge.safetensors"
    meta = metadata(out)
    assert (meta["modelspec.title"], meta["modelspec.date"]) == ("My Merge", "2024-05-01")
    assert meta["modelspec.hash_sha256"] == "0x" + data_sha256(out)


def test_two_runs_write_identical_bytes_and_the_date_comes_from_source_date_epoch(
        workdir, monkeypatch):
    write_sdxl_models(workdir, ("a", "b"))
    path = recipe(workdir, MERGE.format(with_=""))
    out = workdir / "out" / "merge.safetensors"
    run(path)
    first = out.read_bytes()
    assert "modelspec.date" not in metadata(out)
    run(path, force=True, reuse=False)
    assert out.read_bytes() == first
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1714521600")
    run(path, force=True)
    assert metadata(out)["modelspec.date"] == "2024-05-01T00:00:00Z"
    assert ISO_8601.fullmatch(metadata(out)["modelspec.date"])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(KmxError) as e:
        run(path, force=True)
    assert e.value.diagnostics[0].code == "K0333"


def test_each_shard_records_the_hash_of_its_own_data(workdir):
    write_sdxl_models(workdir, ("a", "b"))
    run(recipe(workdir, MERGE.format(with_=' with shard="8KB"')))
    shards = sorted((workdir / "out").glob("merge-*-of-*.safetensors"))
    assert len(shards) > 1
    hashes = [metadata(s)["modelspec.hash_sha256"] for s in shards]
    assert hashes == ["0x" + data_sha256(s) for s in shards]
    assert len(set(hashes)) == len(hashes)


def test_resume_keeps_a_finished_output_with_its_recorded_hash(workdir):
    write_sdxl_models(workdir, ("a", "b"))
    path = recipe(workdir, MERGE.format(with_=""))
    out = workdir / "out" / "merge.safetensors"
    run(path)
    before = out.stat().st_mtime_ns, out.read_bytes()
    compiled = compile_recipe(path, threads=1)
    assert execute(compiled, RunOptions(threads=1, resume=True)).nothing_to_do
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before


def test_a_delta_and_unknown_keys_carry_no_architecture(workdir, tiny_models_here):
    run(recipe(workdir, """
        model a = "a.safetensors"
        base o = "base.safetensors"
        save "d.safetensors" = a - o with delta=true
        save "m.safetensors" = 0.5*a + 0.5*o
    """))
    for name in ("d", "m"):
        meta = metadata(workdir / f"{name}.safetensors")
        assert "modelspec.architecture" not in meta and "modelspec.sai_model_spec" not in meta
        assert meta["modelspec.title"] == name
        assert meta["modelspec.hash_sha256"] == "0x" + data_sha256(workdir / f"{name}.safetensors")


def test_an_extracted_lora_is_filed_under_its_base_architecture(workdir):
    write_model(workdir / "base.safetensors", L.base_model(L.SDXL_KEYS, 0, ""))
    write_model(workdir / "tuned.safetensors", L.base_model(L.SDXL_KEYS, 1, ""))
    run(recipe(workdir, """
        base b = "base.safetensors"
        model t = "tuned.safetensors"
        save "style.safetensors" = t - b with lora=4
    """))
    meta = metadata(workdir / "style.safetensors")
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"],
            meta["modelspec.title"], meta["modelspec.merged_from"]) == (
        "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
        "style", "tuned, base")
    assert meta["modelspec.hash_sha256"] == "0x" + data_sha256(workdir / "style.safetensors")


@pytest.mark.parametrize("layout,drop,want", [
    ("sd1", None, "stable-diffusion-v1"),
    ("sdxl", None, "stable-diffusion-xl-v1-base"),
    ("flux", None, "flux-1-dev"),
    ("flux", "guidance_in.", "flux-1-schnell"),
])
def test_architecture_of_the_real_layouts(layout, drop, want):
    shapes = {k: s.shape for k, s in load_layout(layout).items() if not (drop and drop in k)}
    arch = modelspec.architecture(shapes)
    assert arch is not None and arch.id == want
    unet_only = {k.removeprefix("model.diffusion_model."): s for k, s in shapes.items()
                 if k.startswith("model.diffusion_model.")}
    assert modelspec.architecture(unet_only).id == want  # a UNet / transformer alone
    vae_only = {k: s for k, s in shapes.items() if k.startswith(("first_stage_model.", "vae."))}
    assert modelspec.architecture(vae_only) is None


def test_with_hash_keeps_the_header_length_and_recorded_hash_reads_it_back():
    header = json.dumps({"__metadata__": {modelspec.HASH_FIELD: modelspec.HASH_PLACEHOLDER}},
                        separators=(",", ":")).encode()
    header = len(header).to_bytes(8, "little") + header
    filled = modelspec.with_hash(header, "ab" * 32)
    assert len(filled) == len(header) and modelspec.recorded_hash(filled) == "ab" * 32
    with pytest.raises(ValueError):
        modelspec.with_hash(filled, "cd" * 32)  # no placeholder left
    assert modelspec.recorded_hash(header[:8] + b"{}") is None


@pytest.fixture
def tiny_models_here(workdir):
    return tiny_models(workdir)


# -- --no-provenance

SHARED = """
    param models = "models"
    model a = "${models}/a.safetensors"
    model b = "${models}/b.safetensors"
    save "../out/m.safetensors" = 0.5*a + 0.5*b
"""


def shared_run(workdir, **kw):
    (workdir / "models").mkdir()
    (workdir / "recipes").mkdir()
    tiny_models(workdir / "models", names=("a", "b"))
    path = recipe(workdir / "recipes", SHARED)
    sets = {"models": str(workdir / "models")}
    compiled = compile_recipe(path, sets, threads=1)
    return path, sets, execute(compiled, RunOptions(threads=1, provenance=False, **kw))


def test_no_provenance_keeps_every_local_path_out_of_the_header(workdir):
    path, sets, _ = shared_run(workdir)
    out = workdir / "out" / "m.safetensors"
    raw = out.read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
    for local in {str(workdir), os.path.realpath(workdir)}:
        assert local not in header
    meta = metadata(out)
    inputs = json.loads(meta["kmx_inputs"])
    assert [i["path"] for i in inputs] == ["a.safetensors", "b.safetensors"]
    assert all(i["hash"].startswith("sha256:") and i["size"] > 0 for i in inputs)
    assert json.loads(meta["kmx_set"]) == {"models": OMITTED}
    assert meta["kmx_recipe"] == open(path).read() and meta["kmx_provenance"] == "omitted"
    assert meta["modelspec.hash_sha256"] == "0x" + data_sha256(out)


def test_no_provenance_output_verifies_with_set_and_is_reused(workdir):
    path, sets, _ = shared_run(workdir)
    out = workdir / "out" / "m.safetensors"
    assert verify(str(out), sets, threads=1).keys == 6
    again = execute(compile_recipe(path, sets, threads=1),
                    RunOptions(threads=1, provenance=False, force=True))
    assert again.reused == 6  # fingerprints name no path


def test_no_provenance_refuses_a_recipe_that_names_a_local_path(workdir, tiny_models_here):
    path = recipe(workdir, f"""
        model a = "{workdir}/a.safetensors"
        save "m.safetensors" = a with dtype="fp16"
    """)
    with pytest.raises(KmxError) as e:
        execute(compile_recipe(path, threads=1), RunOptions(threads=1, provenance=False))
    assert e.value.diagnostics[0].code == "K0334"
    assert not (workdir / "m.safetensors").exists()


# -- the run summary

def test_the_summary_prints_the_inputs_hashes_unless_quiet(workdir, capsys):
    tiny_models(workdir, names=("a", "b"))
    path = recipe(workdir, MERGE.format(with_=""))
    code, out, err = cli(capsys, "run", path, "--threads", "1")
    assert code == 0
    for name in ("a", "b"):
        raw = (workdir / f"{name}.safetensors").read_bytes()
        full = hashlib.sha256(raw).hexdigest()
        line = next(x for x in err.splitlines() if f"input {workdir}/{name}.safetensors" in x
                    or f"input {name}.safetensors" in x)
        assert line.endswith(f"SHA-256 {full} · AutoV2 {full[:10]} · AutoV3 "
                             f"{data_sha256(workdir / f'{name}.safetensors')[:12]}")
    assert "input" not in out  # hashes go to stderr, stdout keeps its `wrote` lines
    code, out, err = cli(capsys, "run", path, "--threads", "1", "--force", "-q")
    assert code == 0 and "input " not in err and "SHA-256" in err  # the output's line stays


def test_the_outputs_hashes_come_without_reading_it_back(workdir, monkeypatch):
    """The data hash is advanced while keys are written and the whole file hashed while it
    is fsynced: neither re-reads a published or partial file, and both are hashlib's."""
    from karmixlang.io import hashes as hashes_module, writer as writer_module

    read = []
    real = hashes_module.compute_hashes

    def recorded(path, *a, **kw):
        read.append(os.path.realpath(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(hashes_module, "compute_hashes", recorded)
    monkeypatch.setattr(writer_module, "data_region_sha256", recorded)
    write_sdxl_models(workdir, ("a", "b"))
    path = recipe(workdir, MERGE.format(with_=' with shard="8KB"'))
    result = execute(compile_recipe(path, threads=2), RunOptions(threads=2))
    shards = sorted(str(p) for p in (workdir / "out").glob("merge-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(result.hashes) == shards
    for shard in shards:
        h = result.hashes[shard]
        assert h.sha256 == hashlib.sha256(open(shard, "rb").read()).hexdigest()
        assert h.data_sha256 == data_sha256(shard)
        assert os.path.realpath(shard) not in read
    assert read  # the inputs were hashed through the same function: the spy works


def test_keys_run_in_the_order_they_lie_in_the_output(workdir, monkeypatch):
    """The run follows the output's data order (widest dtype first), not the schedule's name
    order: one thread hashes every key from its own buffer, none is read back."""
    from karmixlang.io.running_hash import RunningHash

    read_back = []
    real = RunningHash._read_into_digest
    monkeypatch.setattr(RunningHash, "_read_into_digest",
                        lambda self, fd, offset, size: read_back.append(offset)
                        or real(self, fd, offset, size))
    tiny_models(workdir, names=("a", "b"))  # floats, and an int64 key named last
    compiled = compile_recipe(recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = 0.5*a + 0.5*b with dtype="fp16"
    """), threads=1)
    result = execute(compiled, RunOptions(threads=1))
    with open(workdir / "out.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__")
    data_order = sorted(header, key=lambda k: header[k]["data_offsets"])
    assert data_order != sorted(header)  # mixed dtypes: the name order would hold the prefix
    assert [j.key for j in compiled.schedule.jobs] == sorted(header)
    assert read_back == []
    shard = str(workdir / "out.safetensors")
    assert result.hashes[shard].data_sha256 == data_sha256(shard)
