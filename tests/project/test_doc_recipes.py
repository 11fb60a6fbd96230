"""The migration guides and the cookbook stay runnable: every ```kmx block of docs/from-sd-mecha.md,
docs/from-mergekit.md and docs/cookbook.md checks without errors (warnings are allowed), and every
`kmx ...` command in their ```sh blocks names a real subcommand and parses with kmx's own
argument parser."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

try:
    from karmixlang.check.checker import check_program
except ImportError:  # before check.py was renamed checker.py
    from karmixlang.check import check_program
from karmixlang.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ("from-sd-mecha.md", "from-mergekit.md", "cookbook.md")

FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
SHELL_KEYWORDS = {"do", "then", "else", "elif", "if", "while", "until", "time", "!"}  # before a command


def blocks(page: str, lang: str) -> list[tuple[int, str]]:
    """(line number, text) of each fenced block of the given language in docs/PAGE."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == lang]


def cases(lang: str) -> list:
    return [pytest.param(page, line, body, id=f"{page}:{line}")
            for page in PAGES for line, body in blocks(page, lang)]


def kmx_commands(script: str) -> list[list[str]]:
    """The argument lists of the `kmx` invocations in a shell snippet: each simple command
    (split at pipes, `&&`, `;`, ...) whose first word is `kmx`; comments are ignored."""
    commands = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in list(lexer) + [";"]:
            if token in SHELL_SEPARATORS or set(token) <= set("|&;()"):
                if current and current[0] == "kmx":
                    commands.append(current[1:])
                current = []
            elif not current and token in SHELL_KEYWORDS:
                continue
            elif token.startswith((">", "<")) or (current and current[-1] in (">", ">>", "<")):
                continue  # a redirection and its target are not arguments
            else:
                current.append(token)
    return commands


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_pages_have_examples():
    for page in PAGES:
        assert blocks(page, "kmx"), f"docs/{page} has no ```kmx block"
        assert any(kmx_commands(body) for _, body in blocks(page, "sh")) or page != "cookbook.md"


@pytest.mark.parametrize("page,line,body", cases("kmx"))
def test_kmx_block_checks_without_errors(page, line, body, tmp_path):
    recipe = tmp_path / "recipe.kmx"
    recipe.write_text(body, encoding="utf-8")
    _program, diags = check_program(str(recipe))
    errors = [d for d in diags if d.is_error]
    assert not errors, f"docs/{page}, block at line {line}:\n" + "\n".join(
        f"{d.code}: {d.message}" for d in errors)


@pytest.mark.parametrize("page,line,body", cases("sh"))
def test_sh_block_kmx_commands_are_real(page, line, body):
    subs = subcommands()
    parser = build_parser()
    for argv in kmx_commands(body):
        assert argv, f"docs/{page}:{line}: a bare `kmx`"
        assert argv[0] in subs, f"docs/{page}:{line}: `kmx {argv[0]}` is not a subcommand"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
                pytest.fail(f"docs/{page}:{line}: `kmx {' '.join(argv)}` does not parse "
                            f"(exit {exc.code}): {stderr.getvalue().strip()}")


def test_kmx_commands_splits_shell_lines():
    script = ("kmx plan a.kmx --json | jq '.saves[] | {path}'  # comment\n"
              "for s in 1 2; do kmx run b.kmx --set seed=$s -q; done\n"
              "kmx graph c.kmx | dot -Tsvg > c.svg && kmx check c.kmx\n"
              "huggingface-cli download x --local-dir y\n")
    assert kmx_commands(script) == [["plan", "a.kmx", "--json"],
                                    ["run", "b.kmx", "--set", "seed=$s", "-q"],
                                    ["graph", "c.kmx"], ["check", "c.kmx"]]
