"""Checked AST -> graph IR. Evaluates the recipe with concrete values: params resolved, defs
inlined, clusters expanded to weighted members (nested, `balanced`, `glob` sorted bytewise),
filters on clusters applied to each member. Only runs on a program the checker accepted, so
type errors cannot happen here; the only errors are about the filesystem (a glob with no
match)."""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass

from karmixlang.syntax import ast
from karmixlang.builtins import Builtin
from karmixlang.check.binder import Kind, bind_builtin, bind_def, resolve_call, resolve_name
from karmixlang.check.program import Program, Unit, dependency_order, references
from karmixlang.diagnostics import KmxError, error
from karmixlang.limits import recursion_room
from karmixlang.io.dtypes import parse_user_dtype
from karmixlang.io.rebasin_spec import locate
from karmixlang.ir.graph import Builder, Graph, KeyMap, Node, SaveSpec, fold_up, reachable


class PathText(str):
    """A string value that remembers the folder of the file whose literal it came from:
    relative paths resolve there, even when the string is passed to a def in another file."""

    folder: str

    def __new__(cls, text: str, folder: str):
        obj = super().__new__(cls, text)
        obj.folder = folder
        return obj


def _folder(value, unit: Unit) -> str:
    return getattr(value, "folder", unit.folder)


@dataclass(frozen=True)
class ClusterVal:
    members: tuple[tuple[Node, float], ...]  # (member, weight)


@dataclass(frozen=True)
class PermVal:
    """A Permutation: what weight matching is asked to align (plain values, so the permute
    nodes that carry them stay JSON-able; plan/rebasin.py plans it, runtime/rebasin.py
    solves it)."""
    model: str  # the checkpoint permuted, absolute
    to: str  # the checkpoint aligned to, absolute
    spec: str  # "auto", a built-in's name, or an absolute path
    iterations: int
    seed: int
    groups: tuple[str, ...] | None

    def attrs(self) -> dict:
        return {"model": self.model, "to": self.to, "spec": self.spec,
                "iterations": self.iterations, "seed": self.seed, "groups": self.groups}


@dataclass
class _Env:
    unit: Unit
    locals: dict
    lets: dict
    memo: dict


class Lowerer:
    def __init__(self, program: Program):
        self.p = program
        self.b = Builder()
        self.decl_memo: dict[tuple[str, str], object] = {}
        # A def's value per argument values, with the nodes its body spelled out (for the
        # plan's count): each def is inlined once per distinct call, as the checker checks it.
        self.def_memo: dict[tuple, tuple[object, int]] = {}
        self.names: dict[Node, str] = {}

    # -- values
    def decl(self, unit: Unit, name: str):
        """A declaration's value. The ones it uses are lowered first, in the checker's order:
        the recursion stays as deep as the checker measured (limits.MAX_EVAL_DEPTH)."""
        if (unit.path, name) not in self.decl_memo:
            self._decls([(unit, name)])
        return self.decl_memo[(unit.path, name)]

    def _decls(self, starts) -> None:
        for u, n in dependency_order(starts):
            if not isinstance(u.decls[n], (ast.Def, ast.Import)):
                self._decl(u, n)

    def _decl(self, unit: Unit, name: str) -> None:
        key = (unit.path, name)
        if key not in self.decl_memo:
            d = unit.decls[name]
            env = _Env(unit, {}, {}, {})
            if isinstance(d, ast.ModelDecl):
                v = self.load(unit, self.string(d.path, env), d, "base" if d.is_base else "model")
            elif isinstance(d, ast.LoraDecl):
                v = self.load(unit, self.string(d.path, env), d, "lora", op="lora")
            elif isinstance(d, ast.Param):
                v = unit.params[name]
                v = PathText(v, unit.folder) if isinstance(v, str) else v
            else:
                v = self.value(d.expr, env)
            if isinstance(v, Node):
                self.names.setdefault(v, name if unit is self.p.root else f"{_alias(self.p, unit)}.{name}")
            self.decl_memo[key] = v

    def load(self, unit: Unit, path: str, at, role: str, op: str = "load") -> Node:
        full = os.path.abspath(os.path.join(_folder(path, unit), path))
        node = self.b.node(op, (), {"path": full, "role": role}, at.span)
        self.names.setdefault(node, getattr(at, "name", None) or os.path.basename(full))
        return node

    def string(self, s: ast.String, env: _Env) -> str:
        out = []
        for part in s.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                unit = env.unit.imports[part.lib] if part.lib else env.unit
                out.append(unit.param_text[part.name])
        return PathText("".join(out), env.unit.folder)

    def value(self, e, env: _Env):
        if isinstance(e, ast.Number):
            return e.value
        if isinstance(e, ast.Bool):
            return e.value
        if isinstance(e, ast.String):
            return self.string(e, env)
        if isinstance(e, ast.Name):
            ref = resolve_name(env.unit, e.name, env.locals, env.lets)
            if ref.kind is Kind.PARAM:
                return env.locals[e.name]
            if ref.kind is Kind.LET:
                if e.name not in env.memo:
                    env.memo[e.name] = self.value(env.lets[e.name].expr, env)
                return env.memo[e.name]
            return self.decl(ref.unit, e.name)
        if isinstance(e, ast.Member):
            return self.decl(env.unit.imports[e.lib], e.name)
        if isinstance(e, ast.Neg):
            return self.arith("*", -1.0, self.value(e.operand, env), e)
        if isinstance(e, ast.BinOp):
            left, right = self.value(e.left, env), self.value(e.right, env)
            if e.op == "|":
                return self.b.node("union", (left, right), span=e.span)
            return self.arith(e.op, left, right, e)
        if isinstance(e, ast.ClusterLit):
            return self.cluster(e, env)
        if isinstance(e, ast.MapLit):
            return {self.string(p.key, env): self.value(p.value, env) for p in e.pairs}
        if isinstance(e, ast.Call):
            return self.call(e, env)
        raise AssertionError(e)

    def cluster(self, e: ast.ClusterLit, env: _Env) -> ClusterVal:
        members = []
        for item in e.items:
            w = 1.0 if item.weight is None else float(self.value(item.weight, env))
            v = self.value(item.expr, env)
            if isinstance(v, str):
                v = self.load(env.unit, v, item.expr, "model")
            if isinstance(v, ClusterVal):
                members.extend((m, mw * w) for m, mw in v.members)
            else:
                members.append((v, w))
        return ClusterVal(tuple(members))

    # -- arithmetic: every +, -, *, / of spaces becomes a lincomb (folded by optimize.fold)
    def arith(self, op: str, a, b, e):
        if _is_num(a) and _is_num(b):
            if op == "/":  # not in the table below: it would divide before `b` is tested
                return a / b if b else 0.0
            return {"+": a + b, "-": a - b, "*": a * b}[op]
        if isinstance(a, ClusterVal) or isinstance(b, ClusterVal):
            c, other, c_left = (a, b, True) if isinstance(a, ClusterVal) else (b, a, False)
            return ClusterVal(tuple(
                (self.arith(op, m, other, e) if c_left else self.arith(op, other, m, e), w)
                for m, w in c.members))
        if op in "+-":
            return self.b.node("lincomb", (a, b), {"coeffs": (1.0, 1.0 if op == "+" else -1.0)},
                               e.span)
        space, scale = (a, b) if isinstance(a, Node) else (b, a)
        if op == "/":
            scale = 1.0 / scale
        return self.b.node("lincomb", (space,), {"coeffs": (scale,)}, e.span)

    # -- calls
    def call(self, e: ast.Call, env: _Env):
        callee = resolve_call(env.unit, e.func, env.locals)  # the checker made sure it calls
        if callee.definition is not None:
            return self.call_def(callee.unit, callee.definition, e, env)
        return self.call_builtin(callee.builtin, e, env)

    def call_def(self, unit: Unit, d: ast.Def, e: ast.Call, env: _Env):
        args = {name: self.value(a, env) for name, a in bind_def(d, e).bound.items()}
        for p in d.params:
            if p.name not in args:
                args[p.name] = self.value(p.default, _Env(unit, {}, {}, {}))
        key = (unit.path, d.name) + tuple(_memo_key(args[p.name]) for p in d.params)
        if key in self.def_memo:
            v, built = self.def_memo[key]
            self.b.built += built
            return v
        built = self.b.built
        inner = _Env(unit, args, {let.name: let for let in d.lets}, {})
        for let in d.lets:  # in order, as the checker does
            self.value(ast.Name(let.name, let.name_span), inner)
        v = self.value(d.body, inner)
        self.def_memo[key] = v, self.b.built - built
        return v

    def call_builtin(self, b: Builtin, e: ast.Call, env: _Env):
        binding = bind_builtin(b, e)
        args = dict(binding.bound)
        extra = [self.value(a, env) for a in binding.extra]
        kw = {name: self.value(k.value, env) for name, k in binding.extra_kwargs.items()}
        for p in b.params:
            if p.name in args:
                raw = args[p.name]
                args[p.name] = raw if p.type == "list" else self.value(raw, env)
            elif not p.required:
                args[p.name] = p.default
        special = getattr(self, f"_{b.name}", None)
        if special is not None:
            return special(args, extra, kw, e, env)
        return self.kernel(b, args, e)

    def kernel(self, b, args: dict, e):
        first = args[b.params[0].name]
        if b.broadcast and isinstance(first, ClusterVal):
            return ClusterVal(tuple(
                (self._kernel_node(b, {**args, b.params[0].name: m}, e, member=i), w)
                for i, (m, w) in enumerate(first.members)))
        return self._kernel_node(b, args, e, member=0)

    def _kernel_node(self, b, args: dict, e, member: int):
        inputs, attrs = [], {}
        for p in b.params:
            v = args[p.name]
            if isinstance(v, ClusterVal):
                inputs.extend(m for m, _ in v.members)
                attrs["weights"] = tuple(w for _, w in v.members)
            elif isinstance(v, Node):
                inputs.append(v)
            else:
                attrs[p.name] = int(v) if p.type == "int" else v
        if b.spec.seeded:  # the member's index is part of its random stream
            attrs["member"] = member
        node = self.b.node(b.op, inputs, attrs, e.span)
        if b.spec.per_member:  # one result per member of its cluster argument
            return ClusterVal(tuple((self.b.node("pick", (node,), {"index": i}), w)
                                    for i, w in enumerate(attrs["weights"])))
        return node

    def _select(self, args, extra, kw, e, env, op="select"):
        x = args["x"]
        if isinstance(x, ClusterVal):
            return ClusterVal(tuple((self.b.node(op, (m,), {"patterns": tuple(extra)}, e.span), w)
                                    for m, w in x.members))
        return self.b.node(op, (x,), {"patterns": tuple(extra)}, e.span)

    def _exclude(self, args, extra, kw, e, env):
        return self._select(args, extra, kw, e, env, op="exclude")

    def _layers(self, args, extra, kw, e, env):
        start, end = int(args["start"]), int(args["end"])
        return self._relayer(args["x"], start, end, 0, True, e.span)

    def _relayer(self, x, start: int, end: int | None, offset: int, others: bool, span=None):
        """A layer view step (io/layouts/llm.Slice) on x, member by member on a cluster."""
        attrs = {"start": start, "end": end, "offset": offset, "others": others}
        if isinstance(x, ClusterVal):
            return ClusterVal(tuple((self.b.node("layers", (m,), attrs, span), w)
                                    for m, w in x.members))
        return self.b.node("layers", (x,), attrs, span)

    def _stack(self, args, extra, kw, e, env):
        """s1 | s2's layers shifted past s1's | ...: disjoint keys, so `|` only places them;
        the keys outside the stack come from s1 (the later parts' are left out)."""
        parts = [args["slice"]] + extra
        out, offset = parts[0], slice_length(parts[0])
        for part in parts[1:]:
            shifted = self._relayer(part, 0, None, offset, False)
            out = self.b.node("union", (out, shifted), span=e.span)
            offset += slice_length(part)
        return out

    def _by_key(self, args, extra, kw, e, env):
        return KeyMap("by_key", tuple((k, float(v)) for k, v in args["weights"].items()))

    def _blocks(self, args, extra, kw, e, env):
        from karmixlang.blocks import all_slots
        arch = args["arch"]
        lst = args.get("weights")
        if lst is not None:
            values = [float(self.value(item.expr, env)) for item in lst.items]
            rules = tuple(zip(all_slots(arch), values))
        else:
            rules = tuple((k, float(v)) for k, v in kw.items())
        default = args.get("default")
        return KeyMap("blocks", rules, arch, None if default is None else float(default))

    def _glob(self, args, extra, kw, e, env):
        pattern = os.path.join(_folder(args["pattern"], env.unit), args["pattern"])
        files = sorted(globlib.glob(pattern), key=lambda p: os.fsencode(p))
        if not files:
            raise KmxError([error("K0307", f"glob matched no files: {pattern}", e.span,
                                  help="check the folder, or --set the param that names it")])
        return ClusterVal(tuple((self.load(env.unit, f, e, "model"), 1.0) for f in files))

    def _permutation(self, args, extra, kw, e, env):
        ends = []
        for name in ("model", "to"):
            node = args[name]
            if not isinstance(node, Node) or node.op != "load":
                raise KmxError([error(
                    "K0224", f"`{name}` of weight matching must be an input checkpoint",
                    e.span, help="match the models as they are read (`model b = ...`); "
                    "permute what is computed from them with `permute(x, p)`")])
            ends.append(node.attr("path"))
        groups = args.get("groups")
        spec = args["spec"]
        return PermVal(*ends, locate(spec, _folder(spec, env.unit)), int(args["iterations"]),
                       int(args["seed"]), None if groups is None else
                       tuple(str(self.value(item.expr, env)) for item in groups.items))

    def _permute(self, args, extra, kw, e, env, x=None):
        x = args["x"] if x is None else x
        attrs = args["p"].attrs()
        if isinstance(x, ClusterVal):
            return ClusterVal(tuple((self.b.node("permute", (m,), attrs, e.span), w)
                                    for m, w in x.members))
        return self.b.node("permute", (x,), attrs, e.span)

    def _align(self, args, extra, kw, e, env):
        p = self._permutation({**args, "model": args["x"]}, extra, kw, e, env)
        return self._permute({"p": p}, extra, kw, e, env, x=args["x"])

    def _balanced(self, args, extra, kw, e, env):
        members = []
        for item in args["clusters"].items:
            v = self.value(item.expr, env)
            if isinstance(v, str):
                v = self.load(env.unit, v, item.expr, "model")
            sub = v.members if isinstance(v, ClusterVal) else ((v, 1.0),)
            total = sum(w for _, w in sub)
            members.extend((m, w / total) for m, w in sub)
        return ClusterVal(tuple(members))

    # -- saves
    def save(self, unit: Unit, s: ast.Save) -> SaveSpec:
        env = _Env(unit, {}, {}, {})
        # What the save names first, as the checker did: the save's own depth stays its own.
        self._decls(references(unit, [s.expr] + [o.value for o in s.options]))
        written = self.string(s.path, env)
        opts = {o.name: self.value(o.value, env) for o in s.options}
        expr = self.value(s.expr, env)
        fallback, reason = opts.get("fallback"), "with fallback="
        if fallback is None:
            bases = {n for n in reachable([expr]) if n.op == "load" and n.attr("role") == "base"}
            fallback, reason = (bases.pop(), "the only base") if len(bases) == 1 else (None, "")
        sliced = slice_length(expr) is not None
        if sliced and any(n.op == "lora" for n in reachable([expr])):
            # a LoRA's modules are matched to keys by name, which the slices renumber
            raise KmxError([error(
                "K0351", "a LoRA in a save of layer slices: its modules would be matched to "
                "the renumbered layers", s.span, label="in this save",
                help="apply the LoRA in a save of its own, then slice that checkpoint")])
        if fallback is not None and sliced:
            # a stacked save: the base's layer i is not the stack's (docs/language.md)
            fallback = self._relayer(fallback, 0, 0, 0, True)
            reason += ", without its layer keys: the save is a layer stack"
        dtype = opts.get("dtype")
        return SaveSpec(
            path=os.path.abspath(os.path.join(unit.folder, written)), written=written, expr=expr,
            fallback=fallback, fallback_reason=reason,
            dtype=parse_user_dtype(dtype) if dtype else None,
            metadata=tuple(sorted((k, str(v)) for k, v in (opts.get("metadata") or {}).items())),
            shard=opts.get("shard"), delta=bool(opts.get("delta", False)), span=s.span,
            unmatched=opts.get("unmatched", "error"), lora=_rank(opts.get("lora")),
            lora_conv=_rank(opts.get("lora_conv")),
            tokenizer=_tokenizer(opts.get("tokenizer")))


def _tokenizer(v) -> str | None:
    """`tokenizer=`: "union", or the named model's path (the checker allows only these)."""
    return v.attr("path") if isinstance(v, Node) else v


def slice_length(node: Node) -> int | None:
    """How many layers a value made of layer slices has (None: whole models), from the
    `layers` steps below it. The checker made sure the slices of one computation agree
    (K0222), so any input that is a slice tells."""
    return fold_up(node, _length)


def _length(n: Node, inner: list[int | None]) -> int | None:
    known = [x for x in inner if x is not None]
    if n.op != "layers":
        # `|` of a slice and a whole model is a slice (a donor's embeddings on a stack)
        return max(known, default=None) if n.op == "union" else next(iter(known), None)
    if n.attr("end") is not None:  # a slice: layers(x, start, end)
        return n.attr("end") - n.attr("start") + n.attr("offset")
    return None if not known else known[0] + n.attr("offset")  # stack's shift of a part


def _rank(v) -> int | None:
    return None if v is None else int(v)


def _alias(p: Program, unit: Unit) -> str:
    for alias, u in p.root.imports.items():
        if u is unit:
            return alias
    return os.path.splitext(os.path.basename(unit.path))[0]


def _memo_key(v):
    """A hashable stand-in for a lowered value: a string keeps the folder it resolves from,
    and `true` is not `1`."""
    if isinstance(v, (bool, float, int)):
        return type(v), v
    if isinstance(v, PathText):
        return "path", str(v), v.folder
    if isinstance(v, dict):
        return "map", tuple((_memo_key(k), _memo_key(x)) for k, x in v.items())
    return v


def _is_num(v) -> bool:
    return isinstance(v, (int, float, KeyMap)) and not isinstance(v, bool)




def lower(program: Program) -> Graph:
    """Lower every save of the root recipe, plus its unused named values (so the optimizer's
    dead-code pass can show what it dropped)."""
    with recursion_room():
        return _lower(program)


def _lower(program: Program) -> Graph:
    lw = Lowerer(program)
    saves = [lw.save(program.root, s) for s in program.root.module.stmts if isinstance(s, ast.Save)]
    extra = []
    for name, d in program.root.decls.items():
        if isinstance(d, (ast.Let, ast.ClusterDecl, ast.ModelDecl, ast.LoraDecl)):
            v = lw.decl(program.root, name)
            extra.extend([v] if isinstance(v, Node) else
                         [m for m, _ in v.members] if isinstance(v, ClusterVal) else [])
    return Graph(saves, lw.b.origins, lw.names, built=lw.b.built, extra_roots=extra)
