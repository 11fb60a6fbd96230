"""The built-in re-basin specs (karmixlang/data/rebasin/*.json): they are what
tools/make_rebasin_specs.py makes from the layouts, they fit the real models, they permute
only true symmetries (a permuted UNet block computes the same function), and weight matching
recovers a random permutation of every group of a shrunk SD1.5 / SDXL checkpoint exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rebasin_np as R
import rebasin_synth as S
from karmixlang.demo.synth import load_layout
from karmixlang.io.rebasin_spec import check_shapes, load_spec

import make_rebasin_specs as make  # tools/, put on the path by rebasin_synth

BUILTIN = Path(make.OUT)
LAYOUTS = {"sd1": "sd1", "sdxl": "sdxl", "flux": "flux"}


def test_files_are_what_the_generator_makes():
    assert make.main(["--check"]) == 0
    assert sorted(p.stem for p in BUILTIN.glob("*.json")) == ["flux", "llama", "sd1", "sdxl"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_specs_fit_the_real_models(name, tmp_path):
    """kmx's loader reads each built-in spec by name and sizes every group on the real
    layout: no key missing, every range inside its axis, sizes and blocks consistent."""
    spec = load_spec(name, tmp_path)
    shapes = {k: v.shape for k, v in load_layout(LAYOUTS[name]).items()}
    sized, absent = check_shapes(spec, shapes)
    assert absent == [] and len(sized) == len(spec.groups) > 50


def test_llama_spec_serves_any_depth(tmp_path):
    spec = load_spec("llama", tmp_path)
    for layers in (2, 5):
        shapes = {}
        for i in range(layers):
            m = f"model.layers.{i}.mlp"
            shapes |= {f"{m}.gate_proj.weight": (24, 8), f"{m}.up_proj.weight": (24, 8),
                       f"{m}.down_proj.weight": (8, 24), f"model.layers.{i}.self_attn.q_proj.weight": (8, 8)}
        sized, _ = check_shapes(spec, shapes)
        assert sorted(s.group.name for s in sized) == sorted(f"layers.{i}.mlp" for i in range(layers))


# axes that carry a residual stream, a skip connection or a GroupNorm'd block input: never permuted
UNPERMUTED = [
    r"\.in_layers\.0\.(weight|bias)$",  # the ResBlock input's GroupNorm
    r"\.skip_connection\.",
    r"\.(norm|proj_out\.bias|proj_in\.weight@1)",  # SpatialTransformer's GroupNorm, input, output
    r"^model\.diffusion_model\.(input_blocks\.0|out)\.",
    r"\.(layer_norm\d|ln_\d|final_layer_norm|ln_final)\.",
    r"\.mlp\.(fc2|c_proj)\.bias$",
]


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_residual_streams_and_skip_connections_stay(name):
    spec = json.loads((BUILTIN / f"{name}.json").read_text())
    moved = {f"{k}@{axis}" for entries in spec["permutations"].values() for k, axis, *_ in entries}
    for pattern in UNPERMUTED:
        hits = [m for m in moved if re.search(pattern, m) and ".transformer_blocks." not in m]
        assert hits == [], (pattern, hits[:3])
    # a ResBlock's input channels (axis 1 of its first conv) and output (axis 0 of its last)
    assert not any(re.search(r"in_layers\.2\.weight@1|out_layers\.3\.(weight|bias)@0", m) for m in moved)


# ---------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_random_permutation_of_every_group_is_recovered_exactly(name):
    a = S.model(name)
    groups = R.parse_spec(S.spec(name))
    rng = np.random.default_rng(11)
    truth = {g.name: R.random_perm(g, a, rng) for g in groups}
    b = R.apply(a, groups, truth)
    found, _ = R.weight_matching(a, b, groups, seed=3)
    wrong = [g.name for g in groups if not R.same(found[g.name], R.inverse(truth[g.name]))]
    assert wrong == []
    aligned = R.apply(b, groups, found)
    assert all(np.array_equal(aligned[k], a[k]) for k in a)


def test_shrunk_spec_is_the_builtin_with_the_shrunk_sizes():
    """The test models' spec is the built-in one with only sizes changed: same groups, same
    keys and axes."""
    for name in ("sd1", "sdxl", "flux"):
        real = json.loads((BUILTIN / f"{name}.json").read_text())
        small = S.spec(name)
        assert list(small["permutations"]) == list(real["permutations"])
        for g, entries in real["permutations"].items():
            assert [e[:2] for e in small["permutations"][g]] == [e[:2] for e in entries], g
        assert list(small.get("constraints", {})) == list(real.get("constraints", {}))


# ---------------------------------------------------------------- same function (torch)


def _t(p, key):
    return torch.tensor(p[key], dtype=torch.float64)


def _linear(p, name, x):
    bias = p.get(f"{name}.bias")
    w = _t(p, f"{name}.weight")
    if w.ndim == 4:  # a 1x1 conv used as a linear layer (SD1's proj_in/proj_out)
        w = w[:, :, 0, 0]
    return F.linear(x, w, None if bias is None else _t(p, f"{name}.bias"))


def _conv(p, name, x):
    return F.conv2d(x, _t(p, f"{name}.weight"), _t(p, f"{name}.bias"), padding=_t(p, f"{name}.weight").shape[-1] // 2)


def _gn(p, name, x, eps=1e-5):
    return F.group_norm(x, 32, _t(p, f"{name}.weight"), _t(p, f"{name}.bias"), eps)


def _emb(p, unet, t_in, y):
    """ldm's timestep (and SDXL's label) embedding."""
    emb = _linear(p, f"{unet}time_embed.2", F.silu(_linear(p, f"{unet}time_embed.0", t_in)))
    if y is not None:
        emb = emb + _linear(p, f"{unet}label_emb.0.2", F.silu(_linear(p, f"{unet}label_emb.0.0", y)))
    return emb


def _resblock(p, r, x, emb):
    h = _conv(p, f"{r}.in_layers.2", F.silu(_gn(p, f"{r}.in_layers.0", x)))
    h = h + _linear(p, f"{r}.emb_layers.1", F.silu(emb))[:, :, None, None]
    h = _conv(p, f"{r}.out_layers.3", F.silu(_gn(p, f"{r}.out_layers.0", h)))
    skip = _conv(p, f"{r}.skip_connection", x) if f"{r}.skip_connection.weight" in p else x
    return skip + h


def _attention(p, a, x, ctx, heads):
    q, k, v = (_linear(p, f"{a}.to_{n}", y) for n, y in (("q", x), ("k", ctx), ("v", ctx)))
    b, n, width = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
    return _linear(p, f"{a}.to_out.0", o)


def _layer_norm(p, name, x):
    return F.layer_norm(x, x.shape[-1:], _t(p, f"{name}.weight"), _t(p, f"{name}.bias"))


def _transformer(p, s, x, ctx, heads):
    """ldm's SpatialTransformer with its BasicTransformerBlocks (GEGLU feed-forward)."""
    b, c, hh, ww = x.shape
    h = _gn(p, f"{s}.norm", x, eps=1e-6).flatten(2).transpose(1, 2)
    h = _linear(p, f"{s}.proj_in", h)
    i = 0
    while f"{s}.transformer_blocks.{i}.norm1.weight" in p:
        t = f"{s}.transformer_blocks.{i}"
        h = h + _attention(p, f"{t}.attn1", _layer_norm(p, f"{t}.norm1", h), _layer_norm(p, f"{t}.norm1", h),
                           heads(p[f"{t}.attn1.to_q.weight"].shape[0]))
        h = h + _attention(p, f"{t}.attn2", _layer_norm(p, f"{t}.norm2", h), ctx,
                           heads(p[f"{t}.attn2.to_q.weight"].shape[0]))
        value, gate = _linear(p, f"{t}.ff.net.0.proj", _layer_norm(p, f"{t}.norm3", h)).chunk(2, dim=-1)
        h = h + _linear(p, f"{t}.ff.net.2", value * F.gelu(gate))
        i += 1
    h = _linear(p, f"{s}.proj_out", h)
    return x + h.transpose(1, 2).reshape(b, c, hh, ww)


def _clip_mlp(p, m, x, fc):
    h = _linear(p, f"{m}.{fc[0]}", x)
    return _linear(p, f"{m}.{fc[1]}", h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("name,level", [("sd1", "input_blocks.4"), ("sd1", "output_blocks.11"),
                                        ("sdxl", "input_blocks.4"), ("sdxl", "middle_block")])
def test_permuted_unet_blocks_compute_the_same_function(name, level):
    """The embedding MLPs, a ResBlock and the SpatialTransformer after it, built in torch from
    the layout's key names: a random permutation of every group of the spec changes the
    weights but not the output."""
    a = S.model(name)
    unet = "model.diffusion_model."
    res, st = f"{unet}{level}.0", f"{unet}{level}.1"
    used = (res, st, f"{unet}time_embed.", f"{unet}label_emb.")
    groups = [g for g in R.parse_spec(S.spec(name)) if any(e.key.startswith(used) for e in g.entries)]
    rng = np.random.default_rng(5)
    b = R.apply(a, groups, {g.name: R.random_perm(g, a, rng) for g in groups})
    heads = (lambda width: 8) if name == "sd1" else (lambda width: width // S.HEAD_DIM)
    gen = torch.Generator().manual_seed(0)
    channels = a[f"{res}.in_layers.0.weight"].shape[0]
    x = torch.randn(2, channels, 4, 4, generator=gen, dtype=torch.float64)
    t_in = torch.randn(2, a[f"{unet}time_embed.0.weight"].shape[1], generator=gen, dtype=torch.float64)
    y = (torch.randn(2, a[f"{unet}label_emb.0.0.weight"].shape[1], generator=gen, dtype=torch.float64)
         if f"{unet}label_emb.0.0.weight" in a else None)
    ctx = torch.randn(2, 3, a[f"{st}.transformer_blocks.0.attn2.to_k.weight"].shape[1], generator=gen, dtype=torch.float64)

    def forward(p):
        h = _resblock(p, res, x, _emb(p, unet, t_in, y))
        return _transformer(p, st, h, ctx, heads)

    assert not np.array_equal(b[f"{res}.in_layers.2.weight"], a[f"{res}.in_layers.2.weight"])
    torch.testing.assert_close(forward(b), forward(a), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,prefix,fc", [
    ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.3.mlp", ("fc1", "fc2")),
    ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.7.mlp", ("c_fc", "c_proj")),
])
def test_permuted_text_encoder_mlp_computes_the_same_function(name, prefix, fc):
    a = S.model(name)
    groups = [g for g in R.parse_spec(S.spec(name)) if g.entries[0].key.startswith(prefix)]
    rng = np.random.default_rng(6)
    b = R.apply(a, groups, {g.name: R.random_perm(g, a, rng) for g in groups})
    x = torch.randn(3, a[f"{prefix}.{fc[0]}.weight"].shape[1], dtype=torch.float64)
    assert not np.array_equal(b[f"{prefix}.{fc[0]}.weight"], a[f"{prefix}.{fc[0]}.weight"])
    torch.testing.assert_close(_clip_mlp(b, prefix, x, fc), _clip_mlp(a, prefix, x, fc), rtol=1e-9, atol=1e-9)


def test_group_counts():
    """What each built-in spec holds (a change to the generator shows up here)."""
    counts = {}
    for name in ("sd1", "sdxl", "flux", "llama"):
        spec = json.loads((BUILTIN / f"{name}.json").read_text())
        kinds = [g.rsplit(".", 1)[-1] for g in spec["permutations"]]
        counts[name] = {k: kinds.count(k) for k in sorted(set(kinds))}
    assert counts["sd1"] == {"emb": 1, "ff": 16, "heads": 32, "hidden": 22 + 1, "mlp": 12, "width": 16}
    assert counts["llama"] == {"mlp": 1}
    assert math.prod(counts["sdxl"].values()) > 0 and counts["sdxl"]["mlp"] == 12 + 32
    assert counts["flux"]["heads"] == 19 + 38 and counts["flux"]["mlp"] == 38 + 12 + 24


# ---------------------------------------------------------------- Flux (BFL's double and single blocks)


def _rms_heads(p, name, x):
    """Flux's QK norm: an RMSNorm over each head's dimensions, one scale for all heads."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * _t(p, f"{name}.scale")


def _rope(x):
    """Rotation of each head's (even, odd) dimension pairs by a position-dependent angle."""
    n, d = x.shape[-2], x.shape[-1]
    angle = torch.arange(n, dtype=x.dtype)[:, None] * (1.0 + torch.arange(d // 2, dtype=x.dtype))[None, :]
    c, s = torch.cos(angle), torch.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


def _qk_norm(p, norm, q, k, v):
    return _rms_heads(p, f"{norm}.query_norm", q), _rms_heads(p, f"{norm}.key_norm", k), v


def _flux_attention(q, k, v):
    o = F.scaled_dot_product_attention(_rope(q), _rope(k), v)
    return o.transpose(1, 2).flatten(2)


def _heads(x, heads):
    """B L (K H D) -> K B H L D."""
    b, n, _ = x.shape
    return x.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _modulated(x, shift, scale):
    return (1 + scale[:, None]) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift[:, None]


def _double_block(p, d, img, txt, vec, heads):
    streams = {"img": img, "txt": txt}
    mods, qkv = {}, {}
    for s, x in streams.items():
        mods[s] = _linear(p, f"{d}.{s}_mod.lin", F.silu(vec)).chunk(6, dim=-1)
        fused = _linear(p, f"{d}.{s}_attn.qkv", _modulated(x, mods[s][0], mods[s][1]))
        qkv[s] = _qk_norm(p, f"{d}.{s}_attn.norm", *_heads(fused, heads))
    n_txt = txt.shape[1]
    o = _flux_attention(*(torch.cat([qkv["txt"][i], qkv["img"][i]], dim=2) for i in range(3)))
    out = {"txt": o[:, :n_txt], "img": o[:, n_txt:]}
    for s, x in streams.items():
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[s]
        x = x + gate1[:, None] * _linear(p, f"{d}.{s}_attn.proj", out[s])
        h = F.gelu(_linear(p, f"{d}.{s}_mlp.0", _modulated(x, shift2, scale2)), approximate="tanh")
        streams[s] = x + gate2[:, None] * _linear(p, f"{d}.{s}_mlp.2", h)
    return streams["img"], streams["txt"]


def _single_block(p, s, x, vec, heads):
    shift, scale, gate = _linear(p, f"{s}.modulation.lin", F.silu(vec)).chunk(3, dim=-1)
    width = x.shape[-1]
    qkv, mlp = _linear(p, f"{s}.linear1", _modulated(x, shift, scale)).split([3 * width, p[f"{s}.linear1.weight"].shape[0] - 3 * width], dim=-1)
    o = _flux_attention(*_qk_norm(p, f"{s}.norm", *_heads(qkv, heads)))
    return x + gate[:, None] * _linear(p, f"{s}.linear2", torch.cat([o, F.gelu(mlp, approximate="tanh")], dim=-1))


def test_permuted_flux_blocks_compute_the_same_function():
    """A double block (joint attention of the image and text streams, fused qkv, RoPE and QK
    norm) then a single block (fused linear1/linear2): a random permutation of every group of
    the Flux spec that touches them leaves the output unchanged."""
    a = S.model("flux")
    dit = "model.diffusion_model."
    d, s = f"{dit}double_blocks.3", f"{dit}single_blocks.5"
    groups = [g for g in R.parse_spec(S.spec("flux")) if any(e.key.startswith((d + ".", s + ".")) for e in g.entries)]
    assert sorted(g.name.rsplit(".", 1)[-1] for g in groups) == ["heads", "heads", "img_mlp", "mlp", "txt_mlp"]
    rng = np.random.default_rng(8)
    b = R.apply(a, groups, {g.name: R.random_perm(g, a, rng) for g in groups})
    width = a[f"{d}.img_attn.proj.weight"].shape[0]
    heads = width // S.HEAD_DIM
    gen = torch.Generator().manual_seed(1)
    img, txt, vec = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 5, width), (2, 3, width), (2, width)))

    def forward(p):
        i, t = _double_block(p, d, img, txt, vec, heads)
        return _single_block(p, s, torch.cat([t, i], dim=1), vec, heads)

    assert not np.array_equal(b[f"{s}.linear1.weight"], a[f"{s}.linear1.weight"])
    torch.testing.assert_close(forward(b), forward(a), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- the generator for other models


def test_generator_writes_the_spec_of_a_checkpoint_of_other_sizes(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "small.safetensors"
    save_file(dict(S.model("sd1")), str(path))
    out = tmp_path / "spec.json"
    assert make.main(["sd1", "--from", str(path), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == S.spec("sd1")
    # SDXL's rule (heads of 64 channels) does not fit a 20-wide attention: refused, not guessed
    save_file(dict(S.model("sdxl")), str(path))
    with pytest.raises(ValueError, match="give --heads"):
        make.main(["sdxl", "--from", str(path), "-o", str(out)])
    assert make.main(["sdxl", "--from", str(path), "--heads", "10", "-o", str(out)]) == 0


def test_llama_heads_from_a_config_are_a_symmetry_of_the_real_model(tmp_path):
    """`llama --config` adds grouped-query attention heads: a random permutation of every
    group leaves transformers' LlamaForCausalLM logits unchanged, and matching recovers it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    a = {k: v.numpy().copy() for k, v in model.state_dict().items()}  # load_state_dict writes in place
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    out = tmp_path / "spec.json"
    assert make.main(["llama", "--config", str(tmp_path / "config.json"), "-o", str(out)]) == 0
    groups = R.parse_spec(R.expand_layers(json.loads(out.read_text()), a))
    assert sorted(g.name for g in groups) == ["layers.0.heads", "layers.0.mlp", "layers.1.heads", "layers.1.mlp"]
    rng = np.random.default_rng(9)
    truth = {g.name: R.random_perm(g, a, rng) for g in groups}
    b = R.apply(a, groups, truth)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in b.items()})
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)
    found, _ = R.weight_matching(a, b, groups, seed=2)
    assert all(R.same(found[g.name], R.inverse(truth[g.name])) for g in groups)
