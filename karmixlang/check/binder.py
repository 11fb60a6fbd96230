"""Name and argument binding: what a name in a recipe refers to, which function a call calls,
and which argument goes to which parameter. The checker (which reports what does not bind)
and lowering (which evaluates what the checker accepted) both ask here, so the two passes
cannot resolve a name or bind an argument differently.

Scoping, innermost first: a def's parameters, then its body's lets, then the declarations of
the file, then the builtins. A call `f(...)` calls the file's def `f` unless a parameter of
the enclosing def is named `f`; `lib.f(...)` calls the def `f` of the imported file `lib`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from karmixlang.builtins import BUILTINS, Builtin
from karmixlang.diagnostics import did_you_mean
from karmixlang.syntax import ast


class Kind(Enum):
    PARAM = "a def's parameter"
    LET = "a let in a def's body"
    DECL = "a declaration of the file"
    BUILTIN = "a builtin function"
    UNKNOWN = "nothing"


@dataclass(frozen=True)
class Ref:
    """What a name refers to; `unit` holds it for a DECL."""

    kind: Kind
    name: str
    unit: object = None


def resolve_name(unit, name: str, params, lets) -> Ref:
    """A bare name, seen from `unit` inside a def with `params` and `lets` (both containers of
    names; empty outside a def)."""
    if name in params:
        return Ref(Kind.PARAM, name)
    if name in lets:
        return Ref(Kind.LET, name)
    if name in unit.decls:
        return Ref(Kind.DECL, name, unit)
    if name in BUILTINS:
        return Ref(Kind.BUILTIN, name)
    return Ref(Kind.UNKNOWN, name)


@dataclass(frozen=True)
class Callee:
    """What a call calls: a def (with the file that holds it) or a builtin; otherwise None
    in both, and the checker says why."""

    definition: ast.Def | None = None
    unit: object = None
    builtin: Builtin | None = None


def resolve_call(unit, func, params) -> Callee:
    if isinstance(func, ast.Member):
        lib = unit.imports.get(func.lib)
        d = lib.decls.get(func.name) if lib is not None else None
        return Callee(d, lib) if isinstance(d, ast.Def) else Callee()
    d = unit.decls.get(func.name)
    if isinstance(d, ast.Def) and func.name not in params:
        return Callee(d, unit)
    if func.name in BUILTINS:
        return Callee(builtin=BUILTINS[func.name])
    return Callee()


@dataclass
class Binding:
    """A call's arguments matched to parameters: `bound` name -> expression, `extra`
    positional arguments past the parameters (a builtin's varargs), `extra_kwargs` keyword
    arguments no parameter takes (a builtin's free keywords), and the problems found, as
    (code, message, span, help, label) for the checker to report."""

    bound: dict[str, object] = field(default_factory=dict)
    extra: list = field(default_factory=list)
    extra_kwargs: dict[str, ast.KwArg] = field(default_factory=dict)
    problems: list[tuple] = field(default_factory=list)


def bind(fname: str, params: list[tuple[str, bool]], call: ast.Call, varargs: bool = False,
         extra_kwargs: bool = False) -> Binding:
    """Match `call`'s arguments to `params` [(name, required)]."""
    out = Binding()
    names = [n for n, _ in params]
    for i, arg in enumerate(call.args):
        if i < len(names):
            out.bound[names[i]] = arg
        elif varargs:
            out.extra.append(arg)
        else:
            out.problems.append(("K0106", f"`{fname}` takes at most {len(names)} positional "
                                 f"argument{'s' if len(names) != 1 else ''}", arg.span, None,
                                 ""))
    for kw in call.kwargs:
        if kw.name in out.bound or kw.name in out.extra_kwargs:
            out.problems.append(("K0107", f"argument `{kw.name}` given twice", kw.span, None,
                                 ""))
        elif kw.name in names:
            out.bound[kw.name] = kw.value
        elif extra_kwargs:
            out.extra_kwargs[kw.name] = kw
        else:
            hint = did_you_mean(kw.name, names)
            out.problems.append(("K0104", f"`{fname}` has no parameter `{kw.name}`", kw.span,
                                 f"did you mean `{hint}`?" if hint else
                                 f"parameters: {', '.join(names) or 'none'}", ""))
    for name, required in params:
        if required and name not in out.bound:
            out.problems.append(("K0105", f"`{fname}` needs the argument `{name}`", call.span,
                                 None, "missing argument"))
    return out


def bind_def(d: ast.Def, call: ast.Call) -> Binding:
    return bind(d.name, [(p.name, p.default is None) for p in d.params], call)


def bind_builtin(b: Builtin, call: ast.Call) -> Binding:
    return bind(b.name, [(p.name, p.required) for p in b.params], call,
                varargs=b.varargs is not None, extra_kwargs=b.extra_kwargs)
