"""The header-only schedule and the plan: keys, bytes, fallbacks, errors, renderers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.diagnostics import KmxError
from karmixlang.io.header import read_checkpoint
from karmixlang.plan.report import render_dot, render_text
from karmixlang.demo.synth import make_model, write_model

from conftest import recipe, tiny_models


def test_key_counts_and_bytes_match_the_headers(workdir):
    scale = 1 / 32
    base = make_model("sd1", scale, seed=1)
    write_model(workdir / "base.safetensors", base)
    for i in range(2):
        write_model(workdir / f"ft{i}.safetensors", make_model("sd1", scale, seed=2 + i, base=base))
    path = recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["ft0.safetensors", "ft1.safetensors"]
        save "out.safetensors" = o + mean(pool - o) with dtype="fp16"
    """)
    c = compile_recipe(path)
    hdr = read_checkpoint(str(workdir / "base.safetensors"))
    save = c.plan.data["saves"][0]
    ints = [k for k, t in hdr.tensors.items() if t.dtype.startswith(("I", "U", "BOOL"))]
    assert save["keys"] == len(hdr.tensors)
    assert save["copied"] == len(ints) and save["computed"] == len(hdr.tensors) - len(ints)
    # `o + mean(pool - o)` runs as `mean(pool)` (optimizer `laws`): of the base, only the
    # integer buffers copied from it are read; of the fine-tunes, only the float keys.
    fts = [read_checkpoint(str(workdir / f"ft{i}.safetensors")) for i in range(2)]
    expected_read = sum(hdr.tensors[k].nbytes for k in ints) + sum(t.nbytes for h in fts for k, t in h.tensors.items()
                                          if k not in ints)
    assert c.plan.data["totals"]["bytes_read"] == expected_read
    expected_out = sum(t.nbytes if k in ints else 2 * int(np.prod(t.shape))
                       for k, t in hdr.tensors.items())
    assert save["bytes_written"] == expected_out


def test_fallback_reasons_are_reported(workdir):
    odd = {"c": {"model.w": np.zeros((6, 4), np.float32)}}
    models = tiny_models(workdir, extra=odd)
    write_model(workdir / "short.safetensors",
                {k: v for k, v in models["a"].items() if k != "model.conv"})
    path = recipe(workdir, """
        base o = "base.safetensors"
        save "out.safetensors" = lerp(o, lerp("short.safetensors", "c.safetensors", 0.5), 0.5)
    """.replace('lerp("short.safetensors", "c.safetensors", 0.5)',
                'mean(["short.safetensors", "c.safetensors"])'))
    c = compile_recipe(path)
    copied = {e["key"]: e["reason"] for e in c.plan.data["saves"][0]["copied_examples"]}
    assert copied["model.conv"].startswith("missing in short.safetensors")
    assert copied["model.w"].startswith("shapes differ")
    assert copied["pos_ids"].startswith("not a float")
    assert c.plan.data["saves"][0]["fallback_reason"] == "the only base"


def test_missing_key_without_fallback_is_a_plan_error(workdir):
    models = tiny_models(workdir)
    write_model(workdir / "short.safetensors",
                {k: v for k, v in models["a"].items() if k != "model.conv"})
    path = recipe(workdir, """
        model a = "a.safetensors"
        model s = "short.safetensors"
        save "out.safetensors" = lerp(a, s, t=0.5)
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    d = exc.value.diagnostics[0]
    assert d.code in ("K0304", "K0310") and "model.conv" in d.message and d.span.line == 3


def test_output_equal_to_an_input_is_refused(workdir):
    tiny_models(workdir)
    os.symlink(workdir / "a.safetensors", workdir / "link.safetensors")
    for target in ("a.safetensors", "link.safetensors"):
        path = recipe(workdir, f"""
            base o = "base.safetensors"
            model a = "a.safetensors"
            save "{target}" = lerp(o, a, t=0.5)
        """)
        with pytest.raises(KmxError) as exc:
            compile_recipe(path)
        assert exc.value.diagnostics[0].code == "K0305"


def test_missing_file_is_a_coded_error_at_the_recipe_line(workdir):
    path = recipe(workdir, """
        model a = "nope.safetensors"
        model b = "nope2.safetensors"
        save "out.safetensors" = lerp(a, b, t=0.5)
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    assert [(d.code, d.span.line) for d in exc.value.diagnostics] == [("K0301", 1), ("K0301", 2)]


def test_plan_json_schema_and_renderers(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5) | select(a, "vae.*")
    """)
    c = compile_recipe(path)
    data = json.loads(c.plan.to_json())
    assert data["schema_version"] == 1
    assert {"inputs", "nodes", "saves", "totals"} <= set(data)
    assert {"bytes_read", "bytes_written", "peak_memory_bytes"} <= set(data["totals"])
    text = render_text(c.plan)
    assert text.splitlines()[-1].startswith("Plan: 1 file to write (6 keys; 1 copied from fallback)")
    assert text.splitlines()[-1].endswith("nothing executed.")
    dot = render_dot(c.plan)
    assert dot.startswith("digraph kmx {") and "-> save0" in dot


@pytest.mark.parametrize("command", [["plan"], ["plan", "--executor", "ray"], ["check"],
                                     ["fmt", "--check"]])
def test_check_fmt_and_plan_never_import_torch(workdir, command):
    import subprocess
    import sys

    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out.safetensors" = lerp(o, a, t=0.5)
    """)
    code = ("import sys; from karmixlang.cli import main; rc = main(sys.argv[2:] + [sys.argv[1]]);"
            " assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'imported';"
            " sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, path, *command], capture_output=True,
                       text=True)
    assert "imported" not in r.stderr, r.stderr
    assert r.returncode == 0 or command[0] == "fmt" and r.returncode == 1, r.stderr


def test_per_key_numbers_without_a_value_are_plan_errors(workdir):
    tiny_models(workdir)
    path = recipe(workdir, """
        model a = "a.safetensors"
        model b = "b.safetensors"
        save "out.safetensors" = lerp(a, b, t=by_key({"model.*": 0.3})) with fallback=a
    """)
    with pytest.raises(KmxError) as exc:
        compile_recipe(path)
    d = exc.value.diagnostics[0]
    assert d.code == "K0204" and "vae.decoder" in d.message and d.span.line == 3


def test_a_recipe_without_saves_plans_to_do_nothing(workdir):
    path = recipe(workdir, "param x = 1\n")
    c = compile_recipe(path)
    assert c.plan.data["saves"] == [] and c.plan.data["totals"]["bytes_read"] == 0
    assert render_text(c.plan).splitlines()[-1].startswith("Plan: the recipe has no save")
