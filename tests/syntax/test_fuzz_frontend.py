"""Fuzzing the front end: whatever the text, parse + check return diagnostics and never raise;
every diagnostic has a registered code and a place inside the file; `kmx check` exits 0 or 1
and never prints a traceback.

Inputs: random text over the language's characters, random token soups, random recipes that
parse (to reach deep into the checker), and the valid corpus mutated by deleting, duplicating,
swapping and inserting characters or tokens.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karmixlang.check.checker import check_program
from karmixlang.cli import main
from karmixlang.diagnostics import CODES, render_text
from karmixlang.syntax.parser import parse

from conftest import fuzz_examples

VALID = Path(__file__).parents[1] / "data" / "valid"
CORPUS = {p.name: p.read_text(encoding="utf-8") for p in sorted(VALID.glob("*.kmx"))}
HELPERS = (VALID / "lib" / "helpers.kmx").read_text(encoding="utf-8")
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[0-9.eE+-]+|\s+|.')

KEYWORDS = ["model", "base", "lora", "cluster", "let", "param", "def", "return", "import", "as", "save",
            "with", "true", "false"]
WORDS = KEYWORDS + ["lerp", "mean", "select", "blocks", "std", "a", "o", "pool", "dtype",
                    "delta", "base", "default", "sdxl", "lib"]
SYMBOLS = list("()[]{}:,=+-*/|.#\"\\$") + ["${", "\n", "\r\n", " ", "\t"]
CHARS = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")) | \
    st.sampled_from([c for c in SYMBOLS if len(c) == 1] + ["\r", "\x00", "\f", "é", "\u2028"])
# Random text: characters, with a bias towards the language's symbols and words.
RANDOM_TEXT = st.lists(CHARS | st.sampled_from(SYMBOLS + WORDS), max_size=150).map("".join)

# derandomize keeps CI reproducible; a release run (KMX_FUZZ_EXAMPLES) explores afresh.
FUZZ = settings(deadline=None, max_examples=fuzz_examples(120),
                derandomize="KMX_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def check_text(folder: Path, text: str, name: str = "fuzz.kmx"):
    """Write `text` beside a copy of the helper library and check it: the diagnostics."""
    lib = folder / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "helpers.kmx").write_text(HELPERS, encoding="utf-8")
    path = folder / name
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _, diags = check_program(str(path))
    assert_sane(diags, {str(path): text, str(lib / "helpers.kmx"): HELPERS})
    return diags


def assert_sane(diags, sources: dict[str, str]) -> None:
    for d in diags:
        assert d.code in CODES and d.message
        for span in [d.span] + [n.span for n in d.notes]:
            if span is None or span.file not in sources:
                continue
            lines = sources[span.file].split("\n")
            assert 1 <= span.line <= len(lines), (d, len(lines))
            assert 1 <= span.col <= len(lines[span.line - 1]) + 1, (d, lines[span.line - 1])
            assert (span.end_line, span.end_col) >= (span.line, span.col), d
        render_text(d, sources)  # rendering never fails either


# ------------------------------------------------------------------ strategies

@st.composite
def token_soup(draw):
    """Plausible-looking lines: keywords, names, numbers, strings and operators."""
    atoms = st.sampled_from(WORDS) | st.sampled_from(SYMBOLS) | \
        st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,2})?([eE][+-]?[0-9])?", fullmatch=True) | \
        st.from_regex(r'"[a-z/${}.\\]{0,8}"', fullmatch=True)
    tokens = draw(st.lists(atoms, max_size=60))
    return " ".join(tokens)


NAMES = ["a", "b", "o", "pool", "t", "s", "f", "g", "x"]
CALLEES = ["lerp", "slerp", "add_difference", "mean", "sum", "median", "geometric_median",
           "model_stock", "karcher", "ties_merge", "trim", "dare", "della", "breadcrumbs",
           "clamp", "iso", "elect", "ties", "select", "exclude", "by_key", "blocks", "glob",
           "balanced", "zeros_like", "f", "g", "lib.soften", "lib.boost", "std.dgmla", "nope"]
KWARGS = ["t", "p", "eps", "seed", "rescale", "density", "rule", "base", "default", "IN00",
          "alpha", "c", "x", "by", "k", "z", "maxiter"]


def expressions():
    """Syntactically valid expressions over a few names: the checker's input space."""
    leaves = st.sampled_from(NAMES + ["lib.origin", "lib.family", "lib.alpha", "lerp"]) | \
        st.sampled_from(["0", "1", "0.5", "2", "1e-6", "1e308", "1e999", "true", "false", '"sdxl"',
                         '"mass"',
                         '"x/${s}"', '"re:.*"', '"*"', "[]"])

    def extend(inner):
        args = st.lists(inner, max_size=4)
        kwargs = st.lists(st.tuples(st.sampled_from(KWARGS), inner), max_size=3)
        call = st.builds(lambda f, a, k: f"{f}({', '.join(a + [f'{n}={v}' for n, v in k])})",
                         st.sampled_from(CALLEES), args, kwargs)
        binop = st.builds(lambda x, op, y: f"({x} {op} {y})", inner,
                          st.sampled_from(["+", "-", "*", "/", "|"]), inner)
        items = st.lists(st.tuples(inner, st.none() | inner), max_size=4)
        cluster = items.map(lambda it: "[" + ", ".join(
            e if w is None else f"{e}: {w}" for e, w in it) + "]")
        mapping = st.lists(inner, max_size=3).map(
            lambda vs: "{" + ", ".join(f'"k{i}": {v}' for i, v in enumerate(vs)) + "}")
        return call | binop | cluster | mapping | inner.map(lambda e: f"-{e}")

    return st.recursive(leaves, extend, max_leaves=12)


@st.composite
def random_recipe(draw):
    """A recipe that parses (mostly): declarations of the usual names with random values."""
    e = expressions()
    lines = ['import "lib/helpers.kmx" as lib', 'import "std/recipes.kmx" as std',
             'param s = "dir"', f"param t = {draw(st.sampled_from(['0.5', '-1', '2', 'true']))}",
             'base o = "o.safetensors"', 'model a = "${s}/a.safetensors"']
    path = draw(st.sampled_from(['"b"', '"${t}"', '"${lib.root}"', '"${lib.nope}"']))
    lines.append(f"model b = {path}")
    lines.append(f"cluster pool = {draw(e)}")
    lines.append(f"def f(x, y=0.5) = {draw(e)}")
    lines.append(f"def g(x) {{\n  let z = {draw(e)}\n  return {draw(e)}\n}}")
    for i in range(draw(st.integers(1, 4))):
        options = draw(st.lists(st.tuples(st.sampled_from(
            ["dtype", "fallback", "metadata", "shard", "delta", "other"]), e), max_size=3))
        opts = " with " + ", ".join(f"{n}={v}" for n, v in options) if options else ""
        lines.append(f'save "out{i}.safetensors" = {draw(e)}{opts}')
    return "\n".join(draw(st.permutations(lines))) + "\n"


@st.composite
def mutated(draw):
    """A valid recipe with a few random edits of characters or tokens."""
    name = draw(st.sampled_from(sorted(CORPUS)))
    text = CORPUS[name]
    by_tokens = draw(st.booleans())
    parts = TOKEN.findall(text) if by_tokens else list(text)
    for _ in range(draw(st.integers(1, 4))):
        if not parts:
            break
        i = draw(st.integers(0, len(parts) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert"]))
        if op == "delete":
            del parts[i]
        elif op == "duplicate":
            parts.insert(i, parts[i])
        elif op == "swap":
            j = draw(st.integers(0, len(parts) - 1))
            parts[i], parts[j] = parts[j], parts[i]
        else:
            parts.insert(i, draw(st.sampled_from(SYMBOLS + WORDS + ["[]", "0", "-1", "2"])))
    return name, "".join(parts)


# ------------------------------------------------------------------ properties

@FUZZ
@given(text=RANDOM_TEXT)
def test_random_text_gives_diagnostics_not_exceptions(tmp_path, text):
    module, diags = parse(text, "fuzz.kmx")
    assert (module is None) == bool(diags)
    assert_sane(diags, {"fuzz.kmx": text})
    check_text(tmp_path, text)


@FUZZ
@given(text=token_soup())
def test_token_soup_gives_diagnostics_not_exceptions(tmp_path, text):
    check_text(tmp_path, text)


@FUZZ
@given(text=random_recipe())
def test_random_recipes_give_diagnostics_not_exceptions(tmp_path, text):
    check_text(tmp_path, text)


@FUZZ
@given(case=mutated())
def test_mutated_recipes_give_diagnostics_not_exceptions(tmp_path, case):
    _, text = case
    check_text(tmp_path, text)


@settings(FUZZ, max_examples=fuzz_examples(40))
@given(case=mutated())
def test_mutated_recipes_through_the_cli(tmp_path, capsys, case):
    _, text = case
    check_text(tmp_path, text)  # writes fuzz.kmx and lib/
    limit = sys.getrecursionlimit()
    try:
        code = main(["check", str(tmp_path / "fuzz.kmx")])
    except SystemExit as exc:  # pragma: no cover - argparse only exits on bad arguments
        code = exc.code
    finally:
        sys.setrecursionlimit(limit)  # main() raises it; hypothesis wants it back
    out, err = capsys.readouterr()
    assert code in (0, 1), out + err
    assert "Traceback" not in out + err and "internal error" not in out + err


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_prefix_of_a_valid_recipe_is_handled(tmp_path, name):
    text = CORPUS[name]
    cuts = sorted({len(text) * k // 23 for k in range(1, 23)})
    for cut in cuts:
        check_text(tmp_path, text[:cut])
