"""Writes the built-in re-basin specs, karmixlang/data/rebasin/{sd1,sdxl,flux,llama}.json.

    python tools/make_rebasin_specs.py          # rewrite the files
    python tools/make_rebasin_specs.py --check  # exit 1 if a file differs from what it makes
    python tools/make_rebasin_specs.py sdxl --from small.safetensors --heads 4 -o spec.json
    python tools/make_rebasin_specs.py llama --config config.json -o spec.json

SD1, SDXL and Flux are read off the key names and shapes of the packaged layouts
(karmixlang/data/*.json.gz), so every key a spec names is a key the real checkpoints have;
LLaMA has no layout and is written for its Hugging Face names with a {layer} placeholder.
Every range of a fused tensor is written [KEY, AXIS, START, STOP, OF], OF the axis's length
here, so kmx scales it to a checkpoint of other widths; counts (GroupNorm groups, heads) do
not scale, and --from writes a spec of a checkpoint's own sizes where they do not divide.
Only true symmetries are listed (docs/rebasin.md, "Built-in specs", says which and why):
a permuted model computes the same function.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from karmixlang.demo.synth import load_layout  # noqa: E402

OUT = ROOT / "karmixlang" / "data" / "rebasin"
GROUPNORM_GROUPS = 32  # every GroupNorm of the SD UNets (ldm's normalization())


def _layout(name: str) -> dict[str, tuple]:
    return {k: v.shape for k, v in load_layout(name).items()}


class Spec:
    """A spec being built: permutations in order, and their constraints."""

    def __init__(self, description: str):
        self.description = description
        self.permutations: dict[str, list[list]] = {}
        self.constraints: dict[str, dict] = {}

    def add(self, name: str, entries: list[list], blocks: int = 1, inner: str = "free"):
        assert name not in self.permutations, name
        self.permutations[name] = entries
        if blocks > 1:
            self.constraints[name] = {"blocks": blocks, "inner": inner}

    def to_json(self) -> dict:
        out = {"description": self.description, "permutations": self.permutations}
        if self.constraints:
            out["constraints"] = self.constraints
        return out


def _prefixes(shapes: Mapping[str, tuple], suffix: str) -> list[str]:
    """The prefixes P of every key `P + suffix`, in the layout's order."""
    return [k[: -len(suffix)] for k in shapes if k.endswith(suffix)]


def _heads(heads: Callable[[int], int], width: int, where: str) -> int:
    """The number of heads of an attention `width` wide; refused unless whole heads (a wrong
    count would permute parts of heads, which is no symmetry)."""
    n = heads(width)
    if n < 1 or width % n:
        raise ValueError(f"{where}: {n} heads do not divide its width {width}; give --heads")
    return n


def _mlp(spec: Spec, name: str, up: list[str], down: str, bias: bool):
    """An MLP's hidden units: the rows of every `up` layer (two for a gated MLP) and their
    biases, the columns of `down`; what is in between is elementwise."""
    entries = [[f"{u}.weight", 0] for u in up]
    if bias:
        entries += [[f"{u}.bias", 0] for u in up]
    spec.add(name, entries + [[f"{down}.weight", 1]])


# ---------------------------------------------------------------- SD UNets (ldm/sgm names)


def _resblocks(spec: Spec, shapes, unet: str, short: Callable[[str], str]):
    """A ResBlock's hidden channels: in_layers.2's outputs, plus the embedding projection
    added to them, through out_layers.0 (GroupNorm: whole groups move) into out_layers.3."""
    for p in _prefixes(shapes, ".in_layers.2.weight"):
        if not p.startswith(unet):
            continue
        spec.add(
            f"{short(p)}.hidden",
            [
                [f"{p}.in_layers.2.weight", 0], [f"{p}.in_layers.2.bias", 0],
                [f"{p}.emb_layers.1.weight", 0], [f"{p}.emb_layers.1.bias", 0],
                [f"{p}.out_layers.0.weight", 0], [f"{p}.out_layers.0.bias", 0],
                [f"{p}.out_layers.3.weight", 1],
            ],
            blocks=GROUPNORM_GROUPS,
        )


def _transformers(spec: Spec, shapes, unet: str, short: Callable[[str], str], heads: Callable[[int], int]):
    """Each SpatialTransformer: its inner width (proj_in's outputs to proj_out's inputs, every
    LayerNorm on it), and in each of its blocks the heads of both attentions and the GEGLU
    feed-forward's hidden units."""
    for s in _prefixes(shapes, ".proj_in.weight"):
        if not s.startswith(unet):
            continue
        blocks = _prefixes({k: v for k, v in shapes.items() if k.startswith(s + ".")}, ".attn1.to_q.weight")
        stream = [[f"{s}.proj_in.weight", 0], [f"{s}.proj_in.bias", 0]]
        for b in blocks:
            stream += [[f"{b}.norm{i}.{w}", 0] for i in (1, 2, 3) for w in ("weight", "bias")]
            stream += [[f"{b}.attn1.to_{x}.weight", 1] for x in "qkv"] + [[f"{b}.attn2.to_q.weight", 1]]
            stream += [[f"{b}.attn{i}.to_out.0.{w}", 0] for i in (1, 2) for w in ("weight", "bias")]
            stream += [[f"{b}.ff.net.0.proj.weight", 1], [f"{b}.ff.net.2.weight", 0], [f"{b}.ff.net.2.bias", 0]]
            for i in (1, 2):
                a = f"{b}.attn{i}"
                width = shapes[f"{a}.to_q.weight"][0]
                spec.add(
                    f"{short(a)}.heads",
                    [[f"{a}.to_{x}.weight", 0] for x in "qkv"] + [[f"{a}.to_out.0.weight", 1]],
                    blocks=_heads(heads, width, a),
                )
            hidden = shapes[f"{b}.ff.net.2.weight"][1]
            proj = f"{b}.ff.net.0.proj"
            spec.add(
                f"{short(b)}.ff",
                [[f"{proj}.{w}", 0, h * hidden, (h + 1) * hidden, 2 * hidden] for w in ("weight", "bias") for h in (0, 1)]
                + [[f"{b}.ff.net.2.weight", 1]],
            )
        spec.add(f"{short(s)}.width", stream + [[f"{s}.proj_out.weight", 1]])


def _embeddings(spec: Spec, shapes, unet: str):
    """The timestep (and SDXL's label) embedding MLPs' hidden units, and the embedding they
    sum to, which every ResBlock's emb_layers reads through a SiLU."""
    mlps = [m for m in ("time_embed", "label_emb.0") if f"{unet}{m}.0.weight" in shapes]
    for m in mlps:
        _mlp(spec, f"unet.{m}.hidden", [f"{unet}{m}.0"], f"{unet}{m}.2", bias=True)
    emb = [[f"{unet}{m}.2.{w}", 0] for m in mlps for w in ("weight", "bias")]
    emb += [[f"{p}.emb_layers.1.weight", 1] for p in _prefixes(shapes, ".emb_layers.1.weight") if p.startswith(unet)]
    spec.add("unet.emb", emb)


def _unet(spec: Spec, shapes, heads: Callable[[int], int]):
    unet = "model.diffusion_model."

    def short(p: str) -> str:
        return "unet." + p[len(unet):]

    _embeddings(spec, shapes, unet)
    _resblocks(spec, shapes, unet, short)
    _transformers(spec, shapes, unet, short, heads)


def _clip_mlps(spec: Spec, shapes, prefix: str, name: str, fc: tuple[str, str]):
    """Each text-encoder layer's MLP hidden units (HF CLIP fc1/fc2, open_clip c_fc/c_proj)."""
    for p in _prefixes(shapes, f".mlp.{fc[0]}.weight"):
        if p.startswith(prefix):
            layer = p[len(prefix):].split(".")[0]
            _mlp(spec, f"{name}.{layer}.mlp", [f"{p}.mlp.{fc[0]}"], f"{p}.mlp.{fc[1]}", bias=True)


def sd1(shapes: Mapping[str, tuple] | None = None, heads: Callable[[int], int] | None = None) -> Spec:
    spec = Spec(
        "Stable Diffusion 1.x (LDM names): UNet ResBlock hidden channels (whole GroupNorm groups), "
        "attention heads (8 per attention), GEGLU feed-forward units, SpatialTransformer inner "
        "widths, timestep-embedding MLP and embedding; CLIP-L MLP units. Made by "
        "tools/make_rebasin_specs.py; docs/rebasin.md says what stays unpermuted."
    )
    shapes = shapes or _layout("sd1")
    _unet(spec, shapes, heads or (lambda width: 8))
    _clip_mlps(spec, shapes, "cond_stage_model.transformer.text_model.encoder.layers.", "clip_l", ("fc1", "fc2"))
    return spec


def sdxl(shapes: Mapping[str, tuple] | None = None, heads: Callable[[int], int] | None = None) -> Spec:
    spec = Spec(
        "Stable Diffusion XL (SGM names): UNet ResBlock hidden channels (whole GroupNorm groups), "
        "attention heads (64 channels each), GEGLU feed-forward units, SpatialTransformer inner "
        "widths, timestep- and label-embedding MLPs and embedding; CLIP-L and CLIP-G MLP units. "
        "Made by tools/make_rebasin_specs.py; docs/rebasin.md says what stays unpermuted."
    )
    shapes = shapes or _layout("sdxl")
    _unet(spec, shapes, heads or (lambda width: width // 64))
    _clip_mlps(spec, shapes, "conditioner.embedders.0.transformer.text_model.encoder.layers.", "clip_l", ("fc1", "fc2"))
    _clip_mlps(spec, shapes, "conditioner.embedders.1.model.transformer.resblocks.", "clip_g", ("c_fc", "c_proj"))
    return spec


# ---------------------------------------------------------------- Flux (BFL names)

FLUX_HEAD_DIM = 128


def _flux_attention(shapes, prefix: str, qkv: str, width: int) -> list[list]:
    """The q, k and v row ranges of a fused qkv (weight and bias)."""
    rows = shapes[f"{prefix}{qkv}.weight"][0]
    return [[f"{prefix}{qkv}.{w}", 0, i * width, (i + 1) * width, rows] for w in ("weight", "bias") for i in range(3)]


def flux(shapes: Mapping[str, tuple] | None = None, heads: Callable[[int], int] | None = None) -> Spec:
    spec = Spec(
        "Flux.1 (BFL names): double blocks' joint-attention heads (image and text streams alike, "
        "order inside a head fixed by RoPE) and image/text MLP units; single blocks' heads and "
        "MLP units (ranges of the fused linear1/linear2); timestep/guidance/vector embedding MLP "
        "units; CLIP-L MLP units; T5 gated-GELU units. Made by tools/make_rebasin_specs.py; "
        "docs/rebasin.md says what stays unpermuted."
    )
    shapes = shapes or _layout("flux")
    heads = heads or (lambda width: width // FLUX_HEAD_DIM)
    dit = "model.diffusion_model."
    for m in ("time_in", "vector_in", "guidance_in"):
        _mlp(spec, f"flux.{m}.hidden", [f"{dit}{m}.in_layer"], f"{dit}{m}.out_layer", bias=True)
    for p in _prefixes(shapes, ".img_attn.qkv.weight"):
        width = shapes[f"{p}.img_attn.proj.weight"][1]
        n = p[len(dit):]
        spec.add(
            f"flux.{n}.heads",
            _flux_attention(shapes, p, ".img_attn.qkv", width) + _flux_attention(shapes, p, ".txt_attn.qkv", width)
            + [[f"{p}.img_attn.proj.weight", 1], [f"{p}.txt_attn.proj.weight", 1]],
            blocks=_heads(heads, width, p), inner="fixed",
        )
        for s in ("img", "txt"):
            _mlp(spec, f"flux.{n}.{s}_mlp", [f"{p}.{s}_mlp.0"], f"{p}.{s}_mlp.2", bias=True)
    for p in _prefixes(shapes, ".linear1.weight"):
        rows, width = shapes[f"{p}.linear1.weight"]
        cols = shapes[f"{p}.linear2.weight"][1]
        n = p[len(dit):]
        spec.add(
            f"flux.{n}.heads",
            _flux_attention(shapes, p, ".linear1", width) + [[f"{p}.linear2.weight", 1, 0, width, cols]],
            blocks=_heads(heads, width, p), inner="fixed",
        )
        spec.add(
            f"flux.{n}.mlp",
            [[f"{p}.linear1.{w}", 0, 3 * width, rows, rows] for w in ("weight", "bias")]
            + [[f"{p}.linear2.weight", 1, width, cols, cols]],
        )
    _clip_mlps(spec, shapes, "text_encoders.clip_l.transformer.text_model.encoder.layers.", "clip_l", ("fc1", "fc2"))
    t5 = "text_encoders.t5xxl.transformer.encoder.block."
    for p in _prefixes(shapes, ".DenseReluDense.wo.weight"):
        d = f"{p}.DenseReluDense"
        _mlp(spec, f"t5.{p[len(t5):].split('.')[0]}.mlp", [f"{d}.wi_0", f"{d}.wi_1"], f"{d}.wo", bias=False)
    return spec


# ---------------------------------------------------------------- LLaMA (HF names)


def llama(shapes=None, heads=None, config: Mapping | None = None) -> Spec:
    """Every layer's MLP units; with a model's `config` (config.json) also its attention heads:
    blocks = num_key_value_heads on q/k/v rows and o_proj columns, each q block holding the
    query heads that share a key/value head, inner order fixed (RoPE)."""
    spec = Spec(
        "LLaMA-family decoders (Hugging Face names: LLaMA, Mistral, Qwen2, Gemma): each layer's "
        "gated-MLP intermediate units, for any depth. Attention heads are not in it: their count "
        "is not in the tensor shapes and differs between models. Made by "
        "tools/make_rebasin_specs.py; docs/rebasin.md says why."
    )
    m = "model.layers.{layer}.mlp"
    _mlp(spec, "layers.{layer}.mlp", [f"{m}.gate_proj", f"{m}.up_proj"], f"{m}.down_proj", bias=False)
    if config is not None:
        spec.description = (
            f"{config.get('model_type', 'LLaMA-family')} decoder with "
            f"{config['num_attention_heads']} query and {_kv_heads(config)} key/value heads: each "
            "layer's MLP units and attention heads (whole key/value heads with their query heads, "
            "inner order fixed by RoPE). Made by tools/make_rebasin_specs.py llama --config."
        )
        a = "model.layers.{layer}.self_attn"
        biases = config.get("attention_bias", config.get("model_type") == "qwen2")
        spec.add(
            "layers.{layer}.heads",
            [[f"{a}.{x}_proj.weight", 0] for x in "qkv"]
            + ([[f"{a}.{x}_proj.bias", 0] for x in "qkv"] if biases else [])
            + [[f"{a}.o_proj.weight", 1]],
            blocks=_kv_heads(config), inner="fixed",
        )
    return spec


def _kv_heads(config: Mapping) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


SPECS = {"sd1": sd1, "sdxl": sdxl, "flux": flux, "llama": llama}


def render(spec: Spec) -> str:
    """The spec as JSON text, one entry a line (diffs of a regenerated spec stay readable)."""
    spec = spec.to_json()
    dump = json.dumps
    lines = ["{", f' "description": {dump(spec["description"])},', ' "permutations": {']
    perms = list(spec["permutations"].items())
    for i, (group, entries) in enumerate(perms):
        lines.append(f"  {dump(group)}: [")
        lines += [f"   {dump(e)}," for e in entries[:-1]] + [f"   {dump(entries[-1])}"]
        lines.append("  ]" + ("," if i < len(perms) - 1 else ""))
    lines.append(" }" + ("," if "constraints" in spec else ""))
    if "constraints" in spec:
        items = list(spec["constraints"].items())
        lines.append(' "constraints": {')
        lines += [f"  {dump(g)}: {dump(c)}" + ("," if i < len(items) - 1 else "") for i, (g, c) in enumerate(items)]
        lines.append(" }")
    return "\n".join(lines + ["}", ""])


def header_shapes(path: str) -> dict[str, tuple]:
    """Key -> shape from a .safetensors file's header (no tensor is read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def builtins(check: bool) -> int:
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in SPECS.items():
        path = OUT / f"{name}.json"
        text = render(make())
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{path} is not what tools/make_rebasin_specs.py makes", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(SPECS),
                        help="write one spec to -o instead of the built-in files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a built-in file is stale")
    parser.add_argument("--from", dest="source", metavar="CHECKPOINT",
                        help="take the shapes from this .safetensors file (a model of other sizes)")
    parser.add_argument("--heads", type=int, help="attention heads per attention (default: the architecture's)")
    parser.add_argument("--config", help="llama: the model's config.json, for its attention heads")
    parser.add_argument("-o", "--output", help="where to write the spec (with NAME)")
    args = parser.parse_args(argv)
    if args.name is None:
        return builtins(args.check)
    if not args.output:
        parser.error("NAME needs -o OUTPUT")
    if args.name == "llama":
        config = json.loads(Path(args.config).read_text()) if args.config else None
        spec = llama(config=config)
    else:
        shapes = header_shapes(args.source) if args.source else None
        heads = (lambda width: args.heads) if args.heads else None
        spec = SPECS[args.name](shapes, heads)
    Path(args.output).write_text(render(spec), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
