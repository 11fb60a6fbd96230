"""`kmx check` through `karmixlang.cli.main`: exit codes (0 clean, warnings allowed; 1 errors;
2 usage), `--set` overrides typed against the param's default, `--format json`, and output that
never holds a traceback."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from chunkfile import cases

from karmixlang.check.checker import check_program
from conftest import cli
from karmixlang.diagnostics import CODES

DATA = Path(__file__).parents[1] / "data"

RECIPE = """\
import "lib.kmx" as lib
param models = "models"
param alpha = 0.5
param seed = 7
param rescale = true
base o = "${models}/o.safetensors"
model a = "${lib.root}/a-${alpha}.safetensors"
cluster pool = [a, "${models}/b.safetensors"]
save "out/${models}.safetensors" = lerp(o, a, alpha)
save "out/dare.safetensors" = o + sum(dare(pool - o, p=0.5, seed=seed, rescale=rescale))
save "out/lib.safetensors" = lerp(o, a, lib.ratio)
"""
LIB = 'param root = "/ckpt"\nparam ratio = 0.25\nparam flag = false\n'


run = cli


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    (tmp_path / "lib.kmx").write_text(LIB, encoding="utf-8")
    path = tmp_path / "r.kmx"
    path.write_text(RECIPE, encoding="utf-8")
    return str(path)


def write(tmp_path, text: str, name: str = "x.kmx") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ exit codes

def test_clean_recipe_exits_0(capsys, recipe):
    code, out, err = run(capsys, "check", recipe)
    assert code == 0 and "ok" in err


def test_warnings_still_exit_0(capsys, tmp_path):
    path = write(tmp_path, 'base o = "o"\nmodel a = "a"\nlet unused = a\n'
                           'save "x" = lerp(o, a, 2)\n')
    code, out, err = run(capsys, "check", path)
    assert code == 0
    assert "warning[K0112]" in err and "warning[K0210]" in err and "ok (2 warning(s))" in err


def test_errors_exit_1_with_a_rendered_diagnostic(capsys, tmp_path):
    path = write(tmp_path, 'model a = "a"\nbase origin = "o"\n'
                           'save "out/x.safetensors" = orgin + (a - origin)\n')
    code, out, err = run(capsys, "check", path)
    assert code == 1
    assert "error[K0102]: unknown name `orgin`" in err
    assert f"{path}:3:28" in err
    assert "^^^^^ not defined in this file" in err
    assert "help: did you mean `origin`?" in err
    assert "1 error" in err


def test_syntax_error_exits_1(capsys, tmp_path):
    path = write(tmp_path, 'let x = [a, b\n')
    code, _, err = run(capsys, "check", path)
    assert code == 1 and "error[K0001]" in err


def test_square_brackets_in_recipes_survive_rendering(capsys, tmp_path):
    path = write(tmp_path, 'base o = "o"\nsave "x" = mean([o, [bold]zz[/bold]])\n')
    code, _, err = run(capsys, "check", path)
    assert code == 1 and "[bold]zz[/bold]" in err


def test_missing_file_argument_is_a_usage_error(capsys):
    code, _, err = run(capsys, "check")
    assert code == 2 and "FILE" in err


def test_nonexistent_file_is_an_error_not_a_crash(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.kmx"))
    assert code == 1 and "K0110" in err


def test_not_utf8_file_exits_1(capsys, tmp_path):
    path = tmp_path / "bad.kmx"
    path.write_bytes(b'base o = "\xff"\n')
    code, _, err = run(capsys, "check", str(path))
    assert code == 1 and "K0005" in err


def test_several_files_worst_code_wins(capsys, recipe, tmp_path):
    bad = write(tmp_path, "let x = 1 +\n", "bad.kmx")
    code, _, err = run(capsys, "check", recipe, bad)
    assert code == 1 and f"{recipe}: ok" in err and "K0001" in err


@pytest.mark.parametrize("path", sorted((DATA / "valid").glob("*.kmx")), ids=lambda p: p.name)
def test_valid_corpus_through_the_cli(capsys, path):
    assert run(capsys, "check", str(path))[0] == 0


@pytest.mark.parametrize("case", cases(DATA / "diagnostics"), ids=repr)
def test_diagnostics_corpus_through_the_cli(capsys, case, tmp_path):
    path = case.file(tmp_path)
    _, diags = check_program(str(path))
    code, out, err = run(capsys, "check", str(path))
    assert code == (1 if any(d.is_error for d in diags) else 0)
    for d in diags:
        assert f"{d.severity.value}[{d.code}]: {d.message}" in err
        assert f"{d.span.file}:{d.span.line}:{d.span.col}" in err


# ------------------------------------------------------------------ --set

@pytest.mark.parametrize("setting", [
    "models=/data/ckpt", "models=", "alpha=0.7", "alpha=1e-3", "alpha=-0.25", "alpha=3",
    "seed=250608", "rescale=false", "rescale=true", "lib.root=/x", "lib.ratio=0.75",
    "lib.flag=true", "models=a=b",
])
def test_set_accepts_values_of_the_params_type(capsys, recipe, setting):
    assert run(capsys, "check", recipe, "--set", setting)[0] == 0


@pytest.mark.parametrize("setting, wanted", [
    ("alpha=abc", "expected a number"), ("alpha=", "expected a number"),
    ("alpha=1,5", "expected a number"), ("alpha=0x10", "expected a number"),
    ("rescale=yes", "expected `true` or `false`"), ("rescale=1", "expected `true` or `false`"),
    ("lib.ratio=half", "expected a number"), ("lib.flag=True", "expected `true` or `false`"),
])
def test_set_rejects_values_of_another_type(capsys, recipe, setting, wanted):
    code, _, err = run(capsys, "check", recipe, "--set", setting)
    assert code == 1 and "error[K0211]" in err and wanted in err
    name = setting.split("=")[0].split(".")[-1]
    assert f"`{name}` is a" in err  # the label under the param's declaration


@pytest.mark.parametrize("setting, hint", [
    ("modles=/x", "did you mean `models`?"), ("alpah=1", "did you mean `alpha`?"),
    ("lib.rot=/x", "did you mean `lib.root`?"), ("lib.nothing=1", "params: alpha"),
    ("nolib.root=1", "did you mean `lib.root`?"),
])
def test_set_unknown_param(capsys, recipe, setting, hint):
    code, _, err = run(capsys, "check", recipe, "--set", setting)
    assert code == 1 and "error[K0211]" in err and hint in err


def test_set_changes_the_values_the_checker_sees(capsys, recipe):
    code, _, err = run(capsys, "check", recipe, "--set", "alpha=2")
    assert code == 0 and "warning[K0210]" in err and "t = 2 extrapolates" in err
    code, _, err = run(capsys, "check", recipe, "--set", "seed=1.5")
    assert code == 1 and "`seed` must be an integer" in err
    code, _, err = run(capsys, "check", recipe, "--set", "lib.ratio=-1")
    assert code == 0 and "t = -1 extrapolates" in err


def test_set_is_repeatable(capsys, recipe):
    code, _, err = run(capsys, "check", recipe, "--set", "alpha=0.1", "--set", "modles=x",
                       "--set", "rescale=maybe")
    assert code == 1 and err.count("error[K0211]") == 2


@pytest.mark.parametrize("setting", ["alpha", "=3", ""])
def test_bad_set_syntax_is_a_usage_error(capsys, recipe, setting):
    code, _, err = run(capsys, "check", recipe, "--set", setting)
    assert code == 2 and "NAME=VALUE" in err


# ------------------------------------------------------------------ --format json

def test_json_output(capsys, tmp_path):
    path = write(tmp_path, 'model a = "a"\nlet u = a\nsave "x" = a + a\n')
    code, out, err = run(capsys, "check", path, "--format", "json")
    assert code == 1
    data = json.loads(out)
    diags = data["diagnostics"]
    assert [(d["code"], d["severity"]) for d in diags] == [("K0201", "error"),
                                                          ("K0112", "warning")]
    for d in diags:
        assert d["code"] in CODES and d["message"]
        assert set(d["span"]) == {"file", "line", "col", "end_line", "end_col"}
    assert (diags[0]["span"]["line"], diags[0]["span"]["col"]) == (3, 12)
    assert "lerp(a, b, 0.5)" in diags[0]["help"]


def test_json_output_clean_and_with_notes(capsys, recipe, tmp_path):
    code, out, _ = run(capsys, "check", recipe, "--format", "json")
    assert code == 0 and json.loads(out) == {"diagnostics": []}
    path = write(tmp_path, 'model a = "a"\nmodel a = "b"\nsave "x" = a\n')
    code, out, _ = run(capsys, "check", path, "--format", "json")
    (d,) = json.loads(out)["diagnostics"]
    assert d["code"] == "K0101" and d["notes"][0]["span"]["line"] == 1


def test_json_output_for_set_errors_has_null_span(capsys, recipe):
    code, out, _ = run(capsys, "check", recipe, "--format", "json", "--set", "nope=1")
    (d,) = json.loads(out)["diagnostics"]
    assert code == 1 and d["code"] == "K0211" and d["span"] is None


def test_bad_format_is_a_usage_error(capsys, recipe):
    assert run(capsys, "check", recipe, "--format", "xml")[0] == 2
