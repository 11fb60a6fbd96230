"""The checker, through case files (as starlark-go's tests):

- tests/data/valid/*.kmx are recipes written to the contract: `check_program` reports no error.
- tests/data/diagnostics/*.kmx (and each chunk of its *.chunks files: one-case recipes,
  tests/chunkfile.py) are recipes where every line that must produce a diagnostic ends
  with a marker `### K0102` (several codes: `### K0101 K0112`). The set of (file, line, code)
  reported must equal the set marked, in the recipe and in the files it imports (helpers live
  in diagnostics/lib/ and are not cases of their own).

Then explicit cases: exact columns, did-you-mean and help texts, notes, generated inputs (too
deep, too large, not UTF-8) and a coverage check that every code the front end can emit is
exercised somewhere in this file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from chunkfile import cases

from karmixlang.check.checker import check_program
from karmixlang.diagnostics import CODES, Severity
from karmixlang.syntax.parser import MAX_DEPTH, MAX_SOURCE_BYTES

DATA = Path(__file__).parents[1] / "data"
VALID = sorted((DATA / "valid").glob("*.kmx"))
CASES = cases(DATA / "diagnostics")
MARKER = re.compile(r"###\s*((?:K\d{4}\s*)+)$")
IMPORT = re.compile(r'^\s*import\s+"([^"$]+)"', re.M)

# Codes in diagnostics.CODES[K0001..K0213] that `check` does not emit: K0213 (the base choice
# cannot matter) is a plan-time warning of the optimizer. Listed so that the coverage test
# notices when that changes.
NOT_EMITTED = {"K0213"}


def key(path) -> str:
    return os.path.realpath(path)


def markers(path: Path) -> set[tuple[str, int, str]]:
    out = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = MARKER.search(line)
        if m:
            for code in m.group(1).split():
                assert code in CODES, f"{path}:{n}: marker for unknown code {code}"
                out.add((key(path), n, code))
    return out


def imported(path: Path, seen: set | None = None) -> list[Path]:
    """The recipe and the local files it imports, transitively (std/ is not a case file)."""
    seen = set() if seen is None else seen
    if key(path) in seen or not path.is_file():
        return []
    seen.add(key(path))
    out = [path]
    for rel in IMPORT.findall(path.read_text(encoding="utf-8")):
        if not rel.startswith("std/"):
            out += imported((path.parent / rel), seen)
    return out


def reported(diags) -> set[tuple[str, int, str]]:
    out = set()
    for d in diags:
        assert d.span is not None, f"diagnostic without a place: {d}"
        out.add((key(d.span.file), d.span.line, d.code))
    return out


def show(items) -> str:
    return "\n".join(f"  {os.path.basename(f)}:{line}: {code}" for f, line, code in sorted(items))


def check_text(tmp_path, text: str, name: str = "r.kmx", **kw):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return check_program(str(path), **kw)[1]


def one(diags, code: str):
    found = [d for d in diags if d.code == code]
    assert len(found) == 1, diags
    return found[0]


# ------------------------------------------------------------------ case files

def test_corpus_is_there():
    assert len(VALID) >= 12 and len(CASES) >= 30


@pytest.mark.parametrize("path", VALID + [DATA / "valid" / "lib" / "helpers.kmx"],
                         ids=lambda p: p.name)
def test_valid_recipe_checks(path):
    program, diags = check_program(str(path))
    errors = [d for d in diags if d.is_error]
    assert errors == [], errors
    assert program is not None


def test_contract_example_is_verbatim():
    text = (DATA / "valid" / "contract_example.kmx").read_text(encoding="utf-8")
    contract = Path("/work/shared/design/language.md")
    if contract.is_file():
        block = re.search(r"```kmx\n(.*?)```", contract.read_text(encoding="utf-8"), re.S)
        assert block and block.group(1) == text
    assert 'cluster pool = balanced([xl, il])' in text
    assert 'std.dgmla(pool, sdxl, seed=seed) with dtype="fp16"' in text


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_diagnostics_case(case, tmp_path):
    path = case.file(tmp_path)
    files = imported(path)
    want = set().union(*(markers(f) for f in files))
    assert want, f"{path.name} marks no diagnostic"
    _, diags = check_program(str(path))
    got = reported(diags)
    assert got == want, (f"\nreported, not marked:\n{show(got - want)}"
                         f"\nmarked, not reported:\n{show(want - got)}")
    for d in diags:
        assert d.span.line >= 1 and d.span.col >= 1 and d.span.end_line >= d.span.line
        assert d.message and d.code in CODES


def test_syntax_cases_stop_at_the_first_error(tmp_path):
    for case in CASES:
        if case.name.startswith("syntax_"):
            _, diags = check_program(str(case.file(tmp_path)))
            assert len(diags) == 1, (case.name, diags)


# ------------------------------------------------------------------ exact places and texts

def test_unknown_name_points_at_the_name_with_did_you_mean(tmp_path):
    diags = check_text(tmp_path, 'model a = "a.safetensors"\nbase origin = "o.safetensors"\n'
                       'save "out/x.safetensors" = orgin + (a - origin)\n')
    d = one(diags, "K0102")
    assert (d.span.line, d.span.col, d.span.end_col) == (3, 28, 33)
    assert d.message == "unknown name `orgin`"
    assert d.help.startswith("did you mean `origin`? (base defined at ")
    assert d.help.endswith("r.kmx:2:6)")


def test_duplicate_points_at_both_places(tmp_path):
    diags = check_text(tmp_path, 'model a = "a.safetensors"\nlet b = a\n'
                       'model a = "b.safetensors"\nsave "x.safetensors" = b\n')
    d = one(diags, "K0101")
    assert (d.span.line, d.span.col) == (3, 7)
    assert [(n.span.line, n.span.col, n.message) for n in d.notes] == [(1, 7, "first defined here")]


def test_a_plus_b_is_rejected_with_the_lerp_help(tmp_path):
    diags = check_text(tmp_path, 'model a = "a.safetensors"\nmodel b = "b.safetensors"\n'
                       'save "x.safetensors" = a + b\nsave "y.safetensors" = 0.3*a + 0.7*b\n')
    d = one(diags, "K0201")
    assert (d.span.line, d.span.col, d.span.end_col) == (3, 24, 29)
    assert "lerp(a, b, 0.5)" in d.help and "mean([a, b])" in d.help


@pytest.mark.parametrize("text, code, line, col, end_col", [
    ('model a = "a${a+b}.safetensors"\n', "K0003", 1, 13, 19),
    ('model a = "x/${}"\n', "K0003", 1, 14, 17),
    ('model a = "a\\qb"\n', "K0002", 1, 13, 15),
    ('base o = "o"\nlet x = lerp(o, o, tt=1)\n', "K0104", 2, 20, 24),
    ('base o = "o"\nlet x = lerp(o, o, 0.5, o)\n', "K0106", 2, 25, 26),
    ('base o = "o"\nlet x = lerp(o, o, 0.5, t=1)\n', "K0107", 2, 25, 28),
    ('base o = "o"\nlet x = lerp(o,\n    o)\n', "K0105", 2, 9, 7),
    ('base o = "o"\nlet x = lerpp(o, o, 1)\n', "K0103", 2, 9, 14),
    ('base o = "o"\nlet x = lerp(o, o, t=1, o)\n', "K0001", 2, 25, 26),
    ('base o = "o"\nsave "x" = o - o\n', "K0203", 2, 12, 17),
    ('base o = "o"\nsave "x" = o with dtyp="fp16"\n', "K0208", 2, 19, 30),
    ('base o = "o"\nsave "x" = o\nsave "x" = o\n', "K0212", 3, 6, 9),
    ('base o = "o"\nsave "x" = lerp(o, o, 2)\n', "K0210", 2, 23, 24),
    ('base o = "o"\nsave "x" = mean([o: 0])\n', "K0206", 2, 21, 22),
    ('base o = "o"\nsave "x" = mean([])\n', "K0207", 2, 17, 19),
    ('model save = "x"\n', "K0001", 1, 7, 11),
    ('base o = "o"\nsave "x" = o $ o\n', "K0001", 2, 14, 15),
    ('base o = "o"\nlet x = (o\n', "K0001", 2, 11, 12),
    ('base o = "o\n', "K0002", 1, 10, 11),
    ('base o = "o"\nlet unused = o\n', "K0112", 2, 5, 11),
])
def test_columns(tmp_path, text, code, line, col, end_col):
    d = one(check_text(tmp_path, text), code)
    assert (d.span.line, d.span.col, d.span.end_col) == (line, col, end_col), d


def test_help_texts(tmp_path):
    diags = check_text(tmp_path, 'base o = "o"\nlet x = lerpp(o, o, tt=1)\n'
                       'save "x" = lerp(o, o, tt=1) with fallbak=o\n'
                       'save "y" = o - o\n')
    assert one(diags, "K0103").help == "did you mean `lerp`?"
    assert one(diags, "K0104").help == "did you mean `t`?"
    assert one(diags, "K0208").help == "did you mean `fallback`?"
    assert "with delta=true" in one(diags, "K0203").help


def test_all_checker_errors_are_reported_not_just_the_first(tmp_path):
    diags = check_text(tmp_path, 'base o = "o"\nsave "1" = a\nsave "2" = b\nsave "3" = c\n'
                       'save "4" = o + o\n')
    assert [(d.code, d.span.line) for d in diags] == [
        ("K0102", 2), ("K0102", 3), ("K0102", 4), ("K0201", 5)]


def test_interpolation_reports_every_bad_part(tmp_path):
    diags = check_text(tmp_path, 'param p = 1\nbase o = "o"\nmodel a = "${q}/${o}/${p}/${r}"\n'
                       'save "x" = lerp(o, a, 0.5)\n')
    assert [(d.code, d.span.col) for d in diags] == [("K0102", 12), ("K0202", 17), ("K0102", 27)]


def test_interpolation_uses_param_values(tmp_path):
    text = ('param a = "x"\nparam b = "y"\nparam n = 1.50\nbase o = "o"\n'
            'save "${a}/m.safetensors" = o\nsave "${b}/m${n}.safetensors" = o\n'
            'save "y/m1.50.safetensors" = o\n')
    d = one(check_text(tmp_path, text), "K0212")
    assert d.span.line == 7 and "y/m1.50.safetensors" in d.message
    assert check_text(tmp_path, text, overrides={"n": "2"}) == []


def test_import_cycle_and_save_in_import_notes():
    _, diags = check_program(str(DATA / "diagnostics" / "import_cycle.kmx"))
    d = one(diags, "K0109")
    assert "import_cycle.kmx -> cycle_other.kmx -> import_cycle.kmx" in d.message
    _, diags = check_program(str(DATA / "diagnostics" / "imports.kmx"))
    d = one(diags, "K0113")
    assert d.span.file.endswith("with_save.kmx")
    assert [(os.path.basename(n.span.file), n.span.line) for n in d.notes] == [("imports.kmx", 5)]


def test_recursion_messages(tmp_path):
    diags = check_text(tmp_path, 'base o = "o"\ndef f(x) = g(x)\ndef g(x) = f(x)\n'
                       'def h(x) = h(x)\nsave "x" = f(o) | h(o)\n')
    messages = sorted(d.message for d in diags if d.code == "K0108")
    assert messages == ["recursive def: f -> g -> f", "recursive def: g -> f -> g",
                        "recursive def: h -> h"]


def test_warnings_are_not_errors(tmp_path):
    program, diags = check_program(str(DATA / "valid" / "lib" / "helpers.kmx"))
    assert program is not None
    assert [d.code for d in diags] == ["K0112"] and diags[0].severity is Severity.WARNING
    diags = check_text(tmp_path, 'base o = "o"\nmodel a = "a"\nsave "x" = lerp(o, a, 1.5)\n')
    assert [(d.code, d.is_error) for d in diags] == [("K0210", False)]


def test_long_chains_of_definitions(tmp_path):
    lets = "".join(f"let l{i + 1} = lerp(o, l{i}, 0.5)\n" for i in range(3000))
    assert check_text(tmp_path, f'base o = "o"\nlet l0 = o\n{lets}save "x" = l3000\n') == []
    # Each def call is checked with its arguments' types (recursively): a very long chain of
    # defs calling defs is a K0004 diagnostic rather than a RecursionError.
    defs = "".join(f"def f{i}(x) = f{i + 1}(x)\n" for i in range(1000))
    diags = check_text(tmp_path, f'base o = "o"\n{defs}def f1000(x) = x\nsave "x" = f0(o)\n')
    assert [d.code for d in diags] == ["K0004"] and diags[0].span is not None
    defs = "".join(f"def f{i}(x) = f{i + 1}(x)\n" for i in range(200))
    assert check_text(tmp_path, f'base o = "o"\n{defs}def f200(x) = x\nsave "x" = f0(o)\n') == []
    nested = "lerp(o, " * (MAX_DEPTH - 1) + "o" + ", 0.5)" * (MAX_DEPTH - 1)
    assert check_text(tmp_path, f'base o = "o"\nsave "x" = {nested}\n') == []


def test_numbers_too_large_are_errors_not_crashes(tmp_path):
    diags = check_text(tmp_path, 'base o = "o"\nsave "x" = o + dare(o - o, p=0.5, seed=1e999)\n')
    d = one(diags, "K0204")
    assert (d.span.line, d.span.col, d.message) == (2, 40, "`1e999` is too large for a number")
    diags = check_text(tmp_path, 'param p = 0.5\nbase o = "o"\nsave "x" = lerp(o, o, p)\n',
                       overrides={"p": "1e999"})
    assert [d.code for d in diags] == ["K0211"] and "too large" in diags[0].message


# ------------------------------------------------------------------ generated inputs

GENERATED = {
    "deep_parens": ("let a = " + "(" * 10_000 + "1" + ")" * 10_000 + "\n", "K0004"),
    "deep_clusters": ("let a = " + "[" * 10_000 + "1" + "]" * 10_000 + "\n", "K0004"),
    "deep_calls": ("let a = " + "f(" * 10_000 + "1" + ")" * 10_000 + "\n", "K0004"),
    "deep_negation": ("let a = " + "-" * 10_000 + "1\n", "K0004"),
    "long_sum": ("let a = " + " + ".join(["x"] * 10_000) + "\n", "K0004"),
    "deep_def_body": ("def f(x) {\n return " + "(" * 10_000 + "x" + ")" * 10_000 + "\n}\n",
                      "K0004"),
    "five_megabytes": ('base o = "o"\n' + "# filler\n" * (5 * 2**20 // 9), "K0004"),
    "five_megabytes_utf8": ("# " + "é" * (5 * 2**19) + "\n", "K0004"),
    "not_utf8": (b'base o = "o"\nmodel a = "caf\xe9.safetensors"\n', "K0005"),
    "utf16": ('base o = "o"\n'.encode("utf-16"), "K0005"),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_inputs_give_one_diagnostic(tmp_path, name):
    content, code = GENERATED[name]
    path = tmp_path / f"{name}.kmx"
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    program, diags = check_program(str(path))
    assert program is None
    assert [d.code for d in diags] == [code], diags
    assert 1 <= diags[0].span.line <= content.count(b"\n") + 1


def test_depth_limits_have_places(tmp_path):
    d = check_text(tmp_path, "base o = \"o\"\nlet a = " + "(" * (MAX_DEPTH + 1) + "o"
                   + ")" * (MAX_DEPTH + 1) + "\n")[0]
    assert (d.code, d.span.line, d.span.col) == ("K0004", 2, 9 + MAX_DEPTH)
    d = check_text(tmp_path, "let a = " + "-" * (MAX_DEPTH + 1) + "1\n")[0]
    assert (d.code, d.span.line, d.span.col) == ("K0004", 1, 9 + MAX_DEPTH)
    ok = check_text(tmp_path, "base o = \"o\"\nsave \"x\" = " + "(" * MAX_DEPTH + "o"
                    + ")" * MAX_DEPTH + "\n")
    assert ok == []


def test_not_utf8_points_at_the_byte(tmp_path):
    path = tmp_path / "r.kmx"
    path.write_bytes(b'base o = "o"\nmodel a = "\xc3\xa9\xff"\n')
    d = one(check_program(str(path))[1], "K0005")
    assert (d.span.line, d.span.col) == (2, 13)


def test_limits_are_sane():
    assert MAX_SOURCE_BYTES < 5 * 2**20 and MAX_DEPTH >= 100


# ------------------------------------------------------------------ coverage of the codes

def test_every_front_end_code_is_exercised(tmp_path):
    covered = {c for case in CASES for f in imported(case.file(tmp_path)) for _, _, c in markers(f)}
    covered |= {code for _, code in GENERATED.values()}
    covered.add(one(check_text(tmp_path, 'param p = 1\n', overrides={"q": "1"}), "K0211").code)
    covered.add(one(check_program(str(tmp_path))[1], "K0006").code)  # a folder
    front_end = {c for c in CODES if "K0001" <= c <= "K0215"}
    assert front_end - covered == NOT_EMITTED
