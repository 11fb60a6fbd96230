"""The parser: grammar sanity (LALR, strict), the lexical rules of the contract, continuation
lines, spans on AST nodes, and limits (depth, size, encoding) that give diagnostics, never
exceptions."""

from __future__ import annotations

import re

import pytest

from karmixlang.syntax import ast
from karmixlang.syntax.ast import BinOp, Call, ClusterItem, ClusterLit, KwArg, Name, Neg, Number, String
from karmixlang.syntax.parser import MAX_DEPTH, MAX_SOURCE_BYTES, build_lark, parse, parse_file


def stmts(text: str):
    module, diags = parse(text, "t.kmx")
    assert diags == [] and module is not None, diags
    return module.stmts


def expr(text: str):
    """The expression of `let x = TEXT`."""
    (let,) = stmts(f"let x = {text}\n")
    return let.expr


def syntax_error(text: str):
    module, diags = parse(text, "t.kmx")
    assert module is None and len(diags) == 1, diags
    return diags[0]


# ------------------------------------------------------------------ the grammar itself

def test_grammar_builds_in_strict_mode():
    # strict=True makes lark refuse shift/reduce conflicts and colliding terminals; it needs the
    # `interegular` package (a test dependency).
    try:
        import interegular  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("strict mode needs the `interegular` package (a test dependency)")
    lark = build_lark(strict=True)
    assert lark.options.parser == "lalr"
    assert lark.options.propagate_positions


def test_grammar_builds_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build_lark(cache=False).parse("let x = 1\n") is not None
    build_lark()  # writes the cache under the user cache directory, not a shared temp name
    assert list((tmp_path / "karmixlang").glob("grammar-*.lark-cache"))


# ------------------------------------------------------------------ lexical rules

@pytest.mark.parametrize("name", ["savex", "models", "baseline", "clusters", "letter", "params",
                                  "define", "returns", "imports", "asx", "withx", "true_",
                                  "falsey", "_model", "Model", "SAVE", "a1_b2"])
def test_a_keyword_is_never_a_prefix_of_a_name(name):
    (decl,) = stmts(f'model {name} = "x"\n')
    assert decl.name == name
    assert expr(f"{name} + {name}") == BinOp("+", Name(name), Name(name))


@pytest.mark.parametrize("kw", ["model", "base", "cluster", "let", "param", "def", "return",
                                "import", "as", "save", "with", "true", "false"])
def test_keywords_cannot_be_declared(kw):
    d = syntax_error(f'let {kw} = 1\n')
    assert d.code == "K0001" and (d.span.line, d.span.col) == (1, 5)
    assert f"`{kw}` is a keyword" in d.help


@pytest.mark.parametrize("kw", ["model", "base", "cluster", "let", "param", "def", "return",
                                "import", "as", "save", "with", "true", "false"])
def test_keywords_may_name_keyword_arguments(kw):
    call = expr(f"f(a, {kw}=o)")
    assert call == Call(Name("f"), (Name("a"),), (KwArg(kw, Name("o")),))
    (save,) = stmts(f'save "x" = o with {kw}=1\n')
    assert save.options[0].name == kw


def test_model_stock_with_base_keyword():
    assert expr("model_stock(pool, base=o)") == Call(
        Name("model_stock"), (Name("pool"),), (KwArg("base", Name("o")),))


@pytest.mark.parametrize("text, value", [
    ("1", 1.0), ("0.5", 0.5), ("1e-6", 1e-6), ("2.5E+3", 2500.0), ("007", 7.0), ("10e2", 1000.0),
    ("3.14159", 3.14159), ("1E5", 1e5),
])
def test_numbers(text, value):
    assert expr(text) == Number(value, text)


@pytest.mark.parametrize("text", ["1.", ".5", "1e", "1e+", "1.e5", "0x10", "1_000", "1..2"])
def test_not_numbers(text):
    assert syntax_error(f"let x = {text}\n").code == "K0001"


def test_minus_is_always_an_operator():
    assert expr("-0.1") == Neg(Number(0.1, "0.1"))
    assert expr("a - -0.1") == BinOp("-", Name("a"), Neg(Number(0.1, "0.1")))
    assert expr("1e-6") == Number(1e-6, "1e-6")  # the exponent sign belongs to the number
    (param,) = stmts("param p = -0.05\n")
    assert param.value == Neg(Number(0.05, "0.05"))


def test_precedence_and_associativity():
    assert expr("a | b + c * -d") == BinOp("|", Name("a"), BinOp(
        "+", Name("b"), BinOp("*", Name("c"), Neg(Name("d")))))
    assert expr("a - b - c") == BinOp("-", BinOp("-", Name("a"), Name("b")), Name("c"))
    assert expr("a / b * c") == BinOp("*", BinOp("/", Name("a"), Name("b")), Name("c"))
    assert expr("a | b | c") == BinOp("|", BinOp("|", Name("a"), Name("b")), Name("c"))
    assert expr("(a + b) * c") == BinOp("*", BinOp("+", Name("a"), Name("b")), Name("c"))
    assert expr("-lib.f(x)") == Neg(Call(ast.Member("lib", "f"), (Name("x"),), ()))


def test_strings_escapes_and_interpolation():
    s = expr(r'"a\"b\\c\$d ${p} ${lib.q}$"')
    assert s == String(('a"b\\c$d ', ast.Interp("p"), " ", ast.Interp("q", "lib"), "$"))
    assert expr('""') == String(("",))
    assert expr('"# not a comment"') == String(("# not a comment",))


@pytest.mark.parametrize("text, code, col", [
    (r'"\n"', "K0002", 10), (r'"a\tb"', "K0002", 11), (r'"\'"', "K0002", 10),
    ('"${a+b}"', "K0003", 10), ('"${}"', "K0003", 10), ('"x${a.b.c}"', "K0003", 11),
    ('"${a"', "K0003", 10), ('"${ a}"', "K0003", 10), ('"abc', "K0002", 9),
])
def test_string_errors(text, code, col):
    d = syntax_error(f"let x = {text}\n")
    assert (d.code, d.span.line, d.span.col) == (code, 1, col)


def test_interpolation_error_span_covers_the_braces():
    d = syntax_error('model m = "a/${a+b}/c"\n')
    assert (d.span.col, d.span.end_col) == (14, 20)


def test_comments_are_kept_with_their_places():
    module, _ = parse('# top\nlet a = "#x" # after "q"\n  # own\nlet b = 1#tight', "t.kmx")
    assert [(c.text, c.line, c.col, c.own_line) for c in module.comments] == [
        ("# top", 1, 1, True), ('# after "q"', 2, 14, False), ("# own", 3, 3, True),
        ("#tight", 4, 10, False)]


def test_bom_crlf_and_missing_final_newline():
    assert stmts('\ufefflet a = 1\r\nlet b = 2') == (
        ast.Let("a", Number(1.0, "1")), ast.Let("b", Number(2.0, "2")))
    assert stmts("") == () and stmts("\n\n# only a comment") == ()


# ------------------------------------------------------------------ trailing commas, [], calls

def test_trailing_commas_everywhere():
    assert expr("[a, b,]") == expr("[a, b]")
    assert expr("f(a, t=1,)") == expr("f(a, t=1)")
    assert expr('{"a": 1,}') == expr('{"a": 1}')
    (d1,) = stmts("def f(a, b=1,) = a\n")
    (d2,) = stmts("def f(a, b=1) = a\n")
    assert d1 == d2
    (s1,) = stmts('save "x" = o with dtype="fp16", shard="1GB",\n')
    assert len(s1.options) == 2


def test_empty_cluster_parses():
    assert expr("[]") == ClusterLit(())
    assert expr("[a: 2, [b]]") == ClusterLit((
        ClusterItem(Name("a"), Number(2.0, "2")), ClusterItem(ClusterLit((
            ClusterItem(Name("b"), None),)), None)))
    assert expr("f()") == Call(Name("f"), (), ())


def test_positional_after_keyword_is_a_syntax_error():
    d = syntax_error("let x = f(a, t=1, b)\n")
    assert (d.code, d.span.col, d.span.end_col) == ("K0001", 19, 20)
    assert d.message == "positional argument after a keyword argument"


# ------------------------------------------------------------------ continuation lines

@pytest.mark.parametrize("text", [
    "let x = a -\n    b\n",                          # ends with an operator
    "let x = a\n    - b\n",                          # next line starts with -
    "let x = a -\n\n  # comment\n\n    b\n",          # blank and comment lines in between
    "let x = (a\n - b)\n",                           # open bracket
    "let x =\n a - b\n",                             # ends with =
])
def test_continuation_sub(text):
    assert stmts(text) == (ast.Let("x", BinOp("-", Name("a"), Name("b"))),)


@pytest.mark.parametrize("op", ["+", "-", "*", "/", "|"])
def test_a_line_ending_with_an_operator_continues(op):
    (let,) = stmts(f"let x = a {op}\n  b\n")
    assert let.expr == BinOp(op, Name("a"), Name("b"))


@pytest.mark.parametrize("op", ["+", "-", "|"])
def test_a_line_starting_with_an_operator_continues(op):
    (let,) = stmts(f"let x = a\n  # note\n\n  {op} b\n")
    assert let.expr == BinOp(op, Name("a"), Name("b"))


def test_a_line_starting_with_star_does_not_continue():
    assert syntax_error("let x = a\n  * b\n").span.line == 2


def test_with_on_the_next_line_and_comma_at_the_end():
    (save,) = stmts('save "x" = a\n  # c\n  with dtype="fp16",\n    fallback=o\n')
    assert [o.name for o in save.options] == ["dtype", "fallback"]
    (save,) = stmts('save "x" = a with\n  dtype="fp16"\n')
    assert save.options[0].name == "dtype"


def test_brackets_continue_across_lines():
    text = 'cluster c = [\n  a: 2,  # w\n\n  b,\n]\nlet m = by_key({\n "*": 1,\n})\n'
    c, m = stmts(text)
    assert len(c.expr.items) == 2 and len(m.expr.args[0].pairs) == 1


def test_def_forms():
    text = ("def f(a,\n      t=0.5,\n) = lerp(a, o, t)\n"
            "def g(p, q=-1,) {\n  # c\n  let r = p - q\n\n  let s = r * 2\n  return s\n}\n"
            "def h(x) { return x }\n")
    f, g, h = stmts(text)
    assert not f.block and [p.name for p in f.params] == ["a", "t"]
    assert g.block and [let.name for let in g.lets] == ["r", "s"] and g.body == Name("s")
    assert g.params[1].default == Neg(Number(1.0, "1"))
    assert h.block and h.lets == () and h.body == Name("x")


def test_def_body_newlines_matter_but_maps_inside_do_not():
    (d,) = stmts('def f(a) {\n  let m = by_key({\n "*": 0.5,\n })\n  return a * m\n}\n')
    assert d.lets[0].name == "m"
    assert syntax_error("def f(a)\n{\n return a\n}\n").span.line == 1
    assert syntax_error("def f(a) {\n let b = a\n}\n").span.line == 3


def test_statement_boundaries():
    assert len(stmts("let a = 1\nlet b = 2\n\n\nlet c = 3")) == 3
    assert syntax_error("let a = 1 let b = 2\n").span.col == 11


# ------------------------------------------------------------------ spans

def test_spans_of_names_calls_strings_and_declarations():
    text = 'base o = "o.safetensors"\nsave "x" = lerp(o,\n   lib.b, "s")\n'
    base, save = stmts(text)
    assert (base.name_span.line, base.name_span.col, base.name_span.end_col) == (1, 6, 7)
    assert (base.path.span.col, base.path.span.end_col) == (10, 25)
    call = save.expr
    assert (call.span.line, call.span.col, call.span.end_line, call.span.end_col) == (2, 12, 3, 15)
    assert (call.func.span.col, call.func.span.end_col) == (12, 16)
    o, member, s = call.args
    assert (o.span.line, o.span.col) == (2, 17)
    assert (member.span.line, member.span.col, member.span.end_col) == (3, 4, 9)
    assert (s.span.line, s.span.col, s.span.end_col) == (3, 11, 14)
    assert (save.path.span.col, save.path.span.end_col) == (6, 9)
    assert save.span.line == 2 and save.span.file == "t.kmx"


def test_spans_of_operators_kwargs_and_interpolation():
    (let,) = stmts('let x = -a + lerp(b, c, t=0.5) * 2\n')
    assert (let.expr.span.col, let.expr.span.end_col) == (9, 35)
    neg, mul = let.expr.left, let.expr.right
    assert (neg.span.col, neg.span.end_col) == (9, 11)
    kw = mul.left.kwargs[0]
    assert (kw.span.col, kw.span.end_col) == (25, 30)
    (m,) = stmts('model m = "a${p}b${lib.q}"\n')
    interp = [p for p in m.path.parts if isinstance(p, ast.Interp)]
    assert [(i.span.col, i.span.end_col) for i in interp] == [(13, 17), (18, 26)]


def test_syntax_error_lists_expected_tokens_by_spelling():
    d = syntax_error("let x = 1 +\n")
    assert d.message == "unexpected end of file" and "`(`" in d.help
    d = syntax_error("let x = f(a b)\n")
    assert (d.span.col, d.message) == (13, "unexpected `b`")
    assert not re.search(r"\b(LPAR|RPAR|NAME|_NL)\b", d.help)


# ------------------------------------------------------------------ limits

def test_a_10000_deep_expression_is_a_diagnostic():
    for text in ["let x = " + "(" * 10_000 + "a" + ")" * 10_000,
                 "let x = " + "-" * 10_000 + "a",
                 "let x = " + "f(" * 10_000 + "a" + ")" * 10_000,
                 "let x = " + "[" * 10_000 + "a" + "]" * 10_000,
                 "let x = " + "+".join("a" * 10_000),
                 "let x = " + "a*(" * 10_000 + "a" + ")" * 10_000]:
        d = syntax_error(text + "\n")
        assert d.code == "K0004" and d.span.line == 1 and d.span.col > MAX_DEPTH


def test_a_5mb_recipe_is_a_diagnostic(tmp_path):
    text = "let a = 1\n" * (5 * 2**20 // 10)
    assert len(text) > MAX_SOURCE_BYTES
    assert syntax_error(text).code == "K0004"
    path = tmp_path / "big.kmx"
    path.write_text("# " + "ü" * (5 * 2**19), encoding="utf-8")  # the cut falls inside a char
    module, text, diags = parse_file(str(path))
    assert module is None and [d.code for d in diags] == ["K0004"]


@pytest.mark.parametrize("data, line, col", [
    (b"let a = 1\nlet b = \"\xff\"\n", 2, 10),
    (b"\xfe\xff", 1, 1),
    (b"let a = \"\xc3\xa9\xc3\"\n", 1, 11),
    (b"\xed\xa0\x80", 1, 1),  # an encoded surrogate is not UTF-8
])
def test_non_utf8_bytes(tmp_path, data, line, col):
    path = tmp_path / "bad.kmx"
    path.write_bytes(data)
    module, text, diags = parse_file(str(path))
    assert module is None and text is None
    assert [(d.code, d.span.line, d.span.col) for d in diags] == [("K0005", line, col)]


def test_unreadable_file(tmp_path):
    module, text, diags = parse_file(str(tmp_path / "missing.kmx"))
    assert module is None and [d.code for d in diags] == ["K0110"]


@pytest.mark.parametrize("text", ["\x00", "let a = 1\x00", "\r", "let a = 1\rlet b = 2",
                                  "let \u00e9 = 1", "\\", "}", ")", "]"])
def test_odd_characters_are_syntax_errors(text):
    assert syntax_error(text).code in ("K0001", "K0002")
