"""Synthetic checkpoints: faithful to the packaged layouts, deterministic, and with the cluster
structure that the merge tests and the demo rely on."""

import gzip
import hashlib
import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from karmixlang.demo import synth

# Key counts of the real checkpoints (the layouts' README); a packaging slip would change them.
KEY_COUNTS = {"sd1": 1831, "sdxl": 2531, "flux": 1439}
# The source layouts exist only in the development workspace; the package ships its own copy.
SOURCE = Path("/work/shared/data/layouts")
SOURCE_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json", "flux": "flux-flux.json"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trained(arch: str) -> list[str]:
    """Keys whose values differ between models (the others are shared buffers)."""
    return [k for k, s in synth.load_layout(arch).items() if synth._is_trained(s)]


def distance(x: dict, y: dict, keys: list[str]) -> float:
    return float(np.sqrt(sum(np.sum((x[k].astype(np.float64) - y[k]) ** 2) for k in keys)))


@pytest.mark.parametrize("arch", sorted(KEY_COUNTS))
def test_packaged_layout_is_whole_and_reproducible(arch):
    layout = synth.load_layout(arch)
    assert len(layout) == KEY_COUNTS[arch]
    assert all(isinstance(s.shape, tuple) and s.component for s in layout.values())
    # mtime=0 gzip: rewriting the packaged file from its own content gives the same bytes
    blob = (files("karmixlang") / "data" / synth.LAYOUT_FILES[arch]).read_bytes()
    text = json.dumps(json.loads(gzip.decompress(blob)), separators=(",", ":")).encode()
    assert gzip.compress(text, compresslevel=9, mtime=0) == blob


@pytest.mark.skipif(not SOURCE.is_dir(), reason="source layouts exist only in the dev workspace")
@pytest.mark.parametrize("arch", sorted(KEY_COUNTS))
def test_packaged_layout_matches_source(arch):
    source = json.loads((SOURCE / SOURCE_FILES[arch]).read_text())["keys"]
    layout = synth.load_layout(arch)
    assert list(layout) == list(source)
    for key, v in source.items():
        optional = v.get("optional", False)
        assert layout[key] == synth.KeySpec(tuple(v["shape"]), v["dtype"], v["component"], optional)


def test_load_layout_unknown_name_and_copies():
    with pytest.raises(ValueError, match="sd1, sdxl, flux"):
        synth.load_layout("sd3")
    synth.load_layout("sd1").clear()
    assert len(synth.load_layout("sd1")) == KEY_COUNTS["sd1"]


def test_scaled_shape():
    assert synth.scaled_shape((1280, 2816), 1 / 16) == (80, 176)
    assert synth.scaled_shape((320, 4, 3, 3), 1 / 16) == (20, 4, 3, 3)
    assert synth.scaled_shape((0,), 1 / 16) == (0,)
    assert synth.scaled_shape((), 1 / 16) == ()
    assert synth.scaled_shape((3840, 1280), 1 / 16) == (240, 80)  # fused qkv stays 3 x width
    assert synth.scaled_shape((1280,), 1e-6) == (1,)
    for arch in KEY_COUNTS:
        for s in synth.load_layout(arch).values():
            assert synth.scaled_shape(s.shape, 1) == s.shape
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            synth.scaled_shape((1280,), bad)


@pytest.mark.parametrize("arch,scale", [("sd1", 1 / 32), ("sdxl", 1 / 32), ("flux", 1 / 64)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_make_model_follows_layout(arch, scale, dtype):
    layout = synth.load_layout(arch)
    model = synth.make_model(arch, scale, seed=0, dtype=dtype)
    assert list(model) == list(layout)  # optional keys included
    for key, spec in layout.items():
        x = model[key]
        assert x.shape == synth.scaled_shape(spec.shape, scale), key
        want = dtype if spec.dtype.startswith(("float", "bfloat")) else spec.dtype
        assert x.dtype == np.dtype(want), key
        assert np.isfinite(x).all() if x.dtype.kind == "f" else True
    for key in (k for k in layout if k.endswith("position_ids")):
        assert np.array_equal(model[key].ravel(), np.arange(model[key].size))


def test_buffers_are_exact_and_shared():
    base = synth.make_model("sdxl", 1 / 32, seed=0)
    direction = synth.make_delta("sdxl", 1 / 32, seed=1)
    tuned = synth.make_model("sdxl", 1 / 32, seed=2, base=base, cluster_direction=direction)
    other = synth.make_model("sdxl", 1 / 32, seed=3)
    buffers = set(base) - set(trained("sdxl"))
    logit_scale = "conditioner.embedders.1.model.logit_scale"
    assert {"v_pred", "ztsnr", "alphas_cumprod", logit_scale} <= buffers
    for key in buffers:
        for m in (tuned, other):
            assert m[key].dtype == base[key].dtype and m[key].tobytes() == base[key].tobytes(), key
    assert base["v_pred"].shape == (0,) and base["v_pred"].dtype == np.int64
    assert np.all(np.diff(base["alphas_cumprod"].astype(np.float32)) < 0)
    assert all(not np.array_equal(tuned[k], base[k]) for k in trained("sdxl"))


def test_make_model_is_deterministic():
    a = synth.make_model("sdxl", 1 / 16, seed=7)
    b = synth.make_model("sdxl", 1 / 16, seed=7)
    c = synth.make_model("sdxl", 1 / 16, seed=8)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)


def test_make_model_rejects_integer_dtype():
    with pytest.raises(ValueError, match="float"):
        synth.make_model("sd1", 1 / 32, seed=0, dtype="int32")


def test_write_model_round_trip(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": x.T, "s": np.array(2.5, dtype=np.float16), "e": np.zeros((0,), np.int64)}
    path = synth.write_model(tmp_path / "sub" / "m.safetensors", tensors, {"kmx_synthetic": "x"})
    back = load_file(path)
    assert np.array_equal(back["t"], x.T) and back["s"].shape == () and back["e"].shape == (0,)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"kmx_synthetic": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    return synth.write_demo_pool(directory, arch="sdxl", scale=1 / 32, n_per_cluster=3)


def test_demo_pool_files(pool):
    assert len(pool["a"]) == len(pool["b"]) == 3
    for path in [pool["base_a"], pool["base_b"], pool["vae_donor"], *pool["a"], *pool["b"]]:
        assert path.is_file()
        with safe_open(path, "np") as f:
            assert json.loads(f.metadata()["kmx_synthetic"])["arch"] == "sdxl"
            assert set(f.keys()) == set(synth.load_layout("sdxl"))


def test_demo_pool_is_reproducible(pool, tmp_path):
    again = synth.write_demo_pool(tmp_path, arch="sdxl", scale=1 / 32, n_per_cluster=3)
    assert sha(again["base_b"]) == sha(pool["base_b"])
    assert [sha(p) for p in again["b"]] == [sha(p) for p in pool["b"]]


def test_demo_pool_clusters(pool):
    keys = trained("sdxl")
    a = [load_file(p) for p in pool["a"]]
    b = [load_file(p) for p in pool["b"]]
    within = max(distance(x, y, keys) for c in (a, b) for i, x in enumerate(c) for y in c[i + 1 :])
    across = min(distance(x, y, keys) for x in a for y in b)
    assert within < across / 5
    base_a, base_b = load_file(pool["base_a"]), load_file(pool["base_b"])
    # each cluster sits near its own base: what a merge's "base" should be
    assert all(distance(x, base_a, keys) < distance(x, base_b, keys) for x in a)
    assert all(distance(y, base_b, keys) < distance(y, base_a, keys) for y in b)


def test_vae_donor_differs_only_in_vae(pool):
    base, donor = load_file(pool["base_a"]), load_file(pool["vae_donor"])
    for key, spec in synth.load_layout("sdxl").items():
        same = np.array_equal(base[key], donor[key])
        assert same == (spec.component != "vae" or not synth._is_trained(spec)), key
        assert (spec.component == "vae") == key.startswith("first_stage_model."), key


def test_sharded_llm(tmp_path):
    out = synth.write_sharded_llm(tmp_path, n_layers=2, hidden=64, shards=3, n_finetunes=2)
    layout = synth.llm_layout(2, 64)
    assert "model.layers.1.self_attn.k_proj.weight" in layout and "lm_head.weight" in layout
    models = []
    for folder in [out["base"], *out["finetunes"]]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        weight_map = index["weight_map"]
        assert set(weight_map) == set(layout)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        tensors, total = {}, 0
        for shard in shards:
            with safe_open(folder / shard, "np") as f:
                assert f.metadata()["format"] == "pt"
                assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == shard)
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
                    total += tensors[k].nbytes
        assert index["metadata"]["total_size"] == total
        assert all(tensors[k].shape == layout[k].shape for k in layout)
        models.append(tensors)
    base, ft0, ft1 = models
    keys = list(layout)
    assert distance(ft0, ft1, keys) < distance(ft0, base, keys) + distance(ft1, base, keys)
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    assert 0 < distance(ft0, base, keys) < 0.1 * distance(base, zero, keys)


def test_sharded_llm_rejects_more_shards_than_keys(tmp_path):
    with pytest.raises(ValueError, match="shards"):
        synth.write_sharded_llm(tmp_path, n_layers=1, shards=100)


def test_synth_does_not_import_torch():
    code = "import sys, karmixlang.demo.synth; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(synth.__file__).parents[2])
