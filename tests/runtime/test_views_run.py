"""Inputs in other namings merged with single-file ones: the result equals the numpy formula
on the canonical keys (fused q/k/v, the Flux norm_out swap, transposed and reshaped keys
included), in memory, out of core, and from a serialized executable."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import recipe
from safetensors.numpy import load_file

from karmixlang.api import compile as compile_recipe
from karmixlang.demo.synth import make_model, write_model
from karmixlang.plan.executable import Executable
from karmixlang.runtime.executor import RunOptions, execute
from tests.foreign import component

SCALE = 1 / 64


def run(path, **kw):
    compiled = compile_recipe(path, threads=1, memory_limit=kw.get("memory_limit"))
    execute(compiled, RunOptions(threads=1, **kw))
    return compiled


@pytest.fixture(scope="module")
def sdxl():
    x = make_model("sdxl", SCALE, 0, dtype="float32")
    y = make_model("sdxl", SCALE, 1, dtype="float32", base=x, delta_scale=0.5)
    return x, y


def test_diffusers_and_hf_components_merge_with_a_single_file_model(workdir, sdxl):
    x, y = sdxl
    write_model(workdir / "x.safetensors", x)
    write_model(workdir / "u.safetensors", component(y, "sdxl", "unet", "diffusers"))
    write_model(workdir / "g.safetensors", component(y, "sdxl", "clip_g", "hf"))
    write_model(workdir / "v.safetensors", component(y, "sdxl", "vae", "diffusers"))
    path = recipe(workdir, """
        model x = "x.safetensors"
        model u = "u.safetensors"
        model g = "g.safetensors"
        model v = "v.safetensors"
        save "out.safetensors" = 0.3*select(x, "model.*") + 0.7*u
        # HF's text encoder has no logit_scale: the rest of OpenCLIP's keys
        let te2 = exclude(select(x, "conditioner.embedders.1.*"), "*logit_scale")
        save "te.safetensors" = lerp(te2, g, 0.25)
        save "vae.safetensors" = select(x, "first_stage_model.*") | v
    """)
    run(path)
    out, te, vae = (load_file(workdir / f"{n}.safetensors") for n in ("out", "te", "vae"))
    prefixes = ("model.diffusion_model.", "conditioner.embedders.1.", "first_stage_model.")
    for got, prefix in zip((out, te, vae), prefixes):
        assert set(got) == {k for k in x if k.startswith(prefix)} - {
            "conditioner.embedders.1.model.logit_scale"}  # not in the HF file
    for k in out:
        want = 0.3 * x[k].astype(np.float64) + 0.7 * y[k]
        np.testing.assert_allclose(out[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
    for k in te:
        want = x[k] + 0.25 * (y[k].astype(np.float64) - x[k])
        np.testing.assert_allclose(te[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
    for k in vae:
        np.testing.assert_array_equal(vae[k], y[k], err_msg=k)


def test_flux_diffusers_transformer_fused_and_swapped_keys(workdir):
    f = make_model("flux", SCALE, 0, dtype="float32")
    g = make_model("flux", SCALE, 1, dtype="float32", base=f, delta_scale=0.5)
    write_model(workdir / "f.safetensors", f)
    write_model(workdir / "d.safetensors", component(g, "flux", "unet", "diffusers"))
    path = recipe(workdir, """
        model f = "f.safetensors"
        model d = "d.safetensors"
        save "out.safetensors" = 0.5*select(f, "model.*") + 0.5*d
    """)
    compiled = run(path)
    out = load_file(workdir / "out.safetensors")
    assert set(out) == {k for k in f if k.startswith("model.")}
    for k in out:
        want = (f[k].astype(np.float64) + g[k]) / 2
        np.testing.assert_allclose(out[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
    view = compiled.plan.data["inputs"][1]["view"]
    assert view["fused"] == 2 * (19 * 2 + 38) + 2  # qkv img/txt, linear1, adaLN (w+b)


def test_views_read_the_same_out_of_core_and_from_a_serialized_executable(workdir, sdxl):
    x, y = sdxl
    write_model(workdir / "x.safetensors", x)
    write_model(workdir / "g.safetensors", component(y, "sdxl", "clip_g", "hf"))
    write_model(workdir / "f.safetensors", make_model("flux", SCALE, 0, dtype="float32"))
    write_model(workdir / "d.safetensors", component(make_model("flux", SCALE, 2,
                                                                dtype="float32"),
                                                     "flux", "unet", "diffusers"))
    # a few keys of each kind: fused, transposed, renamed
    path = recipe(workdir, """
        model x = "x.safetensors"
        model g = "g.safetensors"
        def keys(m) = select(m, "*.resblocks.0.attn.*", "*text_projection", "*.ln_final.*")
        save "te.safetensors" = lerp(keys(x), keys(g), 0.25)
    """)
    flux = recipe(workdir, """
        model f = "f.safetensors"
        model d = "d.safetensors"
        def keys(m) = select(m, "*double_blocks.0.*", "*single_blocks.0.*", "*final_layer.*")
        save "fl.safetensors" = 0.5*keys(f) + 0.5*keys(d)
    """, name="flux.kmx")
    for p in (path, flux):
        compiled = run(p)
        exe = compiled.schedule.executable
        assert Executable.loads(exe.dumps()) == exe  # the virtual tensors travel as data
    whole = {n: (workdir / n).read_bytes() for n in ("te.safetensors", "fl.safetensors")}
    for p in (path, flux):
        compiled = run(p, memory_limit=1, force=True)
        assert any(j.ooc for j in compiled.schedule.jobs)  # fused keys were chunked
    for name, data in whole.items():
        assert (workdir / name).read_bytes() == data, name


def test_a_standalone_sd15_vae_bakes_in(workdir):
    base = make_model("sd1", SCALE, 0, dtype="float32")
    vae = {k[len("first_stage_model."):]: v * 3 for k, v in base.items()
           if k.startswith("first_stage_model.")}  # the real SD1.5 VAE file's key names
    write_model(workdir / "base.safetensors", base)
    write_model(workdir / "vae.safetensors", vae)
    path = recipe(workdir, """
        base b = "base.safetensors"
        model v = "vae.safetensors"
        save "baked.safetensors" = b | select(v, "first_stage_model.*")
    """)
    run(path)
    out = load_file(workdir / "baked.safetensors")
    assert set(out) == set(base)
    for k, a in base.items():
        np.testing.assert_array_equal(out[k], a * 3 if k.startswith("first_stage_model.") else a)
