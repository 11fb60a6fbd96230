"""The documentation stays in step with the code: one page per diagnostic code, every command and
flag in docs/cli.md, every MBW slot (with its key count) in docs/blocks.md, every field of a
real plan in docs/plan-format.md, and the kmx examples of the reference pages parse."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from karmixlang import api
from karmixlang.blocks import all_slots, slot_of
from karmixlang.cli import build_parser
from karmixlang.diagnostics import CODES
from karmixlang.syntax.parser import parse
from karmixlang.resources import data_dir
from karmixlang.demo.synth import load_layout, write_model

DOCS = Path(__file__).resolve().parents[2] / "docs"
ERRORS = DOCS / "errors"


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# ------------------------------------------------------------------ docs/errors

@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_has_a_page_titled_with_its_code_and_title(code):
    page = ERRORS / f"{code}.md"
    assert page.is_file(), f"docs/errors/{code}.md is missing"
    first = page.read_text(encoding="utf-8").splitlines()[0]
    assert code in first and CODES[code] in first, first
    assert first == f"# {code}: {CODES[code]}", first


def test_every_error_page_names_a_real_code():
    for page in ERRORS.iterdir():
        assert page.suffix == ".md", page.name
        assert page.stem in CODES, f"docs/errors/{page.name} names no code in diagnostics.CODES"


def test_every_error_page_has_the_three_parts():
    for code in CODES:
        text = (ERRORS / f"{code}.md").read_text(encoding="utf-8")
        for heading in ("## What triggers it", "## How to fix it"):
            assert heading in text, (code, heading)
        # An example with the real diagnostic, except for a code nothing emits yet.
        if "never emitted" not in text:
            assert re.search(rf"(error|warning)\[{code}\]", text), code


def test_kmx_explain_finds_every_page():
    folder = data_dir("errors")
    for code in CODES:
        assert folder.joinpath(f"{code}.md").is_file(), code


# ------------------------------------------------------------------ docs/cli.md

def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_and_flag_is_in_cli_md():
    text = read("cli.md")
    subs = _subcommands()
    assert {"check", "fmt", "plan", "graph", "run", "explain", "methods", "inspect", "demo",
            "new", "init"} <= set(subs)
    for name, sub in subs.items():
        assert f"kmx {name}" in text, f"`kmx {name}` is not in docs/cli.md"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in text, f"`kmx {name} {flag}` is not in docs/cli.md"


def test_cli_md_lists_every_exit_code():
    text = read("cli.md")
    for code in ("0", "1", "2", "3", "123", "130"):
        assert re.search(rf"^\| {code} \|", text, re.M), f"exit code {code}"


# ------------------------------------------------------------------ docs/blocks.md

def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.mark.parametrize("arch", ["sdxl", "sd1", "flux"])
def test_every_slot_is_in_blocks_md_with_its_key_count(arch):
    text = read("blocks.md")
    for slot in all_slots(arch):
        assert f"`{slot}`" in text, slot
    counts = Counter(slot_of(arch, key) for key in load_layout(arch))
    section = _section(text, f'## "{arch}":')
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", section, re.M))
    for slot in all_slots(arch):
        assert int(rows.get(slot, -1)) == counts[slot], (arch, slot, counts[slot])
    no_slot = re.search(r"^\| \(no slot\) \| (\d+) \|", section, re.M)
    assert no_slot and int(no_slot.group(1)) == counts[None], (arch, counts[None])


# ------------------------------------------------------------------ docs/plan-format.md

@pytest.fixture
def plan_json(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    rng = np.random.default_rng(0)

    def model(name, vae=True):
        tensors = {
            "model.diffusion_model.input_blocks.0.0.weight": rng.normal(size=(4, 4)).astype(np.float16),
            "model.diffusion_model.out.2.weight": rng.normal(size=(4,)).astype(np.float16),
            "cond_stage_model.position_ids": np.arange(3, dtype=np.int64).reshape(1, 3),
        }
        if vae:
            tensors["first_stage_model.conv.weight"] = rng.normal(size=(2, 2)).astype(np.float16)
        write_model(tmp_path / f"{name}.safetensors", tensors)

    model("base")
    model("a")
    model("b", vae=False)
    recipe = tmp_path / "r.kmx"
    recipe.write_text(
        'base origin = "base.safetensors"\n'
        'model a = "a.safetensors"\n'
        'model b = "b.safetensors"\n'
        'let d = blocks("sd1", default=0.5) * (mean([a, b]) - origin)\n'
        'save "out/x.safetensors" = origin + d | select(a, "first_stage_model.*") with dtype="fp16"\n',
        encoding="utf-8")
    return json.loads(api.compile(str(recipe)).plan.to_json())


def test_every_field_of_a_real_plan_is_in_plan_format_md(plan_json):
    text = read("plan-format.md")
    for key in plan_json:
        assert f"`{key}`" in text, f"top-level `{key}` is not in docs/plan-format.md"
    for part in ("inputs", "nodes", "saves"):
        assert plan_json[part], part
        for item in plan_json[part]:
            for key in item:
                assert f"`{key}`" in text, f"`{part}[].{key}` is not in docs/plan-format.md"
    for key in plan_json["totals"]:
        assert f"`{key}`" in text, f"`totals.{key}` is not in docs/plan-format.md"
    for node in plan_json["nodes"]:
        assert f"`{node['op']}`" in text, f"op `{node['op']}` is not in docs/plan-format.md"
    assert f"`schema_version` {plan_json['schema_version']}" in text


# ------------------------------------------------------------------ examples parse

@pytest.mark.parametrize("name", ["language.md", "blocks.md", "cli.md", "architecture.md"])
def test_kmx_examples_in_reference_pages_parse(name):
    for i, block in enumerate(re.findall(r"```kmx\n(.*?)```", read(name), re.S)):
        module, diags = parse(block, f"{name}#{i}")
        assert module is not None, (name, i, [d.message for d in diags])


def test_methods_page_is_generated_from_the_builtins_table():
    from karmixlang.builtins import methods_markdown

    page = (DOCS / "methods.md").read_text(encoding="utf-8")
    assert page == methods_markdown(), "regenerate: python -m karmixlang.builtins > docs/methods.md"
