"""The formatter: case files (tests/data/fmt/NAME.in.kmx -> NAME.out.kmx), its safety checks,
and random recipes: random ASTs written with random spacing, parentheses, line breaks and
comments must format to a stable text that parses to the same statements."""

from collections import Counter
from pathlib import Path
from unittest.mock import patch

import pytest
from chunkfile import read_chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karmixlang.syntax import ast
from karmixlang.syntax import fmt
from karmixlang.syntax.fmt import FormatterError, format_source
from karmixlang.syntax.parser import parse

CASES = Path(__file__).parents[1] / "data" / "fmt"


FILES = read_chunks(CASES / "cases.chunks")  # NAME.in.kmx and NAME.out.kmx, byte for byte


def comments(text: str) -> Counter:
    module, diags = parse(text)
    assert module is not None, diags
    return Counter(c.text for c in module.comments)


def assert_formats(src: str, want: str | None = None) -> str:
    """format(src) is `want` (when given), is a fixed point, and keeps statements and comments."""
    out, diags = format_source(src)
    assert diags == [] and out is not None
    if want is not None:
        assert out == want
    assert format_source(out)[0] == out
    assert parse(out)[0].stmts == parse(src)[0].stmts
    assert comments(out) == comments(src)
    return out


# ------------------------------------------------------------------ case files

@pytest.mark.parametrize("name", sorted(n[: -len(".in.kmx")] for n in FILES if n.endswith(".in.kmx")))
def test_case(name):
    assert_formats(FILES[f"{name}.in.kmx"], FILES[f"{name}.out.kmx"])


def test_every_case_has_both_files_and_there_are_enough():
    ins = {n[: -len(".in.kmx")] for n in FILES if n.endswith(".in.kmx")}
    outs = {n[: -len(".out.kmx")] for n in FILES if n.endswith(".out.kmx")}
    assert ins == outs and len(ins) >= 15 and len(FILES) == len(ins) + len(outs)


# ------------------------------------------------------------------ the API and its checks

def test_syntax_error_returns_diagnostics():
    out, diags = format_source("let x = (a +\n", "r.kmx")
    assert out is None and diags and diags[0].code == "K0001" and diags[0].span.file == "r.kmx"


def test_empty_and_comment_only_files():
    assert format_source("")[0] == ""
    assert format_source("\n\n  \n")[0] == ""
    assert_formats("\n\n# only\n\n\n#  comments\n\n", "# only\n\n#  comments\n")


def test_crlf_bom_and_tabs_become_canonical():
    src = "\ufefflet\tx =\ta  # c\r\n\r\n\r\nlet y = b\r\n"
    assert_formats(src, "let x = a  # c\n\nlet y = b\n")


def test_output_that_changes_meaning_is_refused(monkeypatch):
    monkeypatch.setattr(fmt, "_print", lambda module, text: "let x = 1\n")
    with pytest.raises(FormatterError, match="change"):
        format_source("let x = 2\n")


def test_output_that_drops_a_comment_is_refused(monkeypatch):
    printer = fmt._print
    monkeypatch.setattr(fmt, "_print", lambda m, text: printer(m, text).replace("# gone\n", ""))
    with pytest.raises(FormatterError, match="comments"):
        format_source("# gone\nlet x = 2\n")


def test_unstable_output_is_refused(monkeypatch):
    printer, calls = fmt._print, []

    def flaky(module, text):  # a different layout on each call: same AST, same comments
        calls.append(1)
        return printer(module, text) + "\n" * (len(calls) % 2)

    monkeypatch.setattr(fmt, "_print", flaky)
    with pytest.raises(FormatterError, match="stable"):
        format_source("let x = 2\n")


def test_output_that_does_not_parse_is_refused(monkeypatch):
    monkeypatch.setattr(fmt, "_print", lambda module, text: "let x = (\n")
    with pytest.raises(FormatterError, match="parse"):
        format_source("let x = 2\n")


def test_a_comment_after_a_hash_in_a_string_is_never_dropped():
    # The parser misses this comment (see the formatter's report): refusing is the safe answer.
    src = 'model a = "x#y.safetensors"  # keep me\n'
    try:
        out, _ = format_source(src)
    except FormatterError:
        return
    assert "# keep me" in out


def test_recipes_nested_as_deeply_as_the_parser_allows_format():
    deep_call = "let x = " + "f(  # c\n" * 199 + "a" + ")" * 199 + "\n"  # each level splits
    deep_map = "let x = " + '[{"k": ' * 99 + "a" + "}]" * 99 + "\n"
    deep_neg = "let x = " + "-(" * 99 + "a + b" + ")" * 99 + "\n"
    right_deep = "let x = " + "a - (" * 198 + "a - a" + ")" * 198 + "\n"
    for src in (deep_call, deep_map, deep_neg, right_deep):
        # format_source checks equivalence itself, under the recursion limit it raises: `==`
        # on trees this deep needs more than Python's default limit.
        out, diags = format_source(src)
        assert diags == [] and format_source(out)[0] == out
    assert format_source(right_deep)[0] == right_deep


def test_layout_of_a_split_call_keeps_comments_at_their_arguments():
    src = 'let w = blocks("sdxl", BASE=0,  # text encoder\n  IN00=1)\n'
    want = 'let w = blocks(\n    "sdxl",\n    BASE=0,  # text encoder\n    IN00=1,\n)\n'
    assert_formats(src, want)


def test_trailing_comment_does_not_count_toward_the_width():
    code = "let x = f(" + ", ".join(["aaaaaaaa"] * 9) + ")"
    assert len(code) <= fmt.WIDTH
    assert_formats(code + "  # " + "c" * 80 + "\n", code + "  # " + "c" * 80 + "\n")


# ------------------------------------------------------------------ random recipes

NAMES = st.sampled_from(["a", "b", "pool", "noob", "x1", "_t", "savex", "withx", "models",
                         "base_", "Letter"])
# Keywords may name keyword arguments and save options.
ARGNAMES = NAMES | st.sampled_from(["base", "with", "model", "true", "return"])
NUMBERS = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?", fullmatch=True).map(
    lambda t: ast.Number(float(t), t))
# No `#` in strings: the parser drops a comment that follows such a string on its line.
TEXT = st.text(alphabet='ab $"\\{}/.*é', min_size=1, max_size=6)
INTERP = st.builds(ast.Interp, NAMES, st.none() | NAMES)


def _string_parts(parts: list) -> tuple:
    """The parser's shape: adjacent text merged, and ("",) for an empty string."""
    out: list = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        else:
            out.append(p)
    return tuple(out) or ("",)


STRINGS = st.lists(TEXT | INTERP, max_size=3).map(lambda ps: ast.String(_string_parts(ps)))
LEAVES = st.one_of(NAMES.map(ast.Name), st.builds(ast.Member, NAMES, NAMES), NUMBERS, STRINGS,
                   st.booleans().map(ast.Bool))
LITERALS = st.one_of(NUMBERS, NUMBERS.map(ast.Neg), STRINGS, st.booleans().map(ast.Bool))


def _extend(inner):
    funcs = NAMES.map(ast.Name) | st.builds(ast.Member, NAMES, NAMES)
    items = st.lists(st.builds(ast.ClusterItem, inner, st.none() | inner), max_size=3)
    return st.one_of(
        st.builds(ast.Neg, inner),
        st.builds(ast.BinOp, st.sampled_from("+-*/|"), inner, inner),
        st.builds(ast.Call, funcs, st.lists(inner, max_size=3).map(tuple),
                  st.lists(st.builds(ast.KwArg, ARGNAMES, inner), max_size=2).map(tuple)),
        items.map(lambda i: ast.ClusterLit(tuple(i))),
        st.lists(st.builds(ast.MapPair, STRINGS, inner), max_size=2).map(
            lambda p: ast.MapLit(tuple(p))),
    )


EXPRS = st.recursive(LEAVES, _extend, max_leaves=12)
PREC = {"|": 1, "+": 2, "-": 2, "*": 3, "/": 3}


class Writer:
    """Writes an AST as source text with random (valid) spacing, parentheses, line breaks and
    comments, drawing each choice from hypothesis."""

    def __init__(self, draw):
        self.draw = draw
        self.n = 0

    def comment(self) -> str:
        self.n += 1
        return f"# note {self.n}" + self.draw(st.sampled_from(["", "  ", " # more"]))

    def gap(self, free: bool) -> str:
        """Space between two tokens; `free`: a line break may go here (inside brackets, or
        after an operator)."""
        choices = ["", " ", "  "] + (["\n", "\n\n    ", f"  {self.comment()}\n  ",
                                      f"\n  {self.comment()}\n"] if free else [])
        return self.draw(st.sampled_from(choices))

    def string(self, s: ast.String) -> str:
        out = []
        for part in s.parts:
            if isinstance(part, ast.Interp):
                out.append("${" + (f"{part.lib}." if part.lib else "") + part.name + "}")
                continue
            for i, ch in enumerate(part):
                if ch in '"\\':
                    out.append("\\" + ch)
                elif ch == "$" and (part[i + 1:i + 2] == "{" or self.draw(st.booleans())):
                    out.append("\\$")
                else:
                    out.append(ch)
        return '"' + "".join(out) + '"'

    def expr(self, e, free: bool, min_prec: int = 0) -> str:
        prec = PREC[e.op] if isinstance(e, ast.BinOp) else 4 if isinstance(e, ast.Neg) else 5
        parens = prec < min_prec or self.draw(st.integers(0, 9)) == 0
        inner = self._expr(e, free or parens)
        if parens:
            return "(" + self.gap(True) + inner + self.gap(True) + ")"
        return inner

    def _expr(self, e, free: bool) -> str:
        g = self.gap
        if isinstance(e, ast.Name):
            return e.name
        if isinstance(e, ast.Member):
            return f"{e.lib}.{e.name}"
        if isinstance(e, ast.Number):
            return e.text
        if isinstance(e, ast.String):
            return self.string(e)
        if isinstance(e, ast.Bool):
            return "true" if e.value else "false"
        if isinstance(e, ast.Neg):
            return "-" + g(False) + self.expr(e.operand, free, 4)
        if isinstance(e, ast.BinOp):
            p = PREC[e.op]
            left, right = self.expr(e.left, free, p), self.expr(e.right, free, p + 1)
            if not free and e.op in "|+-" and self.draw(st.booleans()):  # a continuation line
                return left + "\n    " + e.op + " " + right
            return left + g(free) + e.op + g(True) + right
        if isinstance(e, ast.Call):
            func = self._expr(e.func, free)
            args = [self.expr(a, True) for a in e.args]
            args += [k.name + g(True) + "=" + g(True) + self.expr(k.value, True) for k in e.kwargs]
            return func + g(False) + "(" + self.seq(args) + ")"
        if isinstance(e, ast.ClusterLit):
            items = [self.expr(i.expr, True) + ("" if i.weight is None else
                     g(True) + ":" + g(True) + self.expr(i.weight, True)) for i in e.items]
            return "[" + self.seq(items) + "]"
        pairs = [self.string(p.key) + g(True) + ":" + g(True) + self.expr(p.value, True)
                 for p in e.pairs]
        return "{" + self.seq(pairs) + "}"

    def seq(self, parts: list[str]) -> str:
        """Comma-separated inside brackets, with an optional trailing comma."""
        g = self.gap
        body = "".join(g(True) + p + g(True) + ("," if i < len(parts) - 1 else "")
                       for i, p in enumerate(parts))
        if parts and self.draw(st.booleans()):
            body += "," + g(True)
        return body

    def literal(self, v) -> str:
        """A `param` value or a default: no parentheses allowed."""
        if isinstance(v, ast.Neg):
            return "-" + self.gap(False) + v.operand.text
        return self._expr(v, False)

    def params(self, params) -> str:
        return self.seq([p.name + ("" if p.default is None else f" = {self.literal(p.default)}")
                         for p in params])

    def stmt(self, s) -> str:
        g, e = self.gap, self.expr
        if isinstance(s, ast.ModelDecl):
            kind = "base" if s.is_base else "model"
            return f"{kind} {s.name}{g(False)}={g(True)}{self.string(s.path)}"
        if isinstance(s, ast.LoraDecl):
            return f"lora {s.name}{g(False)}={g(True)}{self.string(s.path)}"
        if isinstance(s, ast.ClusterDecl):
            return f"cluster {s.name} ={g(True)}{e(s.expr, False)}"
        if isinstance(s, ast.Let):
            return f"let {s.name} ={g(True)}{e(s.expr, False)}"
        if isinstance(s, ast.Param):
            return f"param {s.name} = {self.literal(s.value)}"
        if isinstance(s, ast.Import):
            return f"import {self.string(s.path)} as {s.alias}"
        if isinstance(s, ast.Save):
            out = f"save {self.string(s.path)} = {e(s.expr, False)}"
            if s.options:
                opts = [f"{o.name}{g(False)}={g(True)}{e(o.value, False)}" for o in s.options]
                sep = self.draw(st.sampled_from([" ", "\n    ", f"  {self.comment()}\n"]))
                out += sep + "with " + ("," + g(True)).join(opts)
            return out
        head = f"def {s.name}({self.params(s.params)})"
        if not s.block:
            return f"{head} ={g(True)}{e(s.body, False)}"
        lines = [f"    let {let.name} = {e(let.expr, False)}" for let in s.lets]
        body = e(s.body, False)
        # a line that starts with `-` continues the one before: `return` may stand alone
        sep = "\n        " if body.startswith("-") and self.draw(st.booleans()) else " "
        lines.append(f"    return{sep}{body}")
        if not s.lets and self.draw(st.booleans()):
            return f"{head} {{ {lines[0].strip()} }}"
        return f"{head} {{\n" + "".join(self.between() + line + "\n" for line in lines) + "}"

    def between(self) -> str:
        """What may separate two statements: blank lines and own-line comments."""
        return self.draw(st.sampled_from(["", "\n", "\n\n\n", f"{self.comment()}\n",
                                          f"\n  {self.comment()}\n\n"]))

    def trailing(self) -> str:
        return self.draw(st.sampled_from(["", f"  {self.comment()}", "   "]))


DEF_PARAMS = st.lists(st.builds(ast.DefParam, NAMES, st.none() | LITERALS), max_size=3)
STATEMENTS = st.one_of(
    st.builds(ast.ModelDecl, NAMES, STRINGS, st.booleans()),
    st.builds(ast.LoraDecl, NAMES, STRINGS),
    st.builds(ast.ClusterDecl, NAMES, EXPRS),
    st.builds(ast.Let, NAMES, EXPRS),
    st.builds(ast.Param, NAMES, LITERALS),
    st.builds(ast.Import, STRINGS, NAMES),
    st.builds(ast.Save, STRINGS, EXPRS, st.lists(st.builds(ast.KwArg, ARGNAMES, EXPRS),
                                                 max_size=2).map(tuple)),
    st.builds(ast.Def, NAMES, DEF_PARAMS.map(tuple), st.just(()), EXPRS, st.just(False)),
    st.builds(ast.Def, NAMES, DEF_PARAMS.map(tuple),
              st.lists(st.builds(ast.Let, NAMES, EXPRS), max_size=2).map(tuple), EXPRS,
              st.just(True)),
)


@st.composite
def recipes(draw):
    stmts = tuple(draw(st.lists(STATEMENTS, max_size=5)))
    w = Writer(draw)
    text = "".join(w.between() + w.stmt(s) + w.trailing() + "\n" for s in stmts) + w.between()
    return stmts, text


# At 100 columns few random recipes need splitting; at 24 nearly every bracket splits.
@pytest.mark.parametrize("width", [fmt.WIDTH, 24])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes())
def test_random_recipes_format_safely(width, recipe):
    stmts, src = recipe
    module, diags = parse(src)
    assert module is not None, diags
    assert module.stmts == stmts  # the generator writes what it means (and the parser agrees)
    with patch.object(fmt, "WIDTH", width):
        assert_formats(src)
