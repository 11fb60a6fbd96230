"""The type checker: every expression's abstract value with the affine rules (Model / Delta /
Cluster). A Model is a space value of affine weight 1, a Delta of weight 0; a linear
combination carries the sum of its coefficients, and the weight is checked where the
combination is used (the top of an arithmetic expression). It reports every problem it finds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from karmixlang.syntax import ast
from karmixlang.builtins import BUILTINS, Builtin, P
from karmixlang.diagnostics import Diagnostic, Span, did_you_mean, error
from karmixlang.limits import MAX_EVAL_DEPTH, MAX_EVAL_STEPS
from karmixlang.check.binder import (Binding, Kind, bind_builtin, bind_def, resolve_call,
                                     resolve_name)
from karmixlang.check.program import Program, Unit
from karmixlang.check.rules import BuiltinRules
from karmixlang.check.values import BUSY, ANY, DELTA, ERR, MAX_GAIN, MODEL, Ty, affine


class TooDeep(Exception):
    """Evaluation went past limits.MAX_EVAL_DEPTH or MAX_EVAL_STEPS at `span` (K0004)."""

    def __init__(self, span: Span, message: str):
        super().__init__(message)
        self.span = span
        self.message = message


@dataclass
class Scope:
    unit: Unit
    locals: dict[str, Ty] = field(default_factory=dict)
    lets: dict[str, ast.Let] = field(default_factory=dict)  # a def body's lets, lazily typed
    def_stack: tuple[str, ...] = ()


class Checker(BuiltinRules):
    def __init__(self, program: Program, diags: list[Diagnostic]):
        self.p = program
        self.diags = diags
        self.memo: dict[tuple[str, str], Ty] = {}
        self.active: list[tuple[str, str]] = []
        # A def's result per argument types, with the levels and steps its body took: each
        # def is checked once per distinct call, so defs calling defs twice stay linear.
        self.def_memo: dict[tuple, tuple[Ty, int, int]] = {}
        self.depth = 0  # evaluation levels now open (limits.MAX_EVAL_DEPTH)
        self.peak = 0  # the deepest level reached since the current def call began
        self.steps = 0  # expression nodes evaluated, def calls expanded (MAX_EVAL_STEPS)

    def err(self, code, msg, span, **kw):
        self.diags.append(error(code, msg, span, **kw))
        return ERR

    # -- declarations
    def decl_type(self, unit: Unit, name: str, ref_span: Span) -> Ty:
        key = (unit.path, name)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            cycle = self.active[self.active.index(key):] + [key]
            return self.err("K0108", "cycle: " + " -> ".join(n for _, n in cycle), ref_span,
                            label="used here before it can be computed",
                            help="a definition cannot depend on itself")
        self.active.append(key)
        try:
            ty = self._decl_type(unit, unit.decls[name])
        finally:
            self.active.pop()
        self.memo[key] = ty
        return ty

    def _decl_type(self, unit: Unit, d: ast.Decl) -> Ty:
        scope = Scope(unit)
        if isinstance(d, ast.ModelDecl):
            self.string(d.path, scope)
            return MODEL
        if isinstance(d, ast.LoraDecl):  # a LoRA's entries are its deltas: gain 1 (lora.md)
            self.string(d.path, scope)
            return DELTA
        if isinstance(d, ast.ClusterDecl):
            ty = self.value(d.expr, scope)
            if ty.kind not in ("cluster", "any", "error"):
                return self.err("K0202", f"`{d.name}` is declared a cluster but is a "
                                f"{ty.describe()}", d.expr.span,
                                help="use `let` for a single model or delta")
            return ty
        if isinstance(d, ast.Let):
            return self.value(d.expr, scope)
        if isinstance(d, ast.Param):
            v = unit.params.get(d.name)
            if isinstance(d.value, ast.String) and not d.value.is_plain:
                part = next(p for p in d.value.parts if isinstance(p, ast.Interp))
                return self.err("K0003", "a param's value cannot interpolate", part.span,
                                label="interpolation in a param",
                                help="write the value literally, or interpolate where the "
                                     "string is used: \"${name}/x.safetensors\"")
            if isinstance(v, float) and not math.isfinite(v):
                return self.err("K0204", f"`{d.name}` = {unit.param_text[d.name]} is too large "
                                "for a number", d.value.span)
            kind = "bool" if isinstance(v, bool) else "number" if isinstance(v, float) else "string"
            return Ty(kind, value=v)
        if isinstance(d, ast.Import):
            return Ty("lib", value=d.alias)
        return Ty("func", value=d.name)

    # -- expressions
    def value(self, e, scope: Scope) -> Ty:
        """The type of an expression used as a value: arithmetic must have come out affine."""
        ty = self.expr(e, scope)
        if ty.kind in ("lib", "func"):
            what = "an imported file" if ty.kind == "lib" else "a function"
            return self.err("K0202", f"`{ty.value}` is {what}, not a value", e.span,
                            help="use a member `lib.name`" if ty.kind == "lib" else
                            f"call it: `{ty.value}(...)`")
        if isinstance(e, (ast.BinOp, ast.Neg)) and ty.kind in ("space", "cluster"):
            if ty.weight is not None and affine(ty.weight) is None:
                return self.err(
                    "K0201", f"the coefficients of models sum to {ty.weight:g}, not 1 or 0",
                    e.span, label="neither a Model nor a Delta",
                    help="a Model needs coefficients summing to 1: `lerp(a, b, 0.5)`, "
                         "`mean([a, b])` or `0.3*a + 0.7*b`; a Delta sums to 0: `a - b`")
        return ty

    def expr(self, e, scope: Scope) -> Ty:
        self.depth += 1
        try:
            self._reach(self.depth, 1, e.span)
            return self._expr(e, scope)
        finally:
            self.depth -= 1

    def _reach(self, depth: int, steps: int, span: Span) -> None:
        """Account for evaluation `depth` levels deep and `steps` more expression nodes."""
        self.steps += steps
        if depth > MAX_EVAL_DEPTH:
            raise TooDeep(span, f"evaluation nested more than {MAX_EVAL_DEPTH} levels deep")
        if self.steps > MAX_EVAL_STEPS:
            raise TooDeep(span, f"the recipe expands to more than {MAX_EVAL_STEPS:,} "
                          "evaluation steps")
        self.peak = max(self.peak, depth)

    def _expr(self, e, scope: Scope) -> Ty:
        if isinstance(e, ast.Number):
            if not math.isfinite(e.value):
                return self.err("K0204", f"`{e.text}` is too large for a number", e.span)
            return Ty("number", value=e.value)
        if isinstance(e, ast.String):
            return self.string(e, scope)
        if isinstance(e, ast.Bool):
            return Ty("bool", value=e.value)
        if isinstance(e, ast.Name):
            return self.name(e, scope)
        if isinstance(e, ast.Member):
            return self.member(e, scope)
        if isinstance(e, ast.Neg):
            return self.arith("neg", None, self.expr(e.operand, scope), e)
        if isinstance(e, ast.BinOp):
            if e.op == "|":
                return self.union(e, scope)
            return self.arith(e.op, self.expr(e.left, scope), self.expr(e.right, scope), e)
        if isinstance(e, ast.ClusterLit):
            return self.cluster(e, scope)
        if isinstance(e, ast.MapLit):
            for pair in e.pairs:
                self.string(pair.key, scope)
                self.value(pair.value, scope)
            return Ty("map")
        if isinstance(e, ast.Call):
            return self.call(e, scope)
        raise AssertionError(f"unknown node {e!r}")

    def string(self, s: ast.String, scope: Scope) -> Ty:
        text, bad = [], False
        for part in s.parts:
            if isinstance(part, str):
                text.append(part)
                continue
            unit = scope.unit
            if part.lib is not None:
                unit = unit.imports.get(part.lib)
                if unit is None:
                    if part.lib not in scope.unit.imports:  # else the import failed: reported
                        self.err("K0102", f"unknown import `{part.lib}`", part.span)
                    bad = True
                    continue
            decl = unit.decls.get(part.name)
            if decl is None:
                hint = did_you_mean(part.name, [n for n, d in unit.decls.items()
                                                if isinstance(d, ast.Param)])
                self.err("K0102", f"unknown param `{part.name}` in interpolation", part.span,
                         label="not a param of this file",
                         help=f"did you mean `{hint}`?" if hint else "declare it with `param`")
                bad = True
                continue
            if not isinstance(decl, ast.Param):
                self.err("K0202", f"only params can be interpolated; `{part.name}` is not one",
                         part.span)
                bad = True
                continue
            text.append(unit.param_text[part.name])
        return ERR if bad else Ty("string", value="".join(text))

    def name(self, e: ast.Name, scope: Scope) -> Ty:
        ref = resolve_name(scope.unit, e.name, scope.locals, scope.lets)
        if ref.kind is Kind.PARAM:
            return scope.locals[e.name]
        if ref.kind is Kind.LET:
            key = f"{scope.def_stack[-1]}.{e.name}"
            if scope.locals.get(key) == BUSY:
                scope.locals[key] = ERR
                return self.err("K0108", f"cycle: `{e.name}` depends on itself in "
                                f"`{scope.def_stack[-1]}`", e.span,
                                label="used here before it can be computed",
                                help="a definition cannot depend on itself")
            if key in scope.locals:
                return scope.locals[key]
            scope.locals[key] = BUSY
            scope.locals[key] = self.value(scope.lets[e.name].expr, scope)
            return scope.locals[key]
        if ref.kind is Kind.DECL:
            return self.decl_type(scope.unit, e.name, e.span)
        if ref.kind is Kind.BUILTIN:
            return self.err("K0202", f"`{e.name}` is a function; call it", e.span,
                            help=f"`{BUILTINS[e.name].signature()}`")
        candidates = list(scope.unit.decls) + list(scope.locals) + list(scope.lets)
        hint = did_you_mean(e.name, [c for c in candidates if "." not in c])
        help_ = None
        if hint:
            where = ""
            d = scope.unit.decls.get(hint)
            if d is not None:
                kind = type(d).__name__.replace("Decl", "").lower()
                kind = "base" if getattr(d, "is_base", False) else kind
                where = f" ({kind} defined at {d.name_span})"
            help_ = f"did you mean `{hint}`?{where}"
        return self.err("K0102", f"unknown name `{e.name}`", e.span,
                        label="not defined in this file", help=help_)

    def member(self, e: ast.Member, scope: Scope) -> Ty:
        unit = scope.unit.imports.get(e.lib)
        if unit is None:
            if e.lib in scope.unit.imports:
                return ERR  # the import itself failed and was reported
            if e.lib in scope.unit.decls or e.lib in scope.locals:
                return self.err("K0115", f"`{e.lib}` is not an imported file", e.span)
            return self.err("K0102", f"unknown import `{e.lib}`", e.span,
                            help="import a file with `import \"PATH.kmx\" as NAME`")
        if e.name not in unit.decls:
            hint = did_you_mean(e.name, unit.decls)
            return self.err("K0115", f"`{e.lib}` has no member `{e.name}`", e.span,
                            help=f"did you mean `{e.lib}.{hint}`?" if hint else None)
        return self.decl_type(unit, e.name, e.span)

    def arith(self, op: str, a: Ty | None, b: Ty, e) -> Ty:
        if (a is not None and a.kind in ("error", "any")) or b.kind in ("error", "any"):
            return ERR if ERR in (a, b) else ANY
        if op == "neg":
            if b.kind == "number":
                return Ty("number", value=None if b.value is None else -b.value)
            if b.kind in ("space", "cluster"):
                return Ty(b.kind, None if b.weight is None else -b.weight, size=b.size,
                          gain=b.gain, layers=b.layers)
            return self._bad_operand("-", b, e)
        nums = a.kind == "number" and b.kind == "number"
        if nums:
            if op == "/" and b.value == 0:
                return self.err("K0204", "division by zero", e.span)
            known = a.value is not None and b.value is not None
            ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y,
                   "*": lambda x, y: x * y, "/": lambda x, y: x / y}
            v = ops[op](a.value, b.value) if known else None
            if v is not None and not math.isfinite(v):
                return self.err("K0204", "the result is too large for a number", e.span)
            return Ty("number", value=v)
        if op in "+-":
            if a.kind in ("space", "cluster") and b.kind in ("space", "cluster"):
                if a.kind == "cluster" and b.kind == "cluster":
                    return self.err("K0202", f"cannot {'add' if op == '+' else 'subtract'} two "
                                    "clusters", e.span,
                                    help="combine clusters with a cluster literal: `[c1, c2]`")
                wa, wb = a.weight, b.weight
                w = None if wa is None or wb is None else (wa + wb if op == "+" else wa - wb)
                kind = "cluster" if "cluster" in (a.kind, b.kind) else "space"
                size = a.size if a.kind == "cluster" else b.size
                length = self.slice_length([a, b], e)
                if length is ERR:
                    return ERR
                return self.bounded(Ty(kind, w, size=size, gain=_sum(a.gain, b.gain),
                                       layers=length), e)
            return self._bad_operand(op, b if a.kind in ("space", "cluster") else a, e)
        # * and /
        space, num = (a, b) if a.kind in ("space", "cluster") else (b, a)
        if op == "/" and a.kind not in ("space", "cluster"):
            return self._bad_operand("/", b, e)
        if space.kind not in ("space", "cluster") or num.kind not in ("number", "keymap"):
            return self.err("K0202", f"cannot multiply {a.describe()} by {b.describe()}", e.span,
                            help="scale models and deltas by numbers")
        if op == "/" and num.value == 0:
            return self.err("K0204", "division by zero", e.span)
        if num.kind == "keymap" or num.value is None:
            if affine(space.weight) != 0 and num.kind == "keymap":
                return self.err("K0202", "a per-key number can only scale a Delta", e.span,
                                help="interpolate models with `lerp(a, b, t=blocks(...))`")
            w = 0.0 if affine(space.weight) == 0 else None
        else:
            w = None if space.weight is None else (
                space.weight * num.value if op == "*" else space.weight / num.value)
        factor = num.gain if num.kind == "keymap" else None if num.value is None else \
            abs(num.value) if op == "*" else 1 / abs(num.value)
        return self.bounded(Ty(space.kind, w, size=space.size, gain=_product(space.gain, factor),
                               layers=space.layers), e)

    def bounded(self, ty: Ty, e) -> Ty:
        """The value, or K0204 when scaling can make it more than MAX_GAIN times its inputs."""
        if ty.gain is not None and not ty.gain <= MAX_GAIN:
            return self.err("K0204", f"this can be {ty.gain:.3g} times larger than the models it "
                            f"is computed from (at most {MAX_GAIN:g})", e.span,
                            label="scaled too much",
                            help="the factors multiply through nested expressions; keep their "
                                 "product (docs/language.md, \"Numbers\")")
        return ty

    def _bad_operand(self, op: str, ty: Ty, e) -> Ty:
        return self.err("K0202", f"`{op}` cannot be applied to a {ty.describe()}", e.span)

    def union(self, e: ast.BinOp, scope: Scope) -> Ty:
        a, b = self.value(e.left, scope), self.value(e.right, scope)
        if ERR in (a, b) or ANY in (a, b):
            return ERR if ERR in (a, b) else ANY
        if a.kind != "space" or b.kind != "space" or affine(a.weight) != affine(b.weight):
            return self.err("K0202", f"`|` needs two Models or two Deltas, got {a.describe()} | "
                            f"{b.describe()}", e.span,
                            help="`x | y` takes each key from y when y has it, else from x")
        # a slice on either side makes a slice: a stack may take a donor's embeddings
        lengths = [t.layers for t in (a, b) if t.layers is not None]
        return replace(a, layers=max(lengths, default=None))

    def cluster(self, e: ast.ClusterLit, scope: Scope) -> Ty:
        if not e.items:
            return self.err("K0207", "empty cluster", e.span, help="list at least one model")
        weights = set()
        size = 0
        gains: list[float | None] = []
        members: list[Ty] = []
        for item in e.items:
            ty = self.value(item.expr, scope) if not isinstance(item.expr, ast.String) else MODEL
            if isinstance(item.expr, ast.String):
                self.string(item.expr, scope)
            scale = 1.0
            if item.weight is not None:
                wty = self.value(item.weight, scope)
                scale = abs(wty.value) if wty.kind == "number" and wty.value is not None \
                    else None
                if wty.kind != "number":
                    if wty.kind not in ("error", "any"):
                        self.err("K0202", "a cluster weight is a number", item.weight.span)
                elif wty.value is not None and wty.value <= 0:
                    self.err("K0206", f"weight {wty.value:g} is not positive", item.weight.span,
                             help="drop the member instead of giving it a zero weight")
            if ty.kind in ("error", "any"):
                return ty  # unknown members (a def's parameters): nothing more to check
            if ty.kind not in ("space", "cluster"):
                self.err("K0202", f"a cluster holds models or deltas, not a {ty.describe()}",
                         item.expr.span)
                continue
            if size is not None:
                size = None if ty.kind == "cluster" and ty.size is None else \
                    size + (ty.size if ty.kind == "cluster" else 1)
            weights.add(affine(ty.weight))
            gains.append(_product(ty.gain, scale))
            members.append(ty)
        if len(weights) > 1:
            return self.err("K0202", "a cluster mixes models and deltas", e.span,
                            help="subtract a base from the models: `[a - base, d]`")
        w = weights.pop() if weights else None
        gain = None if None in gains or not gains else max(gains)
        length = self.slice_length(members, e)
        if length is ERR:
            return ERR
        return self.bounded(Ty("cluster", None if w is None else float(w), size=size, gain=gain,
                               layers=length), e)

    def slice_length(self, tys: list[Ty], e) -> int | None | Ty:
        """The layer count of the slices a value is computed from (None: whole models), or ERR
        with K0222 when they differ or a slice meets a whole model (docs/language.md,
        "Layer slices")."""
        lengths = {t.layers for t in tys if t.kind in ("space", "cluster")}
        if len(lengths) < 2:
            return lengths.pop() if lengths else None
        known = " and ".join(str(n) for n in sorted(n for n in lengths if n is not None))
        what = f"a slice of {known} layers and a whole model" if None in lengths else \
            f"slices of {known} layers"
        return self.err("K0222", f"cannot combine {what}: layer i of each must be the same "
                        "layer of the result", e.span,
                        help="cut every model to slices of one length: `layers(x, start, end)`")

    # -- calls
    def call(self, e: ast.Call, scope: Scope) -> Ty:
        callee = resolve_call(scope.unit, e.func, scope.locals)
        if callee.definition is not None:
            return self.call_def(callee.unit, callee.definition, e, scope)
        if callee.builtin is not None:
            return self.call_builtin(callee.builtin, e, scope)
        if isinstance(e.func, ast.Member):  # why it is not a def of an imported file
            unit = scope.unit.imports.get(e.func.lib)
            if unit is None or e.func.name not in unit.decls:
                self.member(e.func, scope)
                return ERR
            return self.err("K0114", f"`{e.func.lib}.{e.func.name}` is not a function",
                            e.func.span)
        name = e.func.name
        d = scope.unit.decls.get(name)
        if d is not None or name in scope.locals or name in scope.lets:
            return self.err("K0114", f"`{name}` is not a function", e.func.span)
        defs = [n for n, x in scope.unit.decls.items() if isinstance(x, ast.Def)]
        hint = did_you_mean(name, list(BUILTINS) + defs)
        return self.err("K0103", f"unknown function `{name}`", e.func.span,
                        help=f"did you mean `{hint}`?" if hint else "`kmx methods` lists them")

    def report(self, binding: Binding) -> bool:
        """Report what did not bind; True when every argument found its parameter."""
        for code, message, span, help_, label in binding.problems:
            self.err(code, message, span, help=help_, label=label)
        return not binding.problems

    def call_def(self, unit: Unit, d: ast.Def, e: ast.Call, scope: Scope) -> Ty:
        if d.name in scope.def_stack:
            chain = " -> ".join(scope.def_stack[scope.def_stack.index(d.name):] + (d.name,))
            return self.err("K0108", f"recursive def: {chain}", e.span,
                            help="a def cannot call itself, directly or through others")
        binding = bind_def(d, e)
        ok, bound = self.report(binding), binding.bound
        local = {}
        for p in d.params:
            if p.name in bound:
                local[p.name] = self.value(bound[p.name], scope)
            elif p.default is not None:
                local[p.name] = self.expr(p.default, Scope(unit))
        if not ok:
            return ERR
        key = (unit.path, d.name, tuple(local[p.name] for p in d.params))
        if key in self.def_memo:  # the same body with the same types: the same result
            ty, levels, steps = self.def_memo[key]
            self._reach(self.depth + levels, steps, e.span)  # lowering will do this work here
            return ty
        outer_peak, self.peak = self.peak, self.depth
        steps = self.steps
        inner = Scope(unit, local, {let.name: let for let in d.lets},
                      scope.def_stack + (d.name,))
        for let in d.lets:  # in order, as check_def does: a cycle is found (and told) once
            self.name(ast.Name(let.name, let.name_span), inner)
        ty = self.value(d.body, inner)
        self.def_memo[key] = ty, self.peak - self.depth, self.steps - steps
        self.peak = max(outer_peak, self.peak)
        return ty

    def check_def(self, unit: Unit, d: ast.Def) -> None:
        """Check a def's body once with unknown argument types (finds unknown names even in a
        def nobody calls)."""
        seen = set()
        for p in d.params:
            if p.name in seen:
                self.err("K0101", f"parameter `{p.name}` is defined twice", p.span)
            seen.add(p.name)
        lets = {}
        for let in d.lets:
            if let.name in lets or let.name in seen:
                self.err("K0101", f"`{let.name}` is defined twice in `{d.name}`", let.name_span)
            lets[let.name] = let
        local = {p.name: ANY for p in d.params}
        inner = Scope(unit, local, lets, (d.name,))
        for let in d.lets:
            self.name(ast.Name(let.name, let.name_span), inner)
        self.value(d.body, inner)

    def call_builtin(self, b: Builtin, e: ast.Call, scope: Scope) -> Ty:
        binding = bind_builtin(b, e)
        ok = self.report(binding)
        bound, extra, kw_extra = binding.bound, binding.extra, binding.extra_kwargs
        tys: dict[str, Ty] = {}
        for p in b.params:
            if p.name in bound:
                tys[p.name] = self.arg(b, p, bound[p.name], scope)
        for i, arg in enumerate(extra):
            ty = self.arg(b, b.varargs, arg, scope)
            if b.varargs.type == "space":  # stack's later slices: typed like parameters
                tys[f"{b.varargs.name}.{i}"] = ty
        if b.varargs is not None and b.varargs.type == "string" and not extra and ok:
            # select/exclude need a pattern
            self.err("K0105", f"`{b.name}` needs at least one key pattern", e.span,
                     help=f'`{b.name}(x, "first_stage_model.*")`')
        if not ok or any(t.kind == "error" for t in tys.values()):
            return ERR
        special = getattr(self, f"_check_{b.name}", None)
        if special is not None:
            keymap = special(b, bound, tys, kw_extra, e, scope)
            if keymap is not None:  # by_key and blocks know their values' largest magnitude
                return keymap
        ty = self.result(b, tys, e)
        if ty.kind in ("space", "cluster"):
            length = self.slice_length(list(tys.values()), e)
            if length is ERR:
                return ERR
            ty = self.bounded(replace(ty, gain=self.gain(b, tys), layers=length), e)
        return ty

    def arg(self, b: Builtin, p: P, expr, scope: Scope) -> Ty:
        if p.type == "list":
            if not isinstance(expr, ast.ClusterLit):
                return self.err("K0202", f"`{b.name}` expects a list `[...]` for `{p.name}`",
                                expr.span)
            # balanced() takes a cluster literal of sub-clusters; blocks() a list of numbers.
            return self.cluster(expr, scope) if b.name == "balanced" else Ty("list", value=expr)
        ty = self.value(expr, scope)
        if ty.kind in ("error", "any"):
            return ty
        want = p.type
        w = affine(ty.weight)
        ok = {
            "space": ty.kind == "space" or (b.broadcast and ty.kind == "cluster"),
            "model": ty.kind == "space" and w == 1,
            "delta": (ty.kind == "space" or (b.broadcast and ty.kind == "cluster")) and w == 0,
            "cluster": ty.kind == "cluster",
            "mcluster": ty.kind == "cluster" and w == 1,
            "dcluster": ty.kind == "cluster" and w == 0,
            "number": ty.kind == "number" or (p.keymap and ty.kind == "keymap"),
            "int": ty.kind == "number",
            "string": ty.kind == "string",
            "bool": ty.kind == "bool",
            "map": ty.kind == "map",
            "perm": ty.kind == "perm",
        }[want]
        if not ok:
            names = {"space": "a Model or a Delta", "model": "a Model", "delta": "a Delta",
                     "cluster": "a Cluster", "mcluster": "a Cluster of models",
                     "dcluster": "a Cluster of deltas", "number": "a Number", "int": "an integer",
                     "string": "a String", "bool": "`true` or `false`", "map": "a map `{...}`",
                     "perm": "a Permutation"}
            help_ = None
            if want in ("delta", "dcluster") and w == 1:
                help_ = f"subtract a base to get task vectors: `{b.name}(x - base, ...)`"
            elif want == "number" and ty.kind == "keymap":
                help_ = f"`{p.name}` cannot vary per key"
            return self.err("K0202", f"`{b.name}` expects {names[want]} for `{p.name}`, got "
                            f"{ty.describe()}", expr.span, help=help_)
        if ty.kind == "number" and ty.value is not None:
            if want == "int" and (not math.isfinite(ty.value) or ty.value != int(ty.value)):
                return self.err("K0204", f"`{p.name}` must be an integer, got {ty.value:g}",
                                expr.span)
            if not p.in_range(ty.value):
                return self.err("K0204", f"`{p.name}` = {ty.value:g} is outside {p.range_text()}",
                                expr.span, label="out of range", help=p.doc or None)
        if p.choices and ty.kind == "string" and ty.value not in p.choices:
            hint = did_you_mean(str(ty.value), p.choices)
            return self.err("K0204", f"`{p.name}` must be one of "
                            + ", ".join(f'"{c}"' for c in p.choices), expr.span,
                            help=f'did you mean "{hint}"?' if hint else None)
        return ty

    def result(self, b: Builtin, tys: dict[str, Ty], e) -> Ty:
        first = tys.get(b.params[0].name, ANY) if b.params else ANY
        if first.kind == "any" and b.returns in ("first", "elem", "delta", "cluster"):
            return ANY  # inside a def checked without its arguments' types
        if b.returns == "first":
            return first
        if b.returns == "elem":
            return Ty("space", first.weight, gain=first.gain)
        if b.returns == "model":
            return MODEL
        if b.returns == "delta":
            return Ty("cluster", 0.0, size=first.size) if first.kind == "cluster" and \
                b.broadcast else DELTA
        if b.returns == "keymap":
            return Ty("keymap")
        if b.returns == "perm":
            return Ty("perm")
        if b.returns == "mcluster":
            return Ty("cluster", 1.0)
        return tys["clusters"]  # balanced(): the sub-clusters' common type



def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _product(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a * b
