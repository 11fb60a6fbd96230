"""Text -> AST. A cached LALR parser, a postlexer for the newline rules of the contract, and
a transformer that builds the frozen AST during the parse (no recursion over deep trees).
Syntax errors become K0001/K0002/K0003 diagnostics; nothing here raises anything else."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.visitors import Transformer_NonRecursive

from karmixlang.syntax import ast
from karmixlang.diagnostics import Diagnostic, Span, error
from karmixlang.limits import MAX_EXPR_DEPTH

MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = MAX_EXPR_DEPTH  # deeper expressions get K0004 instead of a RecursionError later

_OPEN = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}
_CONTINUE_AFTER = {"EQUAL", "COMMA", "PLUS", "MINUS", "STAR", "SLASH", "VBAR", "COLON", "WITH"}
_CONTINUE_BEFORE = {"WITH", "VBAR", "PLUS", "MINUS"}


class _TooDeep(Exception):
    """Raised by the postlexer at a bracket nested more than MAX_DEPTH levels deep."""

    def __init__(self, tok: Token):
        super().__init__(tok.value)
        self.tok = tok


class _Newlines:
    """Postlexer: newlines end statements except inside (), [] and map {}, after a binary
    operator, `,` or `=`, and before a line starting with `with`, `|`, `+` or `-`. The `{`
    of a `def` body keeps newlines significant, so it is retyped to _LBRACE_BODY."""

    always_accept = ("_NL",)

    def process(self, stream):
        stack: list[str] = []  # "(" "[" "{" or "body"
        last: str | None = None  # type of the last token passed on
        pending: Token | None = None
        in_def = False
        prev = None
        for tok in stream:
            if tok.type == "_NL":
                if (stack and stack[-1] != "body") or last in _CONTINUE_AFTER:
                    continue
                if pending is None and last not in (None, "_NL"):
                    pending = tok
                continue
            if pending is not None:
                if tok.type not in _CONTINUE_BEFORE:
                    yield pending
                    last = "_NL"
                pending = None
            if last in (None, "_NL", "_LBRACE_BODY") and not (stack and stack[-1] != "body"):
                in_def = tok.type == "DEF" or (in_def and bool(stack))
            if tok.type == "LBRACE" and in_def and last == "RPAR" and not stack:
                tok = Token.new_borrow_pos("_LBRACE_BODY", tok.value, tok)
                stack.append("body")
            elif tok.type in _OPEN:
                stack.append(tok.type)
                if len(stack) > MAX_DEPTH:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB", "RBRACE") and stack:
                stack.pop()
            yield tok
            last = tok.type
            prev = tok
        if last not in (None, "_NL"):
            end = prev
            yield Token("_NL", "", start_pos=end.end_pos, line=end.end_line, column=end.end_column,
                        end_line=end.end_line, end_column=end.end_column, end_pos=end.end_pos)


def _grammar_text() -> str:
    return resources.files("karmixlang.syntax").joinpath("grammar.lark").read_text(encoding="utf-8")


def _cache_path(text: str) -> str | None:
    """A per-user cache file keyed by the grammar and lark version (never a shared /tmp name)."""
    import lark

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256((text + lark.__version__).encode()).hexdigest()[:16]
    folder = Path(base) / "karmixlang"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder / f"grammar-{digest}.lark-cache")


def build_lark(strict: bool = False, cache: bool = True) -> Lark:
    text = _grammar_text()
    return Lark(text, parser="lalr", lexer="basic", postlex=_Newlines(), propagate_positions=True,
                maybe_placeholders=True, strict=strict,
                cache=_cache_path(text) if cache and not strict else False)


@lru_cache(maxsize=1)
def _lark() -> Lark:
    try:
        return build_lark()
    except Exception:  # an unreadable or stale cache file must never stop the compiler
        return build_lark(cache=False)


# ------------------------------------------------------------------ syntax errors

_SPELLING = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "$END": "end of file", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`",
    "LBRACE": "`{`", "RBRACE": "`}`", "_LBRACE_BODY": "`{`", "COMMA": "`,`", "EQUAL": "`=`",
    "COLON": "`:`", "DOT": "`.`", "PLUS": "`+`", "MINUS": "`-`", "STAR": "`*`", "SLASH": "`/`",
    "VBAR": "`|`",
}


def _spell(term: str) -> str:
    if term in _SPELLING:
        return _SPELLING[term]
    return f"`{term.lower()}`" if term.isalpha() else term


def _expected(names) -> str:
    spelled = sorted({_spell(n) for n in names if not n.startswith("__")})
    if len(spelled) > 6:
        spelled = spelled[:6] + ["..."]
    return ", ".join(spelled)


def _syntax_diag(exc: UnexpectedInput, file: str, text: str) -> Diagnostic:
    line, col = max(1, exc.line if exc.line not in (None, -1) else 1), max(1, exc.column or 1)
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        span = Span(file, line, col, line, col + 1)
        if ch == '"':
            return error("K0002", "unterminated string", span, label="string starts here",
                         help="strings are double-quoted and stay on one line")
        return error("K0001", f"unexpected character {ch!r}", span, label="not valid here")
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        if tok.type == "$END" or (tok.type == "_NL" and tok.value == ""):
            # Lines as lark counts them (only "\n" ends one; splitlines() would also split at
            # \r, \f, \x1c, ...): the end of the last line that has text.
            lines = text.rstrip("\r\n").split("\n")
            line, last = len(lines), len(lines[-1])
            span = Span(file, line, last + 1, line, last + 2)
            return error("K0001", "unexpected end of file", span,
                         help=f"expected {_expected(exc.expected)}")
        width = max(1, len(tok.value)) if tok.type != "_NL" else 1
        span = Span(file, tok.line, tok.column, tok.line, tok.column + width)
        what = "end of line" if tok.type == "_NL" else f"`{tok.value}`"
        help_ = f"expected {_expected(exc.expected)}"
        if tok.type == tok.value.upper() and "NAME" in exc.expected:
            help_ += f"; `{tok.value}` is a keyword and cannot be used as a name"
        return error("K0001", f"unexpected {what}", span, label="unexpected here", help=help_)
    span = Span(file, line, col, line, col + 1)
    return error("K0001", "unexpected end of file", span)


# ------------------------------------------------------------------ AST building

_INTERP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def _binop(op: str):
    """One reduction for each binary operator."""
    @v_args(meta=True)
    def build(self, meta, children):
        return ast.BinOp(op, children[0], children[1], self._span(meta))
    return build


class _Build(Transformer_NonRecursive):
    """Reductions -> AST nodes. Collects string and argument-order errors as it goes."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file
        self.errors: list[Diagnostic] = []

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.file, 1, 1, 1, 1)
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tspan(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    # -- literals
    @v_args(meta=True)
    def number(self, meta, children):
        tok = children[0]
        return ast.Number(float(tok), str(tok), self._tspan(tok))

    @v_args(meta=True)
    def neg_number(self, meta, children):
        num = self.number(meta, children)
        return ast.Neg(num, self._span(meta))

    @v_args(meta=True)
    def string(self, meta, children):
        return self._string(children[0])

    def _string(self, tok: Token) -> ast.String:
        raw = str(tok)[1:-1]
        line, col0 = tok.line, tok.column + 1  # column of raw[0]
        parts: list = []
        buf: list[str] = []
        i = 0
        while i < len(raw):
            ch = raw[i]
            if ch == "\\":
                nxt = raw[i + 1] if i + 1 < len(raw) else ""
                if nxt in ('"', "\\", "$"):
                    buf.append(nxt)
                else:
                    self.errors.append(error(
                        "K0002", f"unknown escape `\\{nxt}`",
                        Span(self.file, line, col0 + i, line, col0 + i + 2),
                        label="not a valid escape", help='the escapes are \\", \\\\ and \\$'))
                i += 2
                continue
            if ch == "$" and raw.startswith("${", i):
                close = raw.find("}", i)
                end = close + 1 if close >= 0 else len(raw)
                span = Span(self.file, line, col0 + i, line, col0 + end)
                inner = raw[i + 2:close] if close >= 0 else raw[i + 2:]
                if close < 0 or not _INTERP.fullmatch(inner):
                    self.errors.append(error(
                        "K0003", f"invalid interpolation `{raw[i:end]}`", span,
                        label="expected `${name}` or `${lib.name}`",
                        help="write `\\$` for a literal dollar sign"))
                else:
                    if buf:
                        parts.append("".join(buf))
                        buf = []
                    lib, _, name = inner.rpartition(".")
                    parts.append(ast.Interp(name, lib or None, span))
                i = end
                continue
            if ch == "\0":  # no path, key pattern or metadata value can hold one
                self.errors.append(error(
                    "K0002", "a string cannot contain a NUL character",
                    Span(self.file, line, col0 + i, line, col0 + i + 1), label="NUL here",
                    help="remove it; paths and key patterns cannot hold NUL"))
            buf.append(ch)
            i += 1
        if buf or not parts:
            parts.append("".join(buf))
        return ast.String(tuple(parts), self._tspan(tok))

    @v_args(meta=True)
    def true(self, meta, children):
        return ast.Bool(True, self._span(meta))

    @v_args(meta=True)
    def false(self, meta, children):
        return ast.Bool(False, self._span(meta))

    # -- expressions
    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(str(children[0]), self._tspan(children[0]))

    @v_args(meta=True)
    def member(self, meta, children):
        return ast.Member(str(children[0]), str(children[1]), self._span(meta))

    add, sub, mul, div, union = (_binop(o) for o in "+-*/|")

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        name_tok, args = children
        func = ast.Name(str(name_tok), self._tspan(name_tok))
        return self._call(func, args, meta)

    @v_args(meta=True)
    def member_call(self, meta, children):
        lib, name, args = children
        span = Span(self.file, lib.line, lib.column, name.end_line, name.end_column)
        return self._call(ast.Member(str(lib), str(name), span), args, meta)

    def _call(self, func, args, meta):
        positional, keywords = [], []
        for arg in args or ():
            if isinstance(arg, ast.KwArg):
                keywords.append(arg)
            elif keywords:
                self.errors.append(error(
                    "K0001", "positional argument after a keyword argument", arg.span,
                    label="positional argument", help="put positional arguments first"))
            else:
                positional.append(arg)
        return ast.Call(func, tuple(positional), tuple(keywords), self._span(meta))

    def args(self, children):
        return [c for c in children if c is not None]

    def arg(self, children):
        return children[0]

    def argname(self, children):
        return children[0]

    @v_args(meta=True)
    def kwarg(self, meta, children):
        return ast.KwArg(str(children[0]), children[1], self._span(meta))

    option = kwarg

    def options(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def cluster(self, meta, children):
        items = children[0] or []
        return ast.ClusterLit(tuple(items), self._span(meta))

    def items(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def item(self, meta, children):
        return ast.ClusterItem(children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def map(self, meta, children):
        return ast.MapLit(tuple(children[0] or ()), self._span(meta))

    def pairs(self, children):
        return [c for c in children if c is not None]

    @v_args(meta=True)
    def pair(self, meta, children):
        return ast.MapPair(self._string(children[0]), children[1], self._span(meta))

    # -- statements
    def _decl_span(self, meta, tok):
        return self._tspan(tok), self._span(meta)

    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ast.ModelDecl(str(c[0]), self._string(c[1]), False, *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def base_decl(self, meta, c):
        return ast.ModelDecl(str(c[0]), self._string(c[1]), True, *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def lora_decl(self, meta, c):
        return ast.LoraDecl(str(c[0]), self._string(c[1]), *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def cluster_decl(self, meta, c):
        return ast.ClusterDecl(str(c[0]), c[1], *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def let_decl(self, meta, c):
        return ast.Let(str(c[0]), c[1], *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def param_decl(self, meta, c):
        return ast.Param(str(c[0]), c[1], *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def import_decl(self, meta, c):
        return ast.Import(self._string(c[0]), str(c[1]), self._tspan(c[1]), self._span(meta))

    @v_args(meta=True)
    def save_decl(self, meta, c):
        return ast.Save(self._string(c[0]), c[1], c[2] or (), self._span(meta))

    def def_params(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def def_param(self, meta, c):
        return ast.DefParam(str(c[0]), c[1], self._span(meta))

    def def_body(self, children):
        return tuple(children[:-1]), children[-1]

    @v_args(meta=True)
    def def_expr(self, meta, c):
        return ast.Def(str(c[0]), c[1] or (), (), c[2], False, *self._decl_span(meta, c[0]))

    @v_args(meta=True)
    def def_block(self, meta, c):
        lets, body = c[2]
        return ast.Def(str(c[0]), c[1] or (), lets, body, True, *self._decl_span(meta, c[0]))

    def start(self, children):
        return tuple(c for c in children if c is not None and not isinstance(c, Token))


def _depth_diag(stmts, file: str) -> Diagnostic | None:
    """Iteratively measure expression depth so later recursive passes stay within limits."""
    for stmt in stmts:
        roots = [getattr(stmt, "expr", None), getattr(stmt, "body", None)]
        roots += [let.expr for let in getattr(stmt, "lets", ())]
        roots += [o.value for o in getattr(stmt, "options", ())]
        stack = [(r, 1) for r in roots if r is not None]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DEPTH:
                return error("K0004", f"expression nested more than {MAX_DEPTH} levels deep",
                             node.span, label="too deep here",
                             help="split the expression with `let` names")
            stack.extend((c, depth + 1) for c in ast.children(node))
    return None


def _comments(text: str, file: str, tokens_lines: set[int]) -> tuple[ast.Comment, ...]:
    out = []
    line, line_start = 1, 0  # advanced incrementally: a big recipe stays linear
    pos = text.find("#")
    while pos >= 0:
        if _inside_string(text, pos):  # `"a#b" # real comment`: look again after this `#`
            pos = text.find("#", pos + 1)
            continue
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        line += text.count("\n", line_start, pos)
        line_start = text.rfind("\n", 0, pos) + 1
        out.append(ast.Comment(text[pos:end].rstrip(), line, pos - line_start + 1,
                               line not in tokens_lines))
        pos = text.find("#", end)
    return tuple(out)


def _inside_string(text: str, pos: int) -> bool:
    """Whether `pos` is inside a string literal on its line (a `#` there is not a comment)."""
    line_start = text.rfind("\n", 0, pos) + 1
    in_str, i = False, line_start
    while i < pos:
        ch = text[i]
        if in_str and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_str = not in_str
        elif ch == "#" and not in_str:
            return True  # an earlier `#` already started a comment
        i += 1
    return in_str


def parse(text: str, file: str = "<recipe>") -> tuple[ast.Module | None, list[Diagnostic]]:
    """Parse recipe text. Returns (module, diagnostics); module is None on a syntax error."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        return None, [error("K0004", f"recipe larger than {MAX_SOURCE_BYTES // 2**20} MiB",
                            Span(file, 1, 1, 1, 2))]
    if text.startswith("\ufeff"):
        text = text[1:]
    build = _Build(file)
    lark = _lark()
    try:
        tokens_lines: set[int] = set()
        tree = lark.parse(text)
        stmts = build.transform(tree)
    except UnexpectedInput as exc:
        return None, [_syntax_diag(exc, file, text)]
    except _TooDeep as exc:
        tok = exc.tok
        return None, [error("K0004", f"brackets nested more than {MAX_DEPTH} levels deep",
                            Span(file, tok.line, tok.column, tok.line, tok.column + 1),
                            label="too deep here", help="split the expression with `let` names")]
    except RecursionError:
        return None, [error("K0004", "recipe nested too deeply", Span(file, 1, 1, 1, 2))]
    if build.errors:
        return None, build.errors
    too_deep = _depth_diag(stmts, file)
    if too_deep:
        return None, [too_deep]
    tokens_lines = _code_lines(lark, text)
    return ast.Module(file, stmts, _comments(text, file, tokens_lines)), []


def _code_lines(lark: Lark, text: str) -> set[int]:
    lines = set()
    for tok in lark.lex(text, dont_ignore=False):
        if tok.type != "_NL":
            lines.update(range(tok.line, (tok.end_line or tok.line) + 1))
    return lines


def read_source(path: str) -> tuple[bytes | None, Diagnostic | None]:
    """A recipe's bytes, at most MAX_SOURCE_BYTES + 1 of them, or the reason it cannot be read.
    Only regular files are read: the file is opened without blocking (a FIFO would wait for a
    writer) and checked before reading (a device or a FIFO never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        return None, error("K0110", f"cannot read `{path}`: {exc.strerror or exc}")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return None, error("K0006", f"`{path}` is {_file_kind(mode)}, not a regular file",
                               help="give the path of a `.kmx` file")
        chunks, left = [], MAX_SOURCE_BYTES + 1
        while left and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), None
    except OSError as exc:
        return None, error("K0110", f"cannot read `{path}`: {exc.strerror or exc}")
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def parse_file(path: str, data: bytes | None = None
               ) -> tuple[ast.Module | None, str | None, list[Diagnostic]]:
    """Read and parse a file; returns (module, text, diagnostics). `data`: the file's bytes
    given instead of read (another version of it, as `kmx diff REV:path` reads from git)."""
    if data is None:
        data, problem = read_source(path)
        if problem is not None:
            return None, None, [problem]
    if len(data) > MAX_SOURCE_BYTES:  # before decoding: the cut may split a character
        return None, None, [error("K0004", f"recipe larger than {MAX_SOURCE_BYTES // 2**20} MiB",
                                  Span(path, 1, 1, 1, 2))]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[start:exc.start].decode("utf-8", "replace")) + 1
        return None, None, [error("K0005", f"`{path}` is not UTF-8 text (byte {exc.start})",
                                  Span(path, line, col, line, col + 1),
                                  label="not UTF-8", help="save the recipe as UTF-8")]
    module, diags = parse(text, path)
    return module, text, diags
