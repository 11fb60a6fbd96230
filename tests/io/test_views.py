"""io/views + plan/views: other namings read as the single-file one, from headers only.

A canonical synthetic checkpoint (real key layouts, shrunk) is rewritten in another naming by
tests/foreign.py; the view kmx builds from its header must give back every canonical tensor
byte for byte — read here with numpy from the view's byte ranges, independently of the
runtime's Reader."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import recipe

from karmixlang.api import compile
from karmixlang.demo.synth import make_model, write_model
from karmixlang.diagnostics import KmxError
from karmixlang.io import views
from karmixlang.io.header import CheckpointHeader, TensorInfo, read_checkpoint
from karmixlang.io.layouts import PREFIX
from karmixlang.plan.report import render_text
from karmixlang.plan.views import naming_of
from tests.foreign import component

SCALE = 1 / 64  # keeps q/k/v (3:1) and Flux's linear1 (7:1) divisible


@pytest.fixture(scope="module")
def models():
    return {arch: make_model(arch, SCALE, 0, dtype="float32") for arch in ("sdxl", "flux", "sd1")}


def numpy_read(info: TensorInfo) -> np.ndarray:
    """A view's tensor, read with numpy from its byte ranges."""
    raw = b"".join(_bytes(s.file)[s.begin:s.end] for s in info.segments)
    a = np.frombuffer(raw, dtype={"F32": np.float32, "I64": np.int64}[info.dtype])
    return a.reshape(info.shape[::-1]).T if info.transpose else a.reshape(info.shape)


_FILES: dict[str, bytes] = {}


def _bytes(path: str) -> bytes:
    if path not in _FILES:
        _FILES.clear()
        with open(path, "rb") as f:
            _FILES[path] = f.read()
    return _FILES[path]


@pytest.mark.parametrize("arch,comp,form", [
    ("sdxl", "unet", "diffusers"), ("sdxl", "vae", "diffusers"), ("sdxl", "clip_g", "hf"),
    ("sdxl", "clip_l", "hf"), ("flux", "unet", "diffusers"), ("sd1", "unet", "diffusers"),
    ("sd1", "vae", "ldm"), ("flux", "unet", "bfl")])
def test_a_component_file_reads_back_as_the_canonical_tensors(tmp_path, models, arch, comp, form):
    canonical = models[arch]
    path = write_model(tmp_path / "c.safetensors", component(canonical, arch, comp, form))
    header = read_checkpoint(str(path))
    naming = naming_of(header)
    viewed, report = views.canonical(header, naming, arch, None)
    prefix = PREFIX[arch][comp]
    expected = {k for k in canonical if k.startswith(prefix) and not k.endswith("logit_scale")}
    assert set(viewed.tensors) == expected and report.dropped == ()
    for key, info in viewed.tensors.items():
        assert info.shape == canonical[key].shape, key
        np.testing.assert_array_equal(numpy_read(info), canonical[key], err_msg=key)
    assert viewed.total_bytes == sum(canonical[k].nbytes for k in expected)


def test_report_counts_and_a_prefix_stripped_view(tmp_path, models):
    arrays = component(models["sdxl"], "sdxl", "clip_g", "hf")
    header = read_checkpoint(str(write_model(tmp_path / "g.safetensors", arrays)))
    _, report = views.canonical(header, naming_of(header), "sdxl", None)
    assert (report.fused, report.transposed) == (64, 1)  # q/k/v weight+bias x 32 layers
    full = read_checkpoint(str(write_model(tmp_path / "x.safetensors", models["sdxl"])))
    prefix = "model.diffusion_model."
    stripped, report = views.canonical(full, naming_of(full), "sdxl", None, strip=prefix)
    assert set(stripped.tensors) == {k[len(prefix):] for k in models["sdxl"]
                                     if k.startswith(prefix)}
    assert len(report.dropped) == len(models["sdxl"]) - len(stripped.tensors)


def test_incomplete_or_mismatched_fused_keys_are_K0313(tmp_path, models):
    arrays = component(models["flux"], "flux", "unet", "diffusers")
    del arrays["transformer_blocks.2.attn.to_k.weight"]
    header = read_checkpoint(str(write_model(tmp_path / "f.safetensors", arrays)))
    with pytest.raises(KmxError) as e:
        views.canonical(header, naming_of(header), "flux", None)
    d = e.value.diagnostics[0]
    assert d.code == "K0313" and "double_blocks.2.img_attn.qkv.weight" in d.message
    arrays = component(models["flux"], "flux", "unet", "diffusers")
    arrays["transformer_blocks.0.attn.to_v.bias"] = arrays["transformer_blocks.0.attn.to_v.bias"][:5]
    header = read_checkpoint(str(write_model(tmp_path / "g.safetensors", arrays)))
    with pytest.raises(KmxError, match="do not fit"):
        views.canonical(header, naming_of(header), "flux", None)


def test_rename_view_and_its_collision_error(tmp_path):
    infos = {k: TensorInfo(k, "F32", (1,), "f", i * 4, i * 4 + 4)
             for i, k in enumerate(["a.x", "a.y", "b.x"])}
    h = CheckpointHeader("m.safetensors", infos, {}, ("f",), 12)
    out = views.rename(h, r"^a\.(\w)$", r"c.\1", None)
    assert list(out.tensors) == ["b.x", "c.x", "c.y"]
    assert out.tensors["c.x"].name == "a.x"  # the name in its file, for messages
    with pytest.raises(KmxError) as e:
        views.rename(h, r"\.\w$", "", None)
    assert e.value.diagnostics[0].code == "K0314"
    assert "`a.x` and `a.y`" in e.value.diagnostics[0].message


# ------------------------------------------------------------------ the reference rule

def _write(workdir, models, **files):
    for name, arrays in files.items():
        write_model(workdir / f"{name}.safetensors", arrays)


def test_plan_reads_a_diffusers_unet_as_the_base_naming_and_says_so(workdir, models):
    _write(workdir, models, x=models["sdxl"], u=component(models["sdxl"], "sdxl", "unet",
                                                            "diffusers"))
    path = recipe(workdir, '''
        base x = "x.safetensors"
        model u = "u.safetensors"
        save "out.safetensors" = 0.5*x + 0.5*u
        ''')
    c = compile(path)
    text = render_text(c.plan)
    assert "read as SDXL single-file from diffusers UNet (SDXL): 1680 renamed" in text
    view = c.plan.data["inputs"][1]["view"]
    assert (view["read_as"], view["renamed"], view["dropped"]) == ("SDXL single-file", 1680, 0)
    computed = c.plan.data["saves"][0]["computed"]
    assert computed == sum(1 for k in models["sdxl"] if k.startswith("model.diffusion_model."))


@pytest.mark.parametrize("text,code", [
    ('base a = "x.safetensors"\nmodel b = "s.safetensors"\n'
     'save "o.safetensors" = 0.5*a + 0.5*b\n', "K0312"),
    ('base u = "u.safetensors"\nmodel a = "x.safetensors"\n'
     'save "o.safetensors" = 0.5*u + 0.5*a\n', "K0315"),
    ('model a = "x.safetensors"\nmodel u = "u.safetensors"\n'
     'save "o.safetensors" = 0.5*a + 0.5*u\nsave "p.safetensors" = u\n', "K0316"),
])
def test_namings_that_cannot_be_read_together_are_one_coded_error(workdir, models, text, code):
    _write(workdir, models, x=models["sdxl"], s=models["sd1"],
           u=component(models["sdxl"], "sdxl", "unet", "diffusers"))
    with pytest.raises(KmxError) as e:
        compile(recipe(workdir, text))
    assert [d.code for d in e.value.diagnostics] == [code]
    if code == "K0312":
        msg = e.value.diagnostics[0].message
        assert "SDXL single-file" in msg and "SD1.x single-file" in msg and "s.safetensors" in msg


def test_a_diffusers_component_folder_is_an_input(workdir, models):
    # the layout of a diffusers repository's unet/ folder, named by the folder
    (workdir / "unet").mkdir()
    write_model(workdir / "unet" / "diffusion_pytorch_model.safetensors",
                component(models["sdxl"], "sdxl", "unet", "diffusers"))
    write_model(workdir / "x.safetensors", models["sdxl"])
    path = recipe(workdir, '''
        base x = "x.safetensors"
        model u = "unet"
        save "out.safetensors" = 0.5*x + 0.5*u
        ''')
    view = compile(path).plan.data["inputs"][1]["view"]
    assert view["naming"] == "diffusers UNet (SDXL)" and view["renamed"] == 1680
