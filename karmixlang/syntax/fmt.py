"""`kmx fmt`: the canonical layout of a recipe, printed from the AST and its comments.

black is the model. The layout is chosen from the AST alone (the source's own layout only
contributes its comments and its blank lines), and every result is checked before it is
returned: it must parse to statements equal to the input's, keep every comment, and format to
itself. A failed check raises `FormatterError` (the CLI exits 123, as black does), so the
formatter never hands back text that changes a recipe. docs/formatting.md states the rules.

Layout model: a *unit* is a run of text and expressions written from one indentation (a
statement, a line of a `def` body, the `with` line of a save, one argument of a split
bracket). A unit stays on one line if it fits in WIDTH columns and no comment sits inside its
brackets. Otherwise its outermost brackets (calls, clusters, maps not nested in another
bracket) are split, the last one first, until the unit's own lines fit: one argument per
line, four columns deeper, each argument a unit of its own.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter

from karmixlang.syntax import ast
from karmixlang.diagnostics import Diagnostic
from karmixlang.limits import recursion_room
from karmixlang.syntax.parser import parse

WIDTH = 100  # columns of code; a trailing comment may run past it (it cannot be wrapped)
INDENT = 4

_PREC = {"|": 1, "+": 2, "-": 2, "*": 3, "/": 3}
_NEG, _ATOM = 4, 5
_CLOSE = {ast.Call: ")", ast.ClusterLit: "]", ast.MapLit: "}"}
# The lexer's own string and comment tokens: the comment check must find comments without
# relying on the code (Module.comments) that told the printer where they are.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\[^\n])*"|#[^\n]*')
_BLOCK_TOKENS = re.compile(_STRING_OR_COMMENT.pattern + r"|\breturn\b|\{")


class FormatterError(Exception):
    """The formatter could not produce a safe result: a bug in kmx, never in the recipe."""


def format_source(text: str, file: str = "<recipe>") -> tuple[str | None, list[Diagnostic]]:
    """The canonical text of a recipe, or (None, diagnostics) when it does not parse.

    Raises FormatterError when the result would not be equivalent or not stable."""
    module, diags = parse(text, file)
    if module is None:
        return None, diags
    text = text.removeprefix("\ufeff")  # as the parser does: positions exclude it
    # Laying out a split bracket recurses about six frames deep per nesting level: recipes
    # nested as deeply as the parser allows need more than Python's default limit of 1000.
    with recursion_room():
        out = _print(module, text)
        _verify(text, module, out, file)
    return out, diags


def _verify(text: str, module: ast.Module, out: str, file: str) -> None:
    """black's safe mode: same statements, same comments, and a fixed point."""
    again, diags = parse(out, file)
    if again is None:
        d = diags[0]
        raise FormatterError(f"the formatted text does not parse ({d.message} at {d.span})")
    if again.stmts != module.stmts:
        pairs = enumerate(zip(module.stmts, again.stmts))
        k = next((i for i, (a, b) in pairs if a != b), len(again.stmts))
        where = module.stmts[k].span if k < len(module.stmts) else "the end of the file"
        raise FormatterError(f"formatting would change the statement at {where}")
    before, after = Counter(_comment_texts(text)), Counter(_comment_texts(out))
    if before != after:
        lost = sorted((before - after) + (after - before))
        raise FormatterError(f"formatting would not keep the comments {lost}")
    if _print(again, out) != out:
        raise FormatterError("formatting is not stable: a second pass changes the text")


def _comment_texts(text: str) -> list[str]:
    return [m.group().rstrip() for m in _STRING_OR_COMMENT.finditer(text)
            if m.group().startswith("#")]


def _print(module: ast.Module, text: str) -> str:
    lines = _Printer(text).module(module)
    return "".join(_render(line) + "\n" for line in lines)


def _render(line: list) -> str:
    indent, code, comment = line
    if not code and not comment:
        return ""  # a blank line carries no indentation
    if not comment:
        return " " * indent + code
    return " " * indent + (code + "  " if code else "") + comment


# ------------------------------------------------------------------ positions

def _pos(c: ast.Comment) -> tuple[int, int]:
    return c.line, c.col


def _start(node) -> tuple[int, int]:
    return node.span.line, node.span.col


def _end(node) -> tuple[int, int]:
    return node.span.end_line, node.span.end_col


def _last_line(span) -> int:
    """The last line of a statement: its span includes the newline that ends it (and so ends
    at column 1 of the next line), except for the last statement of a file."""
    return span.end_line - 1 if span.end_col == 1 and span.end_line > span.line else span.end_line


# ------------------------------------------------------------------ expressions

def _prec(node) -> int:
    if isinstance(node, ast.BinOp):
        return _PREC[node.op]
    return _NEG if isinstance(node, ast.Neg) else _ATOM


def _string(s: ast.String) -> str:
    out = []
    for part in s.parts:
        if isinstance(part, ast.Interp):
            out.append("${" + (f"{part.lib}." if part.lib else "") + part.name + "}")
        else:  # `$` needs its escape only where it would start an interpolation
            out.append(part.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${"))
    return '"' + "".join(out) + '"'


def _leaf(node) -> str:
    if isinstance(node, ast.Name):
        return node.name
    if isinstance(node, ast.Member):
        return f"{node.lib}.{node.name}"
    if isinstance(node, ast.Number):
        return node.text  # as written: `1e-6` stays `1e-6`
    if isinstance(node, ast.String):
        return _string(node)
    return "true" if node.value else "false"


def _opener(node) -> str:
    if isinstance(node, ast.Call):
        return _leaf(node.func) + "("
    return "[" if isinstance(node, ast.ClusterLit) else "{"


def _elements(node) -> list[tuple[object, list]]:
    """The arguments of a bracket: (node whose span places comments, segments to write)."""
    if isinstance(node, ast.Call):
        return [(a, [a]) for a in node.args] + [(k, [f"{k.name}=", k.value])
                                                  for k in node.kwargs]
    if isinstance(node, ast.ClusterLit):
        return [(i, [i.expr] if i.weight is None else [i.expr, ": ", i.weight])
                for i in node.items]
    return [(p, [_string(p.key) + ": ", p.value]) for p in node.pairs]


def _outermost(node) -> list:
    """The brackets of an expression that no other bracket contains, left to right."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.BinOp):
            stack += [n.right, n.left]
        elif isinstance(n, ast.Neg):
            stack.append(n.operand)
        elif type(n) in _CLOSE:
            out.append(n)
    return out


def _partition(brackets: list, comments: list) -> tuple[dict, list]:
    """Comments inside a bracket by bracket id, and the rest. A comment on the closing line
    follows the bracket, so it stays with the unit around the bracket."""
    inside: dict[int, list] = {}
    rest = []
    for c in comments:
        b = next((b for b in brackets if _start(b) < _pos(c) and c.line < b.span.end_line), None)
        if b is None:
            rest.append(c)
        else:
            inside.setdefault(id(b), []).append(c)
    return inside, rest


def _split(comments: list) -> tuple[list, str | None]:
    """A unit's loose comments: the last trailing one stays at the end of the unit's last
    line; the others go on their own lines before the unit, in source order."""
    cs = sorted(comments, key=_pos)
    trail = next((c for c in reversed(cs) if not c.own_line), None)
    return [c for c in cs if c is not trail], (trail.text if trail else None)


def _comment_lines(comments: list, indent: int) -> list[list]:
    return [[indent, "", c.text] for c in comments]


class _Out:
    """The lines of one unit as [indent, code, comment]. `own` indexes the lines the unit
    writes itself: only their width decides its layout (argument lines decide their own)."""

    def __init__(self, indent: int):
        self.indent = indent
        self.lines = [[indent, "", None]]
        self.own = [0]

    def text(self, s: str) -> None:
        self.lines[-1][1] += s

    def newline(self) -> None:
        self.own.append(len(self.lines))
        self.lines.append([self.indent, "", None])

    def fits(self) -> bool:
        return all(self.lines[i][0] + len(self.lines[i][1]) <= WIDTH for i in self.own)


class _Printer:
    def __init__(self, text: str):
        self._text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        # An argument's layout depends only on itself, its comments and its indentation, and
        # a unit tries several layouts: keep each argument's lines once computed.
        self._memo: dict[tuple[int, int], list] = {}

    # -- units
    def _layout(self, segs: list, indent: int, comments: list) -> tuple[list, list]:
        """Lines of a unit, and the comments it could not place inside its brackets."""
        brackets = [b for s in segs if not isinstance(s, str) for b in _outermost(s)]
        inside, rest = _partition(brackets, comments)
        plan = {id(b): self._slots(b, inside[id(b)], indent + INDENT)
                for b in brackets if id(b) in inside}
        spare = [b for b in reversed(brackets) if id(b) not in plan and _elements(b)]
        while True:
            out = _Out(indent)
            self._segs(segs, out, plan)
            if out.fits() or not spare:
                return out.lines, rest
            b = spare.pop(0)
            plan[id(b)] = self._slots(b, [], indent + INDENT)

    def _slots(self, node, comments: list, indent: int) -> tuple[str | None, list]:
        """A split bracket: the comment after its opener, and the lines between its opener
        and closer (one argument per line, each with its comments, then dangling ones)."""
        elems = _elements(node)
        inner = [[] for _ in elems]
        outer = [[] for _ in elems]
        opener, dangling = [], []
        for c in comments:
            p = _pos(c)
            k = next((i for i, (e, _) in enumerate(elems) if _start(e) < p < _end(e)), None)
            if k is not None:
                inner[k].append(c)
            elif c.own_line:  # before the next argument, or before the closer
                k = next((i for i, (e, _) in enumerate(elems) if p < _start(e)), None)
                (dangling if k is None else outer[k]).append(c)
            else:  # after the argument it follows, or after the opener
                k = next((i for i in reversed(range(len(elems))) if _end(elems[i][0]) <= p),
                         None)
                (opener if k is None else outer[k]).append(c)
        # one comment fits after the opener; earlier ones go on their own lines
        (outer[0] if elems else dangling).extend(opener[:-1])
        lines = []
        for (e, segs), i_comments, o_comments in zip(elems, inner, outer):
            lines += self._element(e, segs, indent, i_comments, o_comments)
        lines += _comment_lines(sorted(dangling, key=_pos), indent)
        return (opener[-1].text if opener else None), lines

    def _element(self, node, segs: list, indent: int, inner: list, outer: list) -> list:
        key = (id(node), indent)
        if key not in self._memo:
            lines, rest = self._layout(segs, indent, inner)
            lead, trail = _split(rest + outer)
            lines[-1][1] += ","  # a split bracket always ends its arguments with a comma
            lines[-1][2] = trail
            self._memo[key] = _comment_lines(lead, indent) + lines
        return self._memo[key]

    # -- writing expressions
    def _segs(self, segs: list, out: _Out, plan: dict) -> None:
        for s in segs:
            if isinstance(s, str):
                out.text(s)
            else:
                self._expr(s, out, plan)

    def _expr(self, node, out: _Out, plan: dict) -> None:
        if id(node) in plan:
            comment, lines = plan[id(node)]
            out.text(_opener(node))
            out.lines[-1][2] = comment
            out.lines += [list(line) for line in lines]
            out.newline()
            out.text(_CLOSE[type(node)])
        elif isinstance(node, ast.BinOp):
            prec = _PREC[node.op]
            self._operand(node.left, prec, out, plan)
            out.text(node.op if node.op in "*/" else f" {node.op} ")
            self._operand(node.right, prec + 1, out, plan)  # left-associative
        elif isinstance(node, ast.Neg):
            out.text("-")
            self._operand(node.operand, _NEG, out, plan)
        elif type(node) in _CLOSE:
            out.text(_opener(node))
            for i, (_, segs) in enumerate(_elements(node)):
                out.text(", " if i else "")
                self._segs(segs, out, plan)
            out.text(_CLOSE[type(node)])
        else:
            out.text(_leaf(node))

    def _operand(self, node, min_prec: int, out: _Out, plan: dict) -> None:
        """An operand, in parentheses only where the AST needs them."""
        parens = _prec(node) < min_prec
        out.text("(" if parens else "")
        self._expr(node, out, plan)
        out.text(")" if parens else "")

    def _flat(self, node) -> str:
        out = _Out(0)
        self._expr(node, out, {})
        return out.lines[0][1]

    # -- statements
    def module(self, module: ast.Module) -> list[list]:
        stmts = module.stmts
        starts = [s.span.line for s in stmts]
        inner = [[] for _ in stmts]
        items = []
        for c in module.comments:
            k = bisect_right(starts, c.line) - 1
            if k >= 0 and c.line <= _last_line(stmts[k].span):
                inner[k].append(c)
            else:
                items.append((c.line, c.line, _comment_lines([c], 0)))
        for s, comments in zip(stmts, inner):
            items.append((s.span.line, _last_line(s.span), self._stmt(s, comments)))
        return _join(items)

    def _stmt(self, s, comments: list) -> list[list]:
        if isinstance(s, ast.Def) and s.block:
            lines, rest = self._def_block(s, comments)
        elif isinstance(s, ast.Save):
            lines, rest = self._save(s, comments)
        else:
            lines, rest = self._layout(self._segments(s), 0, comments)
        lead, lines[-1][2] = _split(rest)  # the last line of a unit never has a comment yet
        return _comment_lines(lead, 0) + lines

    def _segments(self, s) -> list:
        if isinstance(s, ast.ModelDecl):
            return [f"{'base' if s.is_base else 'model'} {s.name} = ", s.path]
        if isinstance(s, ast.LoraDecl):
            return [f"lora {s.name} = ", s.path]
        if isinstance(s, ast.ClusterDecl):
            return [f"cluster {s.name} = ", s.expr]
        if isinstance(s, ast.Let):
            return [f"let {s.name} = ", s.expr]
        if isinstance(s, ast.Param):
            return [f"param {s.name} = ", s.value]
        if isinstance(s, ast.Import):
            return ["import ", s.path, f" as {s.alias}"]
        return [self._def_head(s) + " = ", s.body]

    def _def_head(self, d: ast.Def) -> str:
        params = ", ".join(p.name if p.default is None else f"{p.name}={self._flat(p.default)}"
                           for p in d.params)
        return f"def {d.name}({params})"

    def _save(self, s: ast.Save, comments: list) -> tuple[list, list]:
        head = [f"save {_string(s.path)} = ", s.expr]
        if not s.options:
            return self._layout(head, 0, comments)
        tail = ["with "]
        for i, o in enumerate(s.options):
            tail += [", " if i else "", f"{o.name}=", o.value]
        lines, rest = self._layout(head + [" "] + tail, 0, comments)
        if len(lines) == 1 and len(lines[0][1]) <= WIDTH:
            return lines, rest
        # Too long for one line: `with` starts a continuation line of its own.
        split = _start(s.options[0])
        lines, rest = self._layout(head, 0, [c for c in comments if _pos(c) < split])
        more, rest2 = self._layout(tail, INDENT, [c for c in comments if _pos(c) >= split])
        return lines + more, rest + rest2

    def _def_block(self, d: ast.Def, comments: list) -> tuple[list, list]:
        body = [(let, [f"let {let.name} = ", let.expr]) for let in d.lets]
        body.append((d.body, ["return ", d.body]))
        brace, ret = self._block_lines(d)
        ranges = [(let.span.line, _last_line(let.span)) for let in d.lets]
        ranges.append((ret, d.body.span.end_line))
        end = _last_line(d.span)
        inner = [[] for _ in body]
        rest, params, header, loose = [], [], [], []
        for c in comments:
            k = next((i for i, (a, b) in enumerate(ranges) if a <= c.line <= b), None)
            if c.line == end and not c.own_line:  # after the closing `}`
                rest.append(c)
            elif k is not None:
                inner[k].append(c)
            elif c.line < brace:  # in the parameter list: before the `def`, as for `def f() =`
                params.append(c)
            elif c.line == brace:  # after the `{`
                header.append(c)
            else:  # its own line in the body, at its place among the body lines
                loose.append(c)
        items = [(c.line, c.line, _comment_lines([c], INDENT)) for c in loose]
        for (_, segs), (a, b), cs in zip(body, ranges, inner):
            lines, left = self._layout(segs, INDENT, cs)
            lead, lines[-1][2] = _split(left)
            items.append((a, b, _comment_lines(lead, INDENT) + lines))
        head = [0, self._def_head(d) + " {", header[0].text if header else None]
        return _comment_lines(params, 0) + [head] + _join(items) + [[0, "}", None]], rest

    def _block_lines(self, d: ast.Def) -> tuple[int, int]:
        """The lines of a block's `{` and of its `return`. The AST has neither, and the
        `return` expression may start lines later (`return (`, or a `-` continuation line).
        Among the tokens before the expression that are outside strings and comments, the `{`
        is the first one (a default value is never a map), and the `return` is the last one
        (a keyword argument may be called `return`, but none comes after the keyword)."""
        begin = self._line_starts[d.span.line - 1]
        stop = self._line_starts[d.body.span.line - 1] + d.body.span.col - 1
        hits = [m for m in _BLOCK_TOKENS.finditer(self._text, begin, stop)
                if m.group() in ("{", "return")]
        brace = next(m for m in hits if m.group() == "{")
        ret = [m for m in hits if m.group() == "return"][-1]
        return tuple(self._text.count("\n", 0, m.start()) + 1 for m in (brace, ret))


def _join(items: list) -> list[list]:
    """Items (first line, last line, lines) in source order, with one blank line wherever
    the source had at least one between them."""
    out, prev = [], None
    for first, last, lines in sorted(items, key=lambda item: item[0]):
        if prev is not None and first - prev > 1:
            out.append([0, "", None])
        out += lines
        prev = last
    return out
