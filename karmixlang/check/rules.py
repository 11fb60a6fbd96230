"""The builtin-specific checks: value ranges and agreements that involve several parameters
of one call (DELLA's p with eps, breadcrumbs' density with gamma, blocks' slots, ...). A mixin
of the type checker: `Checker.call_builtin` calls `_check_<name>` when it exists."""

from __future__ import annotations

import re
from dataclasses import replace

from karmixlang.blocks import OPTIONAL_SLOTS, SLOTS
from pathlib import Path

from karmixlang.diagnostics import KmxError, did_you_mean, warning
from karmixlang.io.rebasin_spec import load_spec
from karmixlang.check.values import ANY, ERR, TOL, Ty, affine
from karmixlang.ops import OPS, within_inputs


class BuiltinRules:
    def gain(self, b, tys) -> float | None:
        """At most how many times larger than its inputs' entries a call's result can get
        (Ty.gain): its op spec's `gain` (karmixlang/ops.py) of its arguments' types."""
        gains = {n: t.gain for n, t in tys.items() if t.kind in ("space", "cluster")}
        if None in gains.values():
            return None

        def arg(name, default):
            t = tys.get(name)
            return default if t is None else t.value if t.kind in ("number", "bool") else \
                None if t.gain is None else -t.gain  # a keymap: the worst of ±its largest
        size = next((t.size for t in tys.values() if t.kind == "cluster"), None)
        gain = OPS[b.op].gain if b.op else within_inputs  # glob, balanced: their members
        return gain(max(gains.values(), default=1.0), gains, arg, size)

    def _check_lerp(self, b, bound, tys, kw, e, scope):
        t = tys.get("t")
        if t and t.kind == "number" and t.value is not None and not 0 <= t.value <= 1:
            self.diags.append(warning("K0210", f"t = {t.value:g} extrapolates beyond the two "
                                      "inputs", bound["t"].span,
                                      help="t in [0, 1] interpolates"))
        self._same_kind(b, tys, ("a", "b"), e)

    _check_slerp = _check_lerp

    def _check_add_difference(self, b, bound, tys, kw, e, scope):
        self._same_kind(b, tys, ("b", "c"), e)

    _check_train_difference = _check_add_difference

    def _same_kind(self, b, tys, names, e):
        kinds = {affine(tys[n].weight) for n in names if n in tys and tys[n].kind == "space"}
        if len(kinds) > 1:
            self.err("K0202", f"`{b.name}` needs {' and '.join(names)} of one kind (both models "
                     "or both deltas)", e.span)

    def _check_permutation(self, b, bound, tys, kw, e, scope):
        """The spec is found and valid on its own (K0116, K0223), the groups are its own
        (K0117); its keys are checked against the models when planning."""
        spec_ty = tys.get("spec")
        spec = None
        if spec_ty is not None and isinstance(spec_ty.value, str) and spec_ty.value != "auto":
            try:
                spec = load_spec(spec_ty.value, Path(scope.unit.folder), bound["spec"].span)
            except KmxError as exc:
                self.diags.extend(exc.diagnostics)
        if "groups" not in bound:
            return
        names = [g.name for g in spec.groups] if spec is not None else None
        for item in bound["groups"].items:
            ty = self.value(item.expr, scope)
            if ty.kind in ("error", "any"):
                continue
            if ty.kind != "string" or item.weight is not None:
                self.err("K0202", "`groups` lists the names of permutations, as strings",
                         item.expr.span)
            elif names is not None and ty.value not in names:
                hint = did_you_mean(ty.value, names)
                self.err("K0117", f"the spec {spec.source} has no permutation \"{ty.value}\"",
                         item.expr.span, help=f'did you mean "{hint}"?' if hint else
                         f"its permutations: {', '.join(names[:8])}"
                         + (", ..." if len(names) > 8 else ""))

    _check_align = _check_permutation

    def _check_model_stock(self, b, bound, tys, kw, e, scope):
        c = tys.get("c")
        if c and c.size is not None and c.size < 2:
            self.err("K0204", "model_stock needs at least 2 models", bound["c"].span)

    def _check_della(self, b, bound, tys, kw, e, scope):
        p, eps = tys.get("p"), tys.get("eps")
        rescale = tys.get("rescale", Ty("bool", value=True)).value
        if p and eps and p.value is not None and eps.value is not None and rescale is not False:
            lo, hi = 1 - p.value - eps.value, 1 - p.value + eps.value
            if lo <= 0 and hi <= 0:
                self.err("K0205", f"with p = {p.value:g} and eps = {eps.value:g} every entry is "
                         "dropped and rescaling divides by zero", e.span,
                         help="lower p or |eps|, or pass rescale=false")

    def _check_breadcrumbs(self, b, bound, tys, kw, e, scope):
        d, g = tys.get("density"), tys.get("gamma", Ty("number", value=0.01))
        if d and d.value is not None and g.value is not None and d.value + g.value > 1 + TOL:
            self.err("K0204", f"density + gamma = {d.value + g.value:g} exceeds 1", e.span)

    def _check_clamp(self, b, bound, tys, kw, e, scope):
        lo, hi = tys.get("lo"), tys.get("hi")
        if lo and hi and lo.value is not None and hi.value is not None and lo.value > hi.value:
            self.err("K0204", f"lo = {lo.value:g} is greater than hi = {hi.value:g}", e.span)

    def _check_select(self, b, bound, tys, kw, e, scope):
        for arg in e.args[1:]:
            self._pattern(self.expr(arg, scope), arg.span)

    _check_exclude = _check_select

    def _check_rename(self, b, bound, tys, kw, e, scope):
        pattern, repl = tys.get("pattern"), tys.get("replacement")
        if pattern is None or not isinstance(pattern.value, str):
            return
        try:
            if _group_depth(pattern.value) > MAX_REGEX_DEPTH:
                raise re.error(f"groups nested more than {MAX_REGEX_DEPTH} levels")
            rx = re.compile(pattern.value)
        except (re.error, OverflowError) as exc:
            self.err("K0214", f"invalid regular expression: {exc}", bound["pattern"].span,
                     help="rename's pattern is a Python regular expression (no `re:` prefix)")
            return
        if repl is not None and isinstance(repl.value, str):
            try:  # Python checks a replacement's group references before any match
                rx.sub(repl.value, "")
            except (re.error, IndexError) as exc:
                self.err("K0215", f"invalid replacement: {exc}", bound["replacement"].span,
                         help=f"the pattern has {rx.groups} group(s); in a recipe string a "
                              "backslash is written twice: \"\\\\1\" is group 1")

    def _check_layers(self, b, bound, tys, kw, e, scope):
        """Its type: x as a slice of end - start layers (K0220 for an empty range)."""
        x, start, end = tys["x"], tys["start"].value, tys["end"].value
        if x.kind == "any" or start is None or end is None:
            return ANY  # a def checked without its arguments' values
        if start >= end:
            return self.err("K0220", f"layers {start:g} to {end:g} is an empty range", e.span,
                            help="`layers(x, start, end)` keeps start <= i < end: end is "
                                 "one past the last layer kept")
        return replace(x, layers=int(end - start))

    def _check_stack(self, b, bound, tys, kw, e, scope):
        """Its type: a slice as long as its parts together (K0221: a part that is not a slice;
        K0202: models and deltas mixed)."""
        parts = [(bound["slice"], tys["slice"])] + \
            [(arg, tys[f"slices.{i}"]) for i, arg in enumerate(e.args[1:])]
        if any(t.kind == "any" for _, t in parts):
            return ANY
        bad = [arg for arg, t in parts if t.layers is None]
        for arg in bad:
            self.err("K0221", "this part of the stack is not a layer slice", arg.span,
                     label="a whole model",
                     help="give its layer range: `layers(x, start, end)`")
        if len({affine(t.weight) for _, t in parts}) > 1:
            return self.err("K0202", "`stack` needs slices of models only or deltas only",
                            e.span)
        if bad:
            return ERR
        first = parts[0][1]
        gains = [t.gain for _, t in parts]
        return replace(first, layers=sum(t.layers for _, t in parts),
                       gain=None if None in gains else max(gains))

    def _check_by_key(self, b, bound, tys, kw, e, scope):
        m = bound.get("weights")
        values = []
        for pair in getattr(m, "pairs", ()):
            self._pattern(self.string(pair.key, scope), pair.key.span)
            ty = self.value(pair.value, scope)
            values.append(ty.value if ty.kind == "number" else None)
            if ty.kind not in ("number", "error", "any"):
                self.err("K0202", "by_key values are numbers", pair.value.span)
        return _keymap(values)

    def _pattern(self, ty, span) -> None:
        """K0204 for a `re:` key pattern that is not a regular expression, or one nested so
        deeply that compiling it where it is used (the plan, the run) would overflow."""
        if isinstance(ty.value, str) and ty.value.startswith("re:"):
            problem = None
            if _group_depth(ty.value[3:]) > MAX_REGEX_DEPTH:
                problem = f"groups nested more than {MAX_REGEX_DEPTH} levels"
            else:
                try:
                    re.compile(ty.value[3:])
                except (re.error, OverflowError) as exc:  # OverflowError: a{4294967296}
                    problem = str(exc)
            if problem:
                self.err("K0204", f"invalid regular expression: {problem}", span,
                         help="a pattern starting with `re:` is a Python regular expression")

    def _check_blocks(self, b, bound, tys, kw, e, scope):
        arch = tys["arch"].value
        if arch not in SLOTS:
            return
        slots, optional = SLOTS[arch], OPTIONAL_SLOTS[arch]
        allowed = slots + optional
        listing = f"slots of \"{arch}\": {', '.join(allowed)}"
        lst = bound.get("weights")
        default = tys.get("default")
        values = [] if default is None else [default.value]
        if lst is not None and kw:
            self.err("K0209", "give block weights as a list or as slot keywords, not both",
                     e.span)
        if lst is not None:
            n = len(lst.items)
            if n not in (len(slots), len(allowed)):
                counts = " or ".join(str(c) for c in sorted({len(slots), len(allowed)}))
                self.err("K0209", f"\"{arch}\" takes {counts} block weights, got {n}", lst.span,
                         help=listing)
            for item in lst.items:
                ty = self.value(item.expr, scope)
                values.append(ty.value if ty.kind == "number" else None)
                if ty.kind not in ("number", "error", "any") or item.weight is not None:
                    self.err("K0209", "block weights are numbers", item.span)
        for name, kwarg in kw.items():
            if name not in allowed:
                hint = did_you_mean(name, allowed)
                self.err("K0209", f"unknown block `{name}` for \"{arch}\"", kwarg.span,
                         help=(f"did you mean `{hint}`? " if hint else "") + listing)
            else:
                ty = self.value(kwarg.value, scope)
                values.append(ty.value if ty.kind == "number" else None)
                if ty.kind not in ("number", "error", "any"):
                    self.err("K0209", "block weights are numbers", kwarg.value.span)
        if lst is None and "default" not in bound and set(slots) - set(kw):
            missing = [s for s in slots if s not in kw]
            self.err("K0209", f"no weight for {len(missing)} block(s) and no `default=`", e.span,
                     help=f"missing: {', '.join(missing[:8])}{'...' if len(missing) > 8 else ''}")
        return _keymap(values)

    def _check_balanced(self, b, bound, tys, kw, e, scope):
        for item in bound["clusters"].items:
            if item.weight is not None:
                self.err("K0202", "balanced() gives every sub-cluster the same weight; drop the "
                         "`: weight`", item.weight.span)


def _keymap(values: list) -> Ty:
    """A per-key number whose values are `values` (None: not known here)."""
    if None in values:
        return Ty("keymap")
    return Ty("keymap", gain=max((abs(v) for v in values), default=0.0))


MAX_REGEX_DEPTH = 100  # Python's regex compiler recurses per group level


def _group_depth(pattern: str) -> int:
    """How deeply a regular expression's groups nest (escapes and [...] sets skipped)."""
    depth = deepest = 0
    escaped = in_set = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_set:
            in_set = ch != "]"
        elif ch == "[":
            in_set = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest
