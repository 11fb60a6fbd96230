"""`kmx check`: load a recipe and its imports (program.py), type-check every declaration and
save (typecheck.py), and return every diagnostic with a `Program` that lowering turns into the
graph IR when there is no error."""

from __future__ import annotations

import os

from karmixlang.syntax import ast
from karmixlang.diagnostics import Diagnostic, Label, did_you_mean, error, warning
from karmixlang.io.dtypes import USER_DTYPE_NAMES, parse_user_dtype
from karmixlang.io.hffolder import is_folder_path
from karmixlang.units import parse_size
from karmixlang.limits import recursion_room
from karmixlang.check.program import Program, Unit, Loader, resolve_params, dependency_order
from karmixlang.check.typecheck import Checker, Scope, TooDeep
from karmixlang.check.values import Ty, affine

SAVE_OPTIONS = ("dtype", "fallback", "metadata", "shard", "delta", "unmatched", "lora",
                "lora_conv", "tokenizer")
MAX_RANK = 1 << 16  # a LoRA rank past every real key's width
UNMATCHED = ("error", "warn")  # what a LoRA module that matches no key is (docs/lora.md)


def _valid_size(text: str) -> bool:
    try:
        return parse_size(text) > 0
    except ValueError:
        return False



# ------------------------------------------------------------------ save statements and driver

def _check_extraction(ch: Checker, s: ast.Save, opts: dict, values: dict, ty: Ty) -> None:
    """`with lora=RANK [, lora_conv=RANK]`: the save writes a LoRA of its Delta (lora.md)."""
    for name in ("lora", "lora_conv"):
        v = values.get(name)
        if v is None or v.kind == "error":
            continue
        ok = v.kind == "number" and (v.value is None or (
            float(v.value).is_integer() and 1 <= v.value <= MAX_RANK))
        if not ok:
            ch.err("K0218", f"`{name}` must be a whole number from 1 to {MAX_RANK}",
                   opts[name].value.span, help="a rank such as 16, 32 or 64")
    if "lora" not in values:
        ch.err("K0218", "`lora_conv` without `lora`", opts["lora_conv"].span,
               help="`with lora=RANK, lora_conv=RANK` extracts a LoRA with 3×3 convs")
    for name in ("shard", "delta"):
        if name in values and "lora" in values:
            ch.err("K0218", f"`{name}` does not apply to a LoRA extraction", opts[name].span,
                   help="a LoRA is one file of changes: drop the option")
    if "lora" in values and ty.kind == "space" and affine(ty.weight) != 0:
        ch.err("K0217", "`lora=` extracts a LoRA from a Delta, but the expression is a "
               f"{ty.describe()}", s.expr.span, label="not a Delta",
               help="extract the difference to a base: `save \"x.safetensors\" = "
                    "tuned - base with lora=32`")


def _check_tokenizer(ch: Checker, unit: Unit, e, ty: Ty, path: str | None) -> None:
    """`tokenizer=` names a declared model (its vocabulary and tokenizer files) or is
    "union" (docs/language.md, "Vocabularies"), which only a folder can hold the files of."""
    if ty.kind == "string" and ty.value == "union" and path is not None \
            and not is_folder_path(path):
        ch.err("K0349", "`tokenizer=\"union\"` writes the union's tokenizer files beside the "
               "weights, so it needs a save into a folder", e.span, label="a single file",
               help=f"save to a folder: `save \"{path.removesuffix('.safetensors')}\" = ...`")
    if ty.kind == "error" or (ty.kind == "string" and ty.value in ("union", None)):
        return
    owner = unit.imports.get(e.lib) if isinstance(e, ast.Member) else unit
    decl = owner.decls.get(e.name) if owner is not None and \
        isinstance(e, (ast.Name, ast.Member)) else None
    if not isinstance(decl, ast.ModelDecl):
        ch.err("K0349", "`tokenizer` must name a model declared with `model` or `base`, or be "
               "\"union\"", e.span, label="not a model's name",
               help="`with tokenizer=chat` keeps the model `chat`'s vocabulary; "
                    "`with tokenizer=\"union\"` merges every input's")


def _check_folder(ch: Checker, opts: dict, values: dict, path: str | None) -> None:
    """A save into a folder writes a loadable model (io/hffolder.py): a LoRA or a Delta is
    not a model folder."""
    if path is None or not is_folder_path(path):
        return
    for name, what in (("lora", "a LoRA is one file"), ("delta", "a Delta is not a model")):
        if name in opts and values[name].value not in (None, False):
            ch.err("K0219", f"`{name}` does not apply to a save into a folder", opts[name].span,
                   help=f"{what}: save to a `.safetensors` path")


def _check_save(ch: Checker, unit: Unit, s: ast.Save, paths: dict[str, ast.Save]) -> None:
    scope = Scope(unit)
    path_ty = ch.string(s.path, scope)
    opts = {}
    for opt in s.options:
        if opt.name in opts:
            ch.err("K0107", f"option `{opt.name}` given twice", opt.span)
        opts[opt.name] = opt
        if opt.name not in SAVE_OPTIONS:
            hint = did_you_mean(opt.name, SAVE_OPTIONS)
            ch.err("K0208", f"unknown save option `{opt.name}`", opt.span,
                   help=f"did you mean `{hint}`?" if hint else
                   "options: " + ", ".join(SAVE_OPTIONS))
    values = {n: ch.value(o.value, scope) for n, o in opts.items() if n in SAVE_OPTIONS}
    for name, want in (("dtype", "string"), ("metadata", "map"), ("shard", "string"),
                       ("delta", "bool"), ("unmatched", "string")):
        ty = values.get(name)
        if ty is not None and ty.kind not in (want, "error"):
            ch.err("K0208", f"`{name}` must be a {want}", opts[name].value.span)
        elif name == "dtype" and ty is not None and ty.value is not None \
                and parse_user_dtype(ty.value) is None:
            ch.err("K0208", f"cannot save as dtype \"{ty.value}\"", opts[name].value.span,
                   help="dtypes: " + ", ".join(f'"{n}"' for n in USER_DTYPE_NAMES))
        elif name == "shard" and ty is not None and isinstance(ty.value, str) \
                and not _valid_size(ty.value):
            ch.err("K0208", f"invalid shard size \"{ty.value}\"", opts[name].value.span,
                   help='write a positive size such as "5GB" or "500MiB"')
        elif name == "unmatched" and ty is not None and isinstance(ty.value, str) \
                and ty.value not in UNMATCHED:
            ch.err("K0208", f"`unmatched` must be \"error\" or \"warn\", not \"{ty.value}\"",
                   opts[name].value.span)
    if "metadata" in opts and isinstance(opts["metadata"].value, ast.MapLit):
        for pair in opts["metadata"].value.pairs:
            if ch.value(pair.value, scope).kind not in ("string", "error"):
                ch.err("K0208", "metadata values are strings", pair.value.span)
    fb = values.get("fallback")
    if fb is not None and fb.kind != "error" and not (fb.kind == "space" and affine(fb.weight) == 1):
        ch.err("K0208", f"`fallback` must be a Model, got {fb.describe()}",
               opts["fallback"].value.span)
    if "tokenizer" in opts:
        _check_tokenizer(ch, unit, opts["tokenizer"].value, values["tokenizer"],
                         path_ty.value if isinstance(path_ty.value, str) else None)
    _check_folder(ch, opts, values, path_ty.value if isinstance(path_ty.value, str) else None)
    ty = ch.value(s.expr, scope)
    extract = "lora" in values
    if extract or "lora_conv" in values:
        _check_extraction(ch, s, opts, values, ty)
    is_delta = extract or values.get("delta", Ty("bool", value=False)).value is True
    if ty.kind == "cluster":
        ch.err("K0202", "a save writes one checkpoint, not a cluster", s.expr.span,
               help="reduce it first: `mean(...)`, `geometric_median(...)`, ...")
    elif ty.kind == "space":
        w = affine(ty.weight)
        if w == 0 and not is_delta:
            ch.err("K0203", "this save writes a Delta (a task vector)", s.expr.span,
                   label="a Delta", help="add a base (`base + ...`) to save a model, or "
                   "`with delta=true` to save the task vector itself")
        elif w == 1 and is_delta and not extract:
            ch.err("K0203", "`delta=true` but the expression is a Model", s.expr.span)
    elif ty.kind not in ("error", "any"):
        ch.err("K0202", f"a save writes a Model, not a {ty.describe()}", s.expr.span)
    if isinstance(path_ty.value, str):
        full = os.path.normpath(os.path.join(unit.folder, path_ty.value))
        # The folder resolved: two spellings through a symlinked folder are one file.
        full = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        if full in paths:
            ch.err("K0212", f"two saves write `{path_ty.value}`", s.path.span,
                   notes=(Label(paths[full].path.span, "first written here"),))
        paths.setdefault(full, s)  # later duplicates point at the first save


def check_program(path: str, overrides: dict[str, str] | None = None,
                  source: bytes | None = None) -> tuple[Program | None, list[Diagnostic]]:
    """Load, resolve and type-check a recipe. Returns (program or None, all diagnostics).
    `source`: the recipe's bytes, checked as if they were the file at `path` (imports and
    paths resolve from its folder)."""
    with recursion_room():  # the checker recurses over expressions and def calls
        return _check_program(path, overrides, source)


def _check_program(path: str, overrides: dict[str, str] | None, source: bytes | None):
    diags: list[Diagnostic] = []
    loader = Loader(diags, None if source is None else {os.path.realpath(path): source})
    root = loader.load(path)
    if root is None:
        return None, _dedupe(diags)
    program = Program(root, loader.units, loader.sources, dict(overrides or {}))
    resolve_params(root, program.overrides, diags)
    ch = Checker(program, diags)
    where = None  # the declaration or save being checked
    try:
        for unit, name in dependency_order((u, n) for u in loader.units.values()
                                           for n in u.decls):
            d = unit.decls[name]
            where = Label(d.name_span, f"while checking `{name}`")
            if isinstance(d, ast.Def):
                ch.check_def(unit, d)
            elif not isinstance(d, ast.Import):
                ch.decl_type(unit, name, d.name_span)
        for unit in loader.units.values():
            paths: dict[str, ast.Save] = {}
            for stmt in unit.module.stmts:
                if isinstance(stmt, ast.Save):
                    where = Label(stmt.span, "while checking this save")
                    _check_save(ch, unit, stmt, paths)
    except TooDeep as exc:
        diags.append(error("K0004", exc.message, exc.span, label="here",
                           help="shorten the chain of defs calling defs: each call evaluates "
                                "its def's body again", notes=(where,)))
    _unused(root, diags)
    return (None if any(d.is_error for d in diags) else program), _dedupe(diags)


def _unused(root: Unit, diags: list[Diagnostic]) -> None:
    referenced = _references(root)
    for name, d in root.decls.items():
        if isinstance(d, (ast.Let, ast.ModelDecl, ast.LoraDecl, ast.ClusterDecl)) and \
                name not in referenced:
            diags.append(warning("K0112", f"`{name}` is never used", d.name_span,
                                 label="defined here", help="remove it, or save it"))


def _references(unit: Unit) -> set[str]:
    names: set[str] = set()
    roots = []
    for s in unit.module.stmts:
        if isinstance(s, (ast.Let, ast.ClusterDecl)):
            roots.append(s.expr)
        elif isinstance(s, ast.Save):
            roots += [s.expr, s.path] + [o.value for o in s.options]
        elif isinstance(s, ast.Def):
            roots += [s.body] + [let.expr for let in s.lets]
        elif isinstance(s, (ast.ModelDecl, ast.LoraDecl)):
            roots.append(s.path)
    for r in roots:
        for node in ast.walk(r):
            if isinstance(node, ast.Name):
                names.add(node.name)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names.add(node.func.name)
    return names


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        key = (d.code, d.message, d.span)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out

