"""Diagnostics: every user-facing problem is one of these, with a code, a place and a help line.

Passes return lists of `Diagnostic`; only the CLI renders them (text through rich, or JSON).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable

# code -> one-line title. docs/errors/<code>.md explains each one (a test checks both agree).
CODES: dict[str, str] = {
    # K00xx: text and syntax
    "K0001": "syntax error",
    "K0002": "invalid string",
    "K0003": "invalid interpolation",
    "K0004": "recipe too large or too deeply nested",
    "K0005": "file cannot be read as UTF-8 text",
    "K0006": "recipe is not a regular file",
    # K01xx: names, imports, calls
    "K0101": "duplicate definition",
    "K0102": "unknown name",
    "K0103": "unknown function",
    "K0104": "unknown keyword argument",
    "K0105": "missing required argument",
    "K0106": "too many positional arguments",
    "K0107": "argument given twice",
    "K0108": "cycle among definitions",
    "K0109": "import cycle",
    "K0110": "import not found",
    "K0111": "name shadows a builtin function",
    "K0112": "unused definition",
    "K0113": "save in an imported file",
    "K0114": "not callable",
    "K0115": "unknown member",
    "K0116": "unknown re-basin spec",
    "K0117": "unknown permutation group",
    # K02xx: types and values
    "K0201": "coefficients of models do not sum to 1 or 0",
    "K0202": "wrong type",
    "K0203": "saving a delta without `delta=true`",
    "K0204": "value out of range",
    "K0205": "DELLA parameters divide by zero",
    "K0206": "weight must be positive",
    "K0207": "empty cluster",
    "K0208": "invalid save option",
    "K0209": "invalid block weights",
    "K0210": "extrapolating interpolation",
    "K0211": "invalid --set override",
    "K0212": "two saves write the same path",
    "K0213": "base choice cannot matter",
    "K0214": "invalid rename pattern",
    "K0215": "invalid rename replacement",
    "K0217": "LoRA extraction of a Model",
    "K0218": "invalid LoRA extraction option",
    "K0219": "option that does not apply to a save into a folder",
    "K0220": "empty layer range",
    "K0221": "stack part is not a layer slice",
    "K0222": "slices of different lengths combined",
    "K0223": "invalid re-basin spec",
    "K0224": "weight matching of a computed model",
    # K03xx: checkpoints and planning
    "K0301": "input file not found",
    "K0302": "not a valid safetensors file",
    "K0303": "shape mismatch without a fallback",
    "K0304": "key missing without a fallback",
    "K0305": "output path is an input",
    "K0306": "output already exists",
    "K0307": "glob matched no files",
    "K0308": "pickle checkpoints are refused",
    "K0309": "invalid sharded index",
    "K0310": "non-float key without a fallback",
    "K0311": "output path is not a regular file",
    "K0312": "inputs of different architectures",
    "K0313": "key cannot be read in the canonical naming",
    "K0314": "rename maps two keys onto one",
    "K0315": "input cannot be read in the reference naming",
    "K0316": "input read under two namings",
    "K0320": "not a LoRA file",
    "K0321": "unreadable LoRA module",
    "K0322": "LoRA module matches no key",
    "K0323": "LoRA module does not fit its key",
    "K0324": "DoRA without one base",
    "K0325": "LoRA combined with no checkpoint",
    "K0330": "pickle names code kmx does not run",
    "K0331": "not a readable PyTorch checkpoint",
    "K0332": "no state dict in the checkpoint",
    "K0333": "SOURCE_DATE_EPOCH is not a date",
    "K0334": "--no-provenance cannot keep a path out",
    "K0340": "a folder save's config source is not a Hugging Face folder",
    "K0341": "a folder save has no model to take its config from",
    "K0342": "a folder save's path is not a folder",
    "K0343": "the folder to replace holds files kmx does not write",
    "K0345": "input has no readable vocabulary",
    "K0346": "vocabulary does not fit the embedding",
    "K0347": "union vocabulary without tokenizer.json",
    "K0348": "input read in two vocabularies",
    "K0349": "invalid tokenizer option",
    "K0350": "layer range beyond the model's layers",
    "K0351": "layer slice of a model without layers",
    "K0352": "layers under two containers",
    "K0353": "layer missing in a slice",
    "K0360": "re-basin spec names a key the model lacks",
    "K0361": "re-basin spec axis out of range",
    "K0362": "axes of one permutation differ in size",
    "K0363": "permutation blocks do not divide its size",
    "K0364": "spec=\"auto\" needs a chain of linear layers",
    "K0365": "a permuted key has another shape",
    # K04xx: running
    "K0401": "non-finite values in an input",
    "K0402": "cannot write the output",
    "K0403": "run interrupted",
    "K0404": "cannot resume",
    "K0405": "strict mode: key would be copied from the fallback",
    "K0406": "device not available",
    "K0407": "the Ray executor cannot run",
    "K0408": "key too large for the memory limit",
    "K0409": "another run is writing the output",
    "K0410": "an input changed during the run",
    "K0411": "non-finite values in a result",
    "K0412": "a result overflows its output dtype",
    "K0413": "weight matching met non-finite costs",
    "K0501": "cannot read a recipe version through git",
    # K0510-K0519: lock, verify, sweep
    "K0510": "an input and the lock file disagree on what is read",
    "K0511": "an input differs from the lock file",
    "K0512": "unreadable lock file",
    "K0513": "the lock file is out of date",
    "K0514": "an input differs from what the output records",
    "K0515": "the output differs from what its recipe makes",
    "K0516": "not a kmx output",
    "K0517": "two points of a sweep write one file",
    "K0518": "a swept name is not a param of the recipe",
    "K0519": "a param swept twice, or also given with --set",
    # K0520-K0522: Hugging Face model folders
    "K0520": "cannot publish a model folder",
}


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; end_col is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Label:
    span: Span
    message: str = ""


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    label: str = ""
    severity: Severity = Severity.ERROR
    help: str | None = None
    notes: tuple[Label, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unregistered diagnostic code {self.code}")

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def to_json(self) -> dict:
        def span_json(s: Span | None):
            if s is None:
                return None
            return {"file": s.file, "line": s.line, "col": s.col,
                    "end_line": s.end_line, "end_col": s.end_col}

        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "span": span_json(self.span),
            "label": self.label,
            "help": self.help,
            "notes": [{"span": span_json(n.span), "message": n.message} for n in self.notes],
        }


class KmxError(Exception):
    """Raised to abort a pass with diagnostics (the CLI renders them, never a traceback)."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("; ".join(f"{d.code}: {d.message}" for d in self.diagnostics))

    def __reduce__(self):
        # Rebuilt from the diagnostics, not from the joined message in `args`: a Ray worker's
        # error must reach the driver with its codes (runtime/ray/executor.py).
        return KmxError, (self.diagnostics,)


@contextmanager
def located(span: Span | None, label: str = ""):
    """Diagnostics raised inside without a place of their own get `span`: an error found while
    running points at the recipe line responsible (the input it reads, the save it writes)."""
    try:
        yield
    except KmxError as exc:
        if span is None or all(d.span for d in exc.diagnostics):
            raise
        raise KmxError([d if d.span else replace(d, span=span, label=d.label or label)
                        for d in exc.diagnostics]) from None


def error(code: str, message: str, span: Span | None = None, **kw) -> Diagnostic:
    return Diagnostic(code, message, span, severity=Severity.ERROR, **kw)


def warning(code: str, message: str, span: Span | None = None, **kw) -> Diagnostic:
    return Diagnostic(code, message, span, severity=Severity.WARNING, **kw)


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.is_error for d in diags)


# ---------------------------------------------------------------- did you mean

def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: a swap of two neighbours (`dtpye`) costs 1."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate within a small edit distance (starlark's rule: about a third)."""
    best, best_d = None, None
    for c in sorted(set(candidates)):
        d = edit_distance(name.lower(), c.lower())
        if d <= max(1, len(name) // 3) and (best_d is None or d < best_d):
            best, best_d = c, d
    return best


# ---------------------------------------------------------------- rendering

def render_text(diag: Diagnostic, sources: dict[str, str]) -> str:
    """Plain text in the rustc style; the CLI colours it. `sources` maps file -> text."""
    out = [f"{diag.severity.value}[{diag.code}]: {diag.message}"]
    spans = [diag.span] if diag.span else []
    spans += [n.span for n in diag.notes]
    pad = " " * max([len(str(s.line)) for s in spans] or [1])
    if diag.span is not None:
        out.extend(_snippet(diag.span, diag.label, sources, "-->", pad))
    for note in diag.notes:
        out.extend(_snippet(note.span, note.message, sources, ":::", pad))
    if diag.help:
        out.append(f"{pad} |")
        out.append(f"{pad} = help: {diag.help}")
    return "\n".join(out)


_CONTROLS = {c: " " for c in [*range(32), 127]}


def _snippet(span: Span, label: str, sources: dict[str, str], arrow: str, pad: str) -> list[str]:
    lines = [f"{pad}{arrow} {span}"]
    text = sources.get(span.file)
    if text is None:
        if label:
            lines.append(f"  = {label}")
        return lines
    src_lines = text.split("\n")  # as the lexer counts lines: not at \r, \f, \x1c, ...
    if not 1 <= span.line <= len(src_lines):
        return lines
    src = src_lines[span.line - 1].rstrip("\r").translate(_CONTROLS)  # one column each
    end = span.end_col if span.end_line == span.line else len(src) + 1
    width = max(1, end - span.col)
    lines.append(f"{pad} |")
    lines.append(f"{span.line:>{len(pad)}} | {src[:400]}")
    caret = " " * (span.col - 1) + "^" * width
    lines.append(f"{pad} | {caret}{(' ' + label) if label else ''}")
    return lines


def render_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps({"diagnostics": [d.to_json() for d in diags]}, indent=2)
