"""LoRA and LyCORIS files, from their safetensors headers only (docs/lora.md).

A LoRA file holds *modules*: groups of tensors named `MODULE.SUFFIX`, each of which is the
low-rank (or Kronecker, or Hadamard, or full) form of the change to one weight of a model.
This module groups a file's tensors into modules and tells each module's kind and the shape
of the change it makes; which checkpoint key a module changes is decided by io/lora_map.py.
No tensor data is read: `alpha` is a 0-d tensor read by the runtime with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from karmixlang.diagnostics import KmxError, Span, error
from karmixlang.io.header import CheckpointHeader, TensorInfo

# suffix -> (kind, role). "any" roles (alpha, dora_scale) belong to whatever kind the module is.
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"),
    "lora_mid.weight": ("lora", "mid"),
    "lora_B.weight": ("lora", "up"), "lora_A.weight": ("lora", "down"),
    "lora.up.weight": ("lora", "up"), "lora.down.weight": ("lora", "down"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"), "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("diff", "diff"), "diff_b": ("diff_b", "diff"),
    "alpha": ("any", "alpha"), "dora_scale": ("any", "dora_scale"),
}
# Longest first, so that `lora_up.weight` wins over a bare `weight`-like tail.
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# The roles a module of each kind must have, and the ones it may have.
REQUIRED = {"lora": {"up", "down"}, "loha": {"w1a", "w1b", "w2a", "w2b"},
            "lokr": set(), "diff": {"diff"}, "diff_b": {"diff"}}
OPTIONAL = {"lora": {"mid", "alpha", "dora_scale"}, "loha": {"t1", "t2", "alpha", "dora_scale"},
            "lokr": {"w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2", "alpha", "dora_scale"},
            "diff": set(), "diff_b": set()}


@dataclass(frozen=True)
class Module:
    """One module: `name` as the file spells it (without the suffix), its kind, its tensors
    by role, and the change it makes as a matrix of `rows` × `cols` (a conv's in × kh × kw
    flattened), `target` "weight" or "bias" (a full diff's `diff_b`)."""
    name: str
    kind: str  # lora | loha | lokr | diff
    tensors: tuple[tuple[str, TensorInfo], ...]
    rows: int
    cols: int
    kernel: tuple[int, ...]  # the conv kernel the change has (() for a linear layer)
    target: str = "weight"

    def tensor(self, role: str) -> TensorInfo | None:
        return dict(self.tensors).get(role)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(r for r, _ in self.tensors)


@dataclass(frozen=True)
class LoraFile:
    path: str
    format: str  # kohya | peft | lycoris-loha | lycoris-lokr | diff | mixed
    modules: tuple[Module, ...]
    metadata: dict

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for m in self.modules for _, t in m.tensors)


def split_name(name: str) -> tuple[str, str] | None:
    """(module, suffix) of a tensor name, or None when its suffix is not a LoRA one."""
    for suffix in _BY_LENGTH:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return None


def parse_lora(header: CheckpointHeader, path: str, span: Span | None = None) -> LoraFile:
    """The modules of a LoRA file. Raises KmxError: K0320 for tensors that are not of a
    LoRA, K0321 for a module whose tensors are incomplete or do not fit together."""
    groups: dict[tuple[str, str], dict[str, tuple[str, TensorInfo]]] = {}
    unknown = []
    for name, info in sorted(header.tensors.items()):
        parts = split_name(name)
        if parts is None:
            unknown.append(name)
            continue
        module, suffix = parts
        kind, role = SUFFIXES[suffix]
        target = "bias" if kind == "diff_b" else "weight"
        groups.setdefault((module, target), {})[role] = (kind, info)
    if unknown or not groups:
        shown = ", ".join(f"`{k}`" for k in unknown[:3]) + \
            (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise KmxError([error(
            "K0320", f"`{path}` is not a LoRA file: " +
            (f"{len(unknown)} tensor(s) of no LoRA format: {shown}" if unknown else
             "it holds no tensors"), span, label="declared as a lora here",
            help="kmx reads kohya, PEFT/diffusers, LyCORIS LoHa/LoKr and full-diff files; "
                 "declare a full checkpoint with `model`")])
    modules, bad = [], []
    for (name, target), roles in groups.items():
        try:
            modules.append(_module(name, target, roles))
        except ValueError as exc:
            bad.append(f"`{name}` ({exc})")
    if bad:
        raise KmxError([error(
            "K0321", f"`{path}`: {len(bad)} module(s) cannot be read: " + "; ".join(bad[:3]) +
            (f" and {len(bad) - 3} more" if len(bad) > 3 else ""), span,
            label="declared as a lora here",
            help="the file is incomplete or was written by a tool kmx does not know")])
    kinds = {m.kind for m in modules}
    return LoraFile(path, _format(modules, kinds), tuple(modules), dict(header.metadata))


def _format(modules: list[Module], kinds: set[str]) -> str:
    if kinds <= {"diff"}:
        return "diff"
    if len(kinds - {"diff"}) > 1:
        return "mixed"
    kind = next(iter(kinds - {"diff"}))
    if kind != "lora":
        return f"lycoris-{kind}"
    peft = any(t.name.endswith(("lora_A.weight", "lora.down.weight"))
               for m in modules for _, t in m.tensors)
    return "peft" if peft else "kohya"


def _module(name: str, target: str, tagged: dict[str, tuple[str, TensorInfo]]) -> Module:
    kinds = {kind for kind, _ in tagged.values()} - {"any"}
    if len(kinds) != 1:
        raise ValueError("tensors of several formats" if kinds else "no weights, only "
                         + ", ".join(sorted(tagged)))
    kind = "diff" if target == "bias" else kinds.pop()
    roles = {role: info for role, (_, info) in tagged.items()}
    missing = REQUIRED[kind] - set(roles)
    extra = set(roles) - REQUIRED[kind] - OPTIONAL[kind]
    if missing or extra:
        raise ValueError(("missing " + ", ".join(sorted(missing))) if missing else
                         "unexpected " + ", ".join(sorted(extra)))
    alpha = roles.get("alpha")
    if alpha is not None and math.prod(alpha.shape) != 1:
        raise ValueError(f"alpha has shape {list(alpha.shape)}, not one number")
    rows, cols, kernel = SHAPES[kind](roles)
    tensors = tuple(sorted(roles.items()))
    return Module(name, kind, tensors, rows, cols, kernel, target)


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise ValueError(why)


def _lora_shape(r: dict) -> tuple[int, int, tuple]:
    up, down, mid = r["up"].shape, r["down"].shape, r.get("mid")
    _need(len(up) >= 2 and len(down) >= 2, "up and down must be matrices or conv kernels")
    rank = down[0]
    _need(math.prod(up[1:]) == rank, f"up {list(up)} does not fit down {list(down)}")
    if mid is not None:  # LoCon's Tucker form: 1×1 down, r×r×kh×kw mid, 1×1 up
        m = mid.shape
        _need(len(m) == 4 and m[0] == up[1] and m[1] == rank and math.prod(down[2:]) == 1,
              f"mid {list(m)} does not fit up {list(up)} and down {list(down)}")
        return up[0], down[1] * m[2] * m[3], tuple(m[2:])
    return up[0], math.prod(down[1:]), tuple(down[2:])


def _product(a: tuple, b: tuple, what: str) -> tuple[int, int, tuple]:
    """rows, cols and kernel of a·b where a is rows×r and b is r×(in·kh·kw)."""
    _need(len(a) == 2 and len(b) >= 2 and a[1] == b[0], f"{what}: {list(a)} · {list(b)}")
    return a[0], math.prod(b[1:]), tuple(b[2:])


def _tucker(t: tuple, a: tuple, b: tuple, what: str) -> tuple[int, int, tuple]:
    """einsum('i j k l, j r, i p -> p r k l', t, b, a): a is rank×out, b rank×in."""
    _need(len(t) == 4 and len(a) == 2 and len(b) == 2 and t[0] == a[0] and t[1] == b[0],
          f"{what}: t {list(t)} with {list(a)}, {list(b)}")
    return a[1], b[1] * t[2] * t[3], tuple(t[2:])


def _loha_shape(r: dict) -> tuple[int, int, tuple]:
    s = {k: v.shape for k, v in r.items()}
    if "t1" in s or "t2" in s:
        _need("t1" in s and "t2" in s, "hada_t1 without hada_t2")
        one = _tucker(s["t1"], s["w1a"], s["w1b"], "w1")
        two = _tucker(s["t2"], s["w2a"], s["w2b"], "w2")
    else:
        one = _product(s["w1a"], s["w1b"], "w1")
        two = _product(s["w2a"], s["w2b"], "w2")
    _need(one[:2] == two[:2], f"the two Hadamard factors differ: {one[:2]} and {two[:2]}")
    return one[0], one[1], one[2] or two[2]


def _lokr_factor(s: dict, n: str) -> tuple[int, ...]:
    """The shape of factor w1 or w2: as stored, or of its decomposed product."""
    if f"w{n}" in s:
        _need(f"w{n}a" not in s and f"w{n}b" not in s, f"both lokr_w{n} and its factors")
        return s[f"w{n}"]
    _need(f"w{n}a" in s and f"w{n}b" in s, f"lokr_w{n} or lokr_w{n}_a and _b are needed")
    if n == "2" and "t2" in s:
        rows, cols, kernel = _tucker(s["t2"], s["w2a"], s["w2b"], "w2")
        return (rows, cols // math.prod(kernel)) + kernel
    a, b = s[f"w{n}a"], s[f"w{n}b"]
    _need(len(a) == 2 and len(b) >= 2 and a[1] == b[0], f"w{n}: {list(a)} · {list(b)}")
    return (a[0],) + tuple(b[1:])


def _lokr_shape(r: dict) -> tuple[int, int, tuple]:
    s = {k: v.shape for k, v in r.items()}
    w1, w2 = _lokr_factor(s, "1"), _lokr_factor(s, "2")
    _need(len(w1) == 2 and len(w2) >= 2, f"kron of {list(w1)} and {list(w2)}")
    return w1[0] * w2[0], w1[1] * math.prod(w2[1:]), tuple(w2[2:])


def _diff_shape(r: dict) -> tuple[int, int, tuple]:
    d = r["diff"].shape
    _need(len(d) >= 1, "a diff must have a shape")
    return d[0], math.prod(d[1:]), tuple(d[2:])


SHAPES = {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape, "diff": _diff_shape}


def rank_of(m: Module) -> int | None:
    """The rank `alpha` is divided by (None: alpha does not apply, the scale is 1)."""
    t = dict(m.tensors)
    if m.kind == "lora":
        return t["down"].shape[0]
    if m.kind == "loha":
        return t["w1b"].shape[0]
    if m.kind == "lokr":  # LyCORIS: the rank of the decomposed factor (w2's if both are)
        if "w2b" in t:
            return t["w2b"].shape[0]
        if "w1b" in t:
            return t["w1b"].shape[0]
    return None
