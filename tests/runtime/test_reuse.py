"""Re-merging only what changed (runtime/reuse.py): a run that replaces an earlier kmx output
copies the keys whose fingerprint is unchanged and computes the rest; the file is
bit-identical to a clean run of the same recipe to the same path (the metadata holds the
recipe text and the output path, so the clean run is made with both the same), with
--threads, out of core and --no-reuse alike; the earlier output survives a failed run."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.blocks import slot_of
from karmixlang.diagnostics import KmxError
from karmixlang.io.header import read_checkpoint
from karmixlang.plan.fingerprint import FP_HEX, NO_FINGERPRINT
from karmixlang.runtime.executor import RunOptions, execute
from karmixlang.runtime.outputs import recorded_fingerprints as recorded

from conftest import recipe, tiny_models
from vcs_models import write_sdxl_models

MERGE = """
base sdxl = "base.safetensors"
model a = "a.safetensors"
model b = "b.safetensors"
let w = blocks("sdxl", BASE=0.2, IN04={in04}, OUT02=0.7, default=0.4)
save "out/m.safetensors" = lerp(sdxl, a, 0.3) + dare(b - sdxl, 0.5, seed=4) * w
"""
OUT = "out/m.safetensors"


def run(path, memory_limit=None, **kw):
    return execute(compile_recipe(path, memory_limit=memory_limit),
                   RunOptions(threads=kw.pop("threads", 1), **kw))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def clean_run(folder, path, memory_limit=None) -> str:
    """The hash of a clean run of `path` to its own output path (the earlier file set aside
    and put back)."""
    out = os.path.join(folder, OUT)
    aside = out + ".aside"
    os.replace(out, aside)
    try:
        result = run(path, memory_limit)
        assert result.reused == 0
        return sha(out)
    finally:
        os.replace(aside, out)


@pytest.fixture
def models(workdir):
    return write_sdxl_models(workdir)


@pytest.mark.parametrize("threads,limit", [(1, None), (3, None), (2, 4096)])
def test_a_block_edit_recomputes_that_block_only_and_matches_a_clean_run(
        models, workdir, threads, limit):
    path = recipe(workdir, MERGE.format(in04=0.5), "merge.kmx")
    compiled = compile_recipe(path, memory_limit=limit)
    if limit:  # the point: some keys run in chunks
        assert any(j.ooc for j in compiled.schedule.jobs)
    run(path, limit, threads=threads)
    recipe(workdir, MERGE.format(in04=0.6), "merge.kmx")
    result = run(path, limit, threads=threads, force=True)
    in04 = {k for k in models["base"] if slot_of("sdxl", k) == "IN04"}
    assert result.keys == 60 and result.reused == 60 - len(in04) and in04
    assert sha(workdir / OUT) == clean_run(workdir, path, limit)


def test_no_reuse_computes_every_key_to_the_same_bytes(models, workdir):
    path = recipe(workdir, MERGE.format(in04=0.5), "merge.kmx")
    run(path)
    first = sha(workdir / OUT)
    again = run(path, force=True)
    assert again.reused == 60 and sha(workdir / OUT) == first
    assert run(path, force=True, reuse=False).reused == 0 and sha(workdir / OUT) == first


def test_the_metadata_records_one_fingerprint_per_key_in_key_order(models, workdir):
    path = recipe(workdir, MERGE.format(in04=0.5), "merge.kmx")
    run(path)
    header = read_checkpoint(str(workdir / OUT))
    field = json.loads(header.metadata["kmx_fingerprints"])
    assert field["version"] == 1 and field["hex"] == FP_HEX and field["keys"] == "sorted"
    assert len(field["fingerprints"]) == FP_HEX * 60
    fps = recorded(header)
    assert sorted(fps) == sorted(models["base"]) and NO_FINGERPRINT not in fps.values()


def test_an_input_changed_on_disk_is_never_reused(workdir):
    tiny_models(workdir)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'model c = "c.safetensors"\n'
                  'save "out/m.safetensors" = lerp(o, a, 0.3) + select(c - o, "model.w") * 0.5\n',
                  "merge.kmx")
    run(path)
    # c changes (same path, same header): only the key that reads it is recomputed.
    tiny_models(workdir, names=("c",), seed=9)
    result = run(path, force=True)
    assert result.reused == result.keys - 1
    assert sha(workdir / OUT) == clean_run(workdir, path)


def test_a_failed_run_leaves_the_earlier_output_as_it_was(workdir):
    tiny_models(workdir)
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/m.safetensors" = lerp(o, a, 0.3)\n', "merge.kmx")
    run(path)
    before = sha(workdir / OUT)
    bad = np.ones((6, 5), np.float32)
    bad[1, 1] = np.nan
    tiny_models(workdir, names=("a",), extra={"a": {"model.w": bad}})
    with pytest.raises(KmxError) as exc:
        run(path, force=True)
    assert exc.value.diagnostics[0].code == "K0401"
    assert sha(workdir / OUT) == before  # the finished keys wait in the partial file


def test_a_key_copied_from_a_fallback_is_recorded_as_never_reusable(workdir):
    bad = np.ones((6, 5), np.float32)
    bad[1, 1] = np.nan
    tiny_models(workdir, extra={"a": {"model.w": bad}})
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/m.safetensors" = lerp(o, a, 0.3)\n', "merge.kmx")
    first = run(path, nonfinite="fallback")
    assert first.fallbacks == ["model.w"]
    assert recorded(read_checkpoint(str(workdir / OUT)))["model.w"] == NO_FINGERPRINT
    # Without the fallback policy the key is an error again, not silently reused.
    with pytest.raises(KmxError) as exc:
        run(path, force=True)
    assert exc.value.diagnostics[0].code == "K0401"
    again = run(path, force=True, nonfinite="fallback")
    assert again.reused == again.keys - 1
    # --resume keeps the finished file: its header records the key it took from the fallback.
    before = sha(workdir / OUT)
    assert run(path, resume=True, nonfinite="fallback").nothing_to_do
    assert sha(workdir / OUT) == before


def test_an_output_kmx_did_not_write_is_computed_whole(workdir):
    from karmixlang.demo.synth import write_model

    models = tiny_models(workdir)
    os.makedirs(workdir / "out")
    write_model(workdir / OUT, models["base"])  # no fingerprints
    path = recipe(workdir, 'base o = "base.safetensors"\nmodel a = "a.safetensors"\n'
                  'save "out/m.safetensors" = lerp(o, a, 0.3)\n', "merge.kmx")
    assert run(path, force=True).reused == 0
