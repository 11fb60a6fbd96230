"""Names and arguments are bound once (check/binder.py), for the checker and lowering alike:
however a call spells its arguments, and whatever a name shadows, the checker accepts what
lowering then evaluates the same way."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from karmixlang.check.checker import check_program
from karmixlang.ir.lower import lower

from conftest import fuzz_examples, recipe

HEAD = 'base o = "o.safetensors"\nmodel a = "a.safetensors"\nmodel b = "b.safetensors"\n'
# builtin -> its arguments in parameter order (required and optional)
CALLS = {
    "lerp": ["a", "b", "0.3"],
    "trim": ["a - o", "0.4"],
    "dare": ["a - o", "0.2", "7"],
    "slerp": ["a", "b", "0.7"],
    "geometric_median": ["[a, b]", "1e-6", "50"],
}
PARAMS = {"lerp": ["a", "b", "t"], "trim": ["d", "density"], "dare": ["d", "p", "seed"],
          "slerp": ["a", "b", "t"], "geometric_median": ["c", "eps", "maxiter"]}


def lowered(folder, text: str):
    path = recipe(folder, HEAD + text)
    program, diags = check_program(path)
    assert program is not None, [d.message for d in diags]
    return lower(program)


def spelled(name: str, positional: int, order: list[int]) -> str:
    """The call with its first `positional` arguments by position, the rest by keyword in
    `order`."""
    args, params = CALLS[name], PARAMS[name]
    kws = [i for i in order if i >= positional]
    return f"{name}(" + ", ".join(args[:positional] + [f"{params[i]}={args[i]}" for i in kws]) + ")"


@settings(max_examples=fuzz_examples(25), deadline=None)
@given(st.sampled_from(sorted(CALLS)), st.data())
def test_any_spelling_of_a_call_lowers_to_the_same_node(tmp_path_factory, name, data):
    n = len(CALLS[name])
    positional = data.draw(st.integers(0, n))
    order = data.draw(st.permutations(range(n)))
    folder = tmp_path_factory.mktemp("b")
    tail = ' + o' if name in ("trim", "dare") else ''
    canonical = lowered(folder, f'let x = {spelled(name, n, list(range(n)))}{tail}\n'
                        'save "out.safetensors" = x\n')
    other = lowered(folder, f'let x = {spelled(name, positional, order)}{tail}\n'
                    'save "out.safetensors" = x\n')
    assert other.saves[0].expr.op == canonical.saves[0].expr.op
    assert repr_tree(other.saves[0].expr) == repr_tree(canonical.saves[0].expr)


def repr_tree(node) -> str:
    return f"{node.op}{sorted(node.attrs)}(" + ",".join(repr_tree(i) for i in node.inputs) + ")"


def test_a_def_parameter_shadows_a_declaration_in_both_passes(tmp_path):
    # `b` inside the def is its parameter (the model a), not the file's model b.
    g = lowered(tmp_path, 'def pick(b) = b\nsave "out.safetensors" = pick(a)\n')
    assert g.saves[0].expr.op == "load" and g.saves[0].expr.attr("path").endswith("a.safetensors")


def test_a_let_in_a_def_shadows_a_declaration_in_both_passes(tmp_path):
    g = lowered(tmp_path, 'def f(x) {\n  let a = x\n  return lerp(a, b, 0.5)\n}\n'
                'save "out.safetensors" = f(o)\n')
    paths = sorted(i.attr("path").rsplit("/", 1)[1] for i in g.saves[0].expr.inputs)
    assert paths == ["b.safetensors", "o.safetensors"]


def test_a_parameter_named_like_a_def_is_not_callable(tmp_path):
    path = recipe(tmp_path, HEAD + 'def g(x) = x\ndef f(g) = g(a)\nsave "out.safetensors" = f(a)\n')
    codes = [d.code for d in check_program(path)[1]]
    assert "K0114" in codes


def test_the_builtins_corpus_calls_every_builtin():
    # tests/data/valid/builtins.kmx promises one valid call of each builtin: a new builtin
    # must join it, so the checker and lowering see it at least once.
    from pathlib import Path

    from karmixlang.builtins import BUILTINS
    from karmixlang.syntax import ast
    from karmixlang.syntax.parser import parse_file

    module, _, diags = parse_file(str(Path(__file__).parents[1] / "data/valid/builtins.kmx"))
    assert module is not None, diags
    called = {e.func.name for s in module.stmts for top in _exprs(s) for e in ast.walk(top)
              if isinstance(e, ast.Call) and isinstance(e.func, ast.Name)}
    assert set(BUILTINS) <= called, sorted(set(BUILTINS) - called)


def _exprs(stmt):
    return [getattr(stmt, f) for f in ("expr", "body") if getattr(stmt, f, None) is not None]
