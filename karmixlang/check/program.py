"""A recipe and its imports, loaded: each file parsed once, its declarations indexed, import
cycles and missing imports reported, and params resolved (defaults, then `--set`)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from karmixlang.syntax import ast
from karmixlang.builtins import BUILTINS
from karmixlang.diagnostics import Diagnostic, Label, Span, did_you_mean, error
from karmixlang.limits import MAX_IMPORT_DEPTH
from karmixlang.syntax.parser import parse_file
from karmixlang.resources import data_dir

@dataclass
class Unit:
    """One parsed `.kmx` file with its declarations."""
    path: str
    module: ast.Module
    text: str
    decls: dict[str, ast.Decl] = field(default_factory=dict)
    imports: dict[str, "Unit"] = field(default_factory=dict)
    params: dict[str, object] = field(default_factory=dict)  # resolved param values
    param_text: dict[str, str] = field(default_factory=dict)  # as written, for interpolation

    @property
    def folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


@dataclass
class Program:
    root: Unit
    units: dict[str, Unit]
    sources: dict[str, str]
    overrides: dict[str, str]


# ------------------------------------------------------------------ loading

def _stdlib_path(rel: str) -> str:
    return str(data_dir("stdlib").joinpath(rel))


def resolve_import(unit: Unit, path: str) -> str:
    if path.startswith("std/"):
        return _stdlib_path(path[4:])
    return os.path.normpath(os.path.join(unit.folder, path))


class Loader:
    def __init__(self, diags: list[Diagnostic], given: dict[str, bytes] | None = None):
        self.diags = diags
        self.given = given or {}  # real path -> the bytes to parse instead of the file's
        self.units: dict[str, Unit] = {}
        self.sources: dict[str, str] = {}

    def load(self, path: str, chain: tuple[str, ...] = (), span: Span | None = None) -> Unit | None:
        key = os.path.realpath(path)
        if key in chain:
            cycle = " -> ".join(os.path.basename(p) for p in chain[chain.index(key):] + (key,))
            self.diags.append(error("K0109", f"import cycle: {cycle}", span,
                                    label="this import closes the cycle",
                                    help="move the shared definitions into a third file"))
            return None
        if key in self.units:
            return self.units[key]
        if len(chain) >= MAX_IMPORT_DEPTH:
            self.diags.append(error("K0004", f"imports nested more than {MAX_IMPORT_DEPTH} files "
                                    "deep", span, label="one import too many",
                                    help="import the files you need from fewer levels"))
            return None
        if span is not None and not os.path.exists(path):
            self.diags.append(error("K0110", f"cannot find `{path}`", span,
                                    label="imported here",
                                    help="`std/...` names the shipped stdlib; other paths are "
                                         "relative to the importing file"))
            return None
        module, text, diags = parse_file(path, self.given.get(key))
        if text is not None:
            self.sources[path] = text
        if diags:
            self.diags.extend(d if d.span or span is None else _with_span(d, span) for d in diags)
            return None
        unit = Unit(path, module, text)
        self.units[key] = unit
        self._declare(unit)
        for stmt in module.stmts:
            if isinstance(stmt, ast.Import):
                if not stmt.path.is_plain:
                    self.diags.append(error("K0003", "import paths do not interpolate",
                                            stmt.path.span, help="write the path literally"))
                    continue
                target = resolve_import(unit, stmt.path.plain)
                sub = self.load(target, chain + (key,), stmt.path.span)
                unit.imports[stmt.alias] = sub  # None when it failed: already reported
                if sub is not None:
                    for s in sub.module.stmts:
                        if isinstance(s, ast.Save):
                            self.diags.append(error(
                                "K0113", "an imported file may not contain `save`", s.span,
                                label="save in an imported file",
                                help="keep saves in the recipe you run",
                                notes=(Label(stmt.span, "imported here"),)))
        return unit

    def _declare(self, unit: Unit) -> None:
        for stmt in unit.module.stmts:
            if isinstance(stmt, ast.Save):
                continue
            name = stmt.alias if isinstance(stmt, ast.Import) else stmt.name
            span = stmt.name_span
            if name in BUILTINS:
                self.diags.append(error("K0111", f"`{name}` shadows a builtin function", span,
                                        label="choose another name"))
            elif name in unit.decls:
                first = unit.decls[name]
                self.diags.append(error(
                    "K0101", f"`{name}` is defined twice", span, label="defined again here",
                    notes=(Label(first.name_span, "first defined here"),),
                    help="every name is defined once per file"))
            else:
                unit.decls[name] = stmt


def dependency_order(starts) -> list[tuple[Unit, str]]:
    """The declarations `starts` (pairs of unit and name) and those they use, each after the
    ones its definition uses, in its file or through imports (a cycle is cut anywhere), found
    without recursion. Evaluating in this order, the checker and lowering recurse only as deep
    as one definition, however long a chain of lets is."""
    order: list[tuple[Unit, str]] = []
    seen: set[tuple[int, str]] = set()
    for unit, name in starts:
        if (id(unit), name) in seen:
            continue
        seen.add((id(unit), name))
        stack = [(unit, name, _uses(unit, name))]
        while stack:
            u, n, deps = stack[-1]
            nxt = next((dep for dep in deps if (id(dep[0]), dep[1]) not in seen), None)
            if nxt is None:
                stack.pop()
                order.append((u, n))
            else:
                seen.add((id(nxt[0]), nxt[1]))
                stack.append((nxt[0], nxt[1], _uses(*nxt)))
    return order


def _uses(unit: Unit, name: str):
    """The declarations a declaration's definition names, in source order (lazily)."""
    d = unit.decls[name]
    local = {p.name for p in d.params} | {let.name for let in d.lets} \
        if isinstance(d, ast.Def) else set()
    roots = [getattr(d, "expr", None), getattr(d, "body", None)]
    roots += [let.expr for let in getattr(d, "lets", ())]
    return references(unit, roots, local)


def references(unit: Unit, roots, local=frozenset()):
    """The declarations that expressions of `unit` name (but for `local` names), in source
    order: (unit, name) pairs, lazily."""
    for r in roots:
        for node in ast.walk(r) if r is not None else ():
            ref = node.func if isinstance(node, ast.Call) else node
            if isinstance(ref, ast.Name) and ref.name in unit.decls and ref.name not in local:
                yield unit, ref.name
            elif isinstance(ref, ast.Member):
                sub = unit.imports.get(ref.lib)
                if sub is not None and ref.name in sub.decls:
                    yield sub, ref.name


def _with_span(d: Diagnostic, span: Span) -> Diagnostic:
    return Diagnostic(d.code, d.message, span, d.label, d.severity, d.help, d.notes)


# ------------------------------------------------------------------ params

def _literal_value(lit) -> tuple[object, str]:
    if isinstance(lit, ast.Number):
        return lit.value, lit.text
    if isinstance(lit, ast.Neg):
        return -lit.operand.value, "-" + lit.operand.text
    if isinstance(lit, ast.Bool):
        return lit.value, "true" if lit.value else "false"
    return lit.plain, lit.plain


def _coerce(default: object, text: str) -> object:
    """An override's value typed as the param's default; ValueError when it does not fit."""
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise ValueError("expected `true` or `false`")
        return text == "true"
    if isinstance(default, float):
        if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?", text):
            raise ValueError("expected a number")
        if not math.isfinite(float(text)):
            raise ValueError("the number is too large")
        return float(text)
    if "\0" in text:
        raise ValueError("a string cannot contain a NUL character")
    return text


def resolve_params(root: Unit, overrides: dict[str, str], diags: list[Diagnostic]) -> None:
    seen = set()
    for unit in [root] + _all_imported(root):
        if id(unit) in seen:
            continue
        seen.add(id(unit))
        for name, decl in unit.decls.items():
            if isinstance(decl, ast.Param):
                unit.params[name], unit.param_text[name] = _literal_value(decl.value)
    for key, text in overrides.items():
        lib, _, name = key.rpartition(".")
        unit = root.imports.get(lib) if lib else root
        candidates = param_names(root)
        if unit is None or name not in unit.params:
            hint = did_you_mean(key, candidates)
            diags.append(error("K0211", f"--set {key}: no param `{key}` in the recipe",
                               help=f"did you mean `{hint}`?" if hint else
                               "params: " + (", ".join(sorted(candidates)) or "none")))
            continue
        try:
            unit.params[name] = _coerce(unit.params[name], text)
            unit.param_text[name] = text
        except ValueError as exc:
            kind = type(unit.params[name]).__name__.replace("float", "number")
            diags.append(error("K0211", f"--set {key}={text}: {exc}",
                               unit.decls[name].span, label=f"`{name}` is a {kind} param"))


def param_names(root: Unit) -> list[str]:
    """The params `--set` can give: the recipe's own, and `alias.name` for its imports'."""
    names = [n for n, d in root.decls.items() if isinstance(d, ast.Param)]
    return names + [f"{alias}.{n}" for alias, u in root.imports.items() if u is not None
                    for n, d in u.decls.items() if isinstance(d, ast.Param)]


def save_interpolations(root: Unit) -> list[frozenset[str]]:
    """For each save of the recipe, in order: the params its path interpolates, as `--set`
    names them (`name`, `alias.name`)."""
    return [frozenset(f"{p.lib}.{p.name}" if p.lib else p.name for p in s.path.parts
                      if isinstance(p, ast.Interp))
            for s in root.module.stmts if isinstance(s, ast.Save)]


def _all_imported(unit: Unit) -> list[Unit]:
    out, stack = [], list(unit.imports.values())
    while stack:
        u = stack.pop()
        if u is not None:  # None: an import that failed (already reported)
            out.append(u)
            stack.extend(u.imports.values())
    return out

