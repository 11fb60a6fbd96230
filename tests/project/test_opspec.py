"""The op specs (ops.OPS) against the builtins table, the runtime's kernel tables and the
code: every op has one spec, every kernel one table entry whose signature follows its
builtin's parameters, and no op name is spelled anywhere that the table does not know."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from karmixlang import builtins
from karmixlang.builtins import BUILTINS, BY_OP
from karmixlang.ops import OPS, Chunk, Workspace
from karmixlang.runtime import kernels
from karmixlang.runtime.kernels.table import GRAM_SPLITS, KERNELS

PACKAGE = Path(builtins.__file__).parent
KERNEL_OPS = sorted(s.name for s in OPS.values() if s.kernel)


def test_every_builtin_op_has_a_spec_and_every_kernel_op_one_builtin():
    for b in BUILTINS.values():
        assert b.op is None or b.op in OPS, b.name
    for name in KERNEL_OPS:
        assert [b.name for b in BUILTINS.values() if b.op == name] == [BY_OP[name].name], name
    # builtins without an op are values of the lowering (per-key numbers, clusters, and
    # stack: a `|` of shifted layer slices)
    assert {b.name for b in BUILTINS.values() if b.op is None} == \
        {"by_key", "blocks", "glob", "balanced", "permutation", "align", "stack"}


def test_the_kernel_table_has_exactly_one_entry_per_kernel_op():
    assert sorted(KERNELS) == sorted(OPS[name].kernel for name in KERNEL_OPS)
    assert all(callable(f) for f in KERNELS.values())
    # the package re-exports every kernel (and the linear combination), nothing else
    assert set(kernels.__all__) == set(KERNELS) | {"combine"}


def test_the_gram_splits_are_the_ops_that_chunk_by_gram():
    assert set(GRAM_SPLITS) == {s.name for s in OPS.values() if s.chunk is Chunk.GRAM}


def _expected_signature(name: str) -> tuple[list[str | None], list[str]]:
    """The kernel's positional parameters (None: any name) and keyword-only ones, as the
    executor calls it (evaluate.Evaluator.call_args)."""
    b, spec = BY_OP[name], OPS[name]
    positional, keyword = [], []
    for p in b.params:
        if p.type.endswith("cluster"):
            positional += [None, None]  # (members, weights)
        elif p.type in ("space", "model", "delta"):
            positional.append(p.name)
        else:
            keyword.append(p.name)
    if spec.seeded:
        keyword += ["key", "member"] + (["offset"] if not spec.barrier else [])
    return positional, keyword


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_kernel_signatures_follow_their_builtins_parameters(name):
    sig = inspect.signature(KERNELS[OPS[name].kernel])
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    want_positional, want_keyword = _expected_signature(name)
    assert len(positional) == len(params) - len(keyword), name  # no *args or **kwargs
    assert len(positional) == len(want_positional), (name, positional)
    assert all(w is None or w == p for w, p in zip(want_positional, positional)), name
    assert keyword == want_keyword, name
    for p in BY_OP[name].params:  # a default the kernel has is the builtin's
        kp = sig.parameters.get(p.name)
        if kp is not None and kp.default is not kp.empty:
            assert not p.required and kp.default == p.default, (name, p.name)


def test_spec_properties_are_consistent():
    for s in OPS.values():
        assert not (s.alias and (s.linear or s.kernel or s.workspace(3, 4))), s.name
        assert (s.chunk is Chunk.SPLIT) == (s.split is not None), s.name
        if s.split:  # ties: its members are trimmed by threshold or spilled
            assert OPS[s.split].chunk is Chunk.THRESHOLD and s.per_member, s.name
        if s.seeded:  # the member index is part of the random stream
            assert s.broadcast, s.name


def test_linear_ops_coefficients():
    class N:
        def __init__(self, **attrs):
            self.attrs = attrs

        def attr(self, name):
            return self.attrs[name]

    class PerKey:
        def at(self, key):
            return {"a": 0.25}[key]

    assert OPS["lincomb"].coefficients(N(coeffs=(2.0, PerKey())), "a") == [2.0, 0.25]
    assert OPS["sum_"].coefficients(N(weights=(1.0, 3.0)), "a") == [1.0, 3.0]
    assert OPS["mean"].coefficients(N(weights=(1.0, 3.0)), "a") == [0.25, 0.75]
    assert sorted(s.name for s in OPS.values() if s.linear) == ["lincomb", "mean", "sum_"]


def test_workspace_formulas():
    assert Workspace(per_input=3.5)(3, 4) == 42 and Workspace(per_input=3.5).describe() == \
        "3.5 × inputs × n·b"
    assert Workspace(tensors=3)(5, 8) == 24 and Workspace(bytes=12)(5, 8) == 12
    assert Workspace()(7, 8) == 0 and Workspace().describe() == "0"
    sliced = Workspace(per_input=1, slice_tensors=7, sliced=True, bytes=4)
    assert sliced(8, 4) == 4 and sliced.per_slice_element(8, 4) == (8 + 7) * 4
    assert Workspace(per_input=2).per_slice_element(8, 4) == 0
    assert OPS["median"].stacks and not OPS["trim"].stacks
    assert OPS["elect"].tensors(3) == 3 and OPS["pick"].tensors(1) == 0 and \
        OPS["mean"].tensors(3) == 1


def _op_names_in(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants the code compares with an `.op`, or passes as a node's op to
    `Builder.node` (identifiers only: a syntax node's `.op` is an operator, `+` or `|`)."""
    found = []

    def strings(e):
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return [e.value]
        if isinstance(e, (ast.Tuple, ast.Set, ast.List)):
            return [x for elt in e.elts for x in strings(elt)]
        return []

    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            sides = [n.left, *n.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "op" for s in sides):
                found += [(n.lineno, v) for s in sides for v in strings(s)]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and \
                n.func.attr == "node" and n.args:
            found += [(n.lineno, v) for v in strings(n.args[0])]
        elif isinstance(n, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_BARRIERS")
                for t in n.targets):
            found += [(n.lineno, v) for v in strings(n.value)]
    return [(line, v) for line, v in found if v.isidentifier()]


def test_every_op_name_in_the_code_is_in_the_table():
    seen, unknown = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in _op_names_in(ast.parse(path.read_text(encoding="utf-8"))):
            seen.add(name)
            if name not in OPS:
                unknown.append(f"{path.relative_to(PACKAGE)}:{line}: {name!r}")
    assert not unknown, unknown
    # the scan does find the structural ops the stages handle themselves
    assert {"load", "lincomb", "union", "pick", "select", "exclude"} <= seen


def test_no_stage_keeps_its_own_list_of_op_names():
    """The sets of names the table replaced must not come back."""
    gone = ("ALIAS_OPS", "LINEAR_OPS", "_STACKED", "GRAM_OPS", "WHOLE_OPS", "SPLIT_OPS",
            "GramMethod", "getattr(ops")
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not [g for g in gone if g in text], path


def test_the_trim_family_schemes_are_only_claimed_by_trim_and_ties():
    # runtime/chunked.py runs THRESHOLD and SPLIT as trim's and ties' own schemes: another op
    # claiming them would silently be run as a trim.
    assert {s.name for s in OPS.values() if s.chunk is Chunk.THRESHOLD} == {"trim"}
    assert {s.name for s in OPS.values() if s.chunk is Chunk.SPLIT} == {"ties"}
    assert OPS["ties"].split == "trim"


def test_the_scaling_bound_of_an_op_is_its_spec_s():
    # lerp extrapolating 3x and dare at p=0.5 can grow their inputs; a median cannot.
    def arg(values):
        return lambda name, default: values.get(name, default)
    assert OPS["lerp"].gain(1.0, {"a": 1.0, "b": 1.0}, arg({"t": 3.0}), None) == 5.0
    assert OPS["dare"].gain(2.0, {"d": 2.0}, arg({"p": 0.5}), None) == 4.0
    assert OPS["median"].gain(2.0, {"c": 2.0}, arg({}), 3) == 2.0
    assert OPS["sum_"].gain(2.0, {"c": 2.0}, arg({}), 3) == 6.0
