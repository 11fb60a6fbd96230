"""`lora NAME = PATH` in the checker: a Delta wherever a Delta may go, never a Model; the
`unmatched` save option; `lora` is a keyword. No file is read by the checker."""

from __future__ import annotations

import pytest

from karmixlang.check.checker import check_program

from conftest import recipe


def codes(tmp_path, text: str, warnings: bool = True) -> list[str]:
    _, diags = check_program(recipe(tmp_path, text))
    return [d.code for d in diags if warnings or d.is_error]


@pytest.mark.parametrize("expr", [
    "b + 0.8*s + 0.5*t",
    "b + sum([s, t])",
    "b + mean([s: 2, t: 1])",
    "b + trim(s, density=0.5)",
    "b + dare(s, p=0.5, seed=1)",
    "b + (s - t)",
    "b + s | select(b, \"model.*\")",
    "lerp(b, b + s, 0.5)",
])
def test_a_lora_is_a_delta_anywhere_a_delta_is(tmp_path, expr):
    assert codes(tmp_path, f"""
        base b = "b.safetensors"
        lora s = "s.safetensors"
        lora t = "t.safetensors"
        save "out.safetensors" = {expr}
    """, warnings=False) == []


@pytest.mark.parametrize("expr, code", [
    ("s", "K0203"),  # a Delta saved without a base
    ("b + s + t - s + b", "K0201"),  # coefficients of models sum to 2
    ("b * s", "K0202"),
])
def test_a_lora_is_not_a_model(tmp_path, expr, code):
    assert code in codes(tmp_path, f"""
        base b = "b.safetensors"
        lora s = "s.safetensors"
        lora t = "t.safetensors"
        save "out.safetensors" = {expr}
    """)


def test_an_unused_lora_is_warned_about(tmp_path):
    assert codes(tmp_path, """
        base b = "b.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b
    """) == ["K0112"]


@pytest.mark.parametrize("value, ok", [('"warn"', True), ('"error"', True),
                                       ('"skip"', False), ("1", False)])
def test_the_unmatched_option(tmp_path, value, ok):
    got = codes(tmp_path, f"""
        base b = "b.safetensors"
        lora s = "s.safetensors"
        save "out.safetensors" = b + s with unmatched={value}
    """)
    assert got == ([] if ok else ["K0208"])


def test_lora_is_a_keyword_but_may_name_an_argument(tmp_path):
    assert codes(tmp_path, 'model lora = "x.safetensors"\n') == ["K0001"]
    assert codes(tmp_path, """
        base b = "b.safetensors"
        lora s = "s.safetensors"
        def f(x, lora) = x + lora
        save "out.safetensors" = f(b, lora=s)
    """) == ["K0001"]  # a def parameter is a name, and `lora` is not one
