"""The recipe AST: frozen dataclasses, a `Span` on every node (left out of equality, so two
parses of equivalent text compare equal — the formatter's safety check relies on it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from karmixlang.diagnostics import Span

_NO_SPAN = Span("<none>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=_NO_SPAN, compare=False, repr=False)


# ------------------------------------------------------------------ expressions

@dataclass(frozen=True)
class Name:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Member:
    """`lib.name`: a member of an imported file."""
    lib: str
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Number:
    value: float
    text: str  # as written, so interpolation and the formatter keep the user's spelling
    span: Span = _span()


@dataclass(frozen=True)
class Interp:
    """`${name}` or `${lib.name}` inside a string."""
    name: str
    lib: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class String:
    parts: tuple[str | Interp, ...]
    span: Span = _span()

    @property
    def is_plain(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    @property
    def plain(self) -> str:
        """The text of a string without interpolations."""
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / |
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class KwArg:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: Name | Member
    args: tuple[Expr, ...]
    kwargs: tuple[KwArg, ...]
    span: Span = _span()


@dataclass(frozen=True)
class ClusterItem:
    expr: Expr
    weight: Expr | None
    span: Span = _span()


@dataclass(frozen=True)
class ClusterLit:
    items: tuple[ClusterItem, ...]
    span: Span = _span()


@dataclass(frozen=True)
class MapPair:
    key: String
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class MapLit:
    pairs: tuple[MapPair, ...]
    span: Span = _span()


Expr = Union[Name, Member, Number, String, Bool, Neg, BinOp, Call, ClusterLit, MapLit]
Literal = Union[Number, String, Bool, Neg]


# ------------------------------------------------------------------ statements

@dataclass(frozen=True)
class ModelDecl:
    """`model NAME = PATH` or `base NAME = PATH` (is_base)."""
    name: str
    path: String
    is_base: bool
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class LoraDecl:
    """`lora NAME = PATH`: a Delta read from a LoRA/LyCORIS file (docs/lora.md)."""
    name: str
    path: String
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class ClusterDecl:
    name: str
    expr: Expr
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class Let:
    name: str
    expr: Expr
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    name: str
    value: Literal
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class DefParam:
    name: str
    default: Literal | None
    span: Span = _span()


@dataclass(frozen=True)
class Def:
    name: str
    params: tuple[DefParam, ...]
    lets: tuple[Let, ...]
    body: Expr
    block: bool  # written with `{ ... return ... }` rather than `= EXPR`
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class Import:
    path: String
    alias: str
    name_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class Save:
    path: String
    expr: Expr
    options: tuple[KwArg, ...]
    span: Span = _span()


Stmt = Union[ModelDecl, LoraDecl, ClusterDecl, Let, Param, Def, Import, Save]
Decl = Union[ModelDecl, LoraDecl, ClusterDecl, Let, Param, Def, Import]


@dataclass(frozen=True)
class Comment:
    text: str  # including the leading `#`
    line: int
    col: int
    own_line: bool  # alone on its line (else it trails code)


@dataclass(frozen=True)
class Module:
    file: str
    stmts: tuple[Stmt, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False)


def children(node) -> tuple:
    """The direct sub-expressions of an expression node (for generic walks)."""
    if isinstance(node, Neg):
        return (node.operand,)
    if isinstance(node, BinOp):
        return (node.left, node.right)
    if isinstance(node, Call):
        return node.args + tuple(k.value for k in node.kwargs)
    if isinstance(node, ClusterLit):
        out = []
        for item in node.items:
            out.append(item.expr)
            if item.weight is not None:
                out.append(item.weight)
        return tuple(out)
    if isinstance(node, MapLit):
        return tuple(p.value for p in node.pairs)
    return ()


def walk(node):
    """Pre-order walk over an expression tree (iterative: recipes may nest deeply)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(children(n)))
