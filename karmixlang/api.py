"""The Python API: the same pipeline the CLI runs, without printing.

    check(path)            -> Checked (program, diagnostics, sources to show them with)
    compile(path)          -> Compiled (graph, schedule, plan), reading headers only
    compile_sweep(path, overrides, sweeps) -> one Compiled for every point of a grid
    run(path, ...)         -> RunResult (imports torch); execute(compiled, ...) the same for a
                              compiled recipe
    format(text)           -> canonical text
    format_file(path)      -> Formatted (the text as read and as formatted); write_formatted
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from karmixlang.check.checker import check_program
from karmixlang.check.program import Program
from karmixlang.diagnostics import Diagnostic, KmxError, error
from karmixlang.plan.compile import Compiled, compile
from karmixlang.plan.sweep import compile_sweep

__all__ = ["Checked", "Compiled", "Formatted", "LockResult", "check", "check_ray_address",
           "compile", "compile_sweep", "execute", "format", "format_file", "run", "sources_for",
           "verify", "write_formatted", "write_lock"]


@dataclass
class Checked:
    program: Program | None  # None when there are errors
    diagnostics: list[Diagnostic]
    sources: dict[str, str] = field(default_factory=dict)  # file -> text, for rendering


def check(path: str, overrides: dict[str, str] | None = None) -> Checked:
    program, diags = check_program(path, overrides)
    return Checked(program, diags, sources_for(diags, program.sources if program else {}))


def sources_for(diags: list[Diagnostic], known: dict[str, str] | None = None) -> dict[str, str]:
    """The text of every file the diagnostics point into, read as recipes are (regular files,
    bounded, UTF-8): what rendering them with their source lines needs."""
    sources = dict(known or {})
    for d in diags:
        for span in [d.span] + [n.span for n in d.notes]:
            if span is not None and span.file not in sources:
                text = _recipe_text(span.file)
                if text is not None:
                    sources[span.file] = text
    return sources


def _recipe_text(path: str) -> str | None:
    """A recipe's text, or None: not a regular file, too large, not UTF-8."""
    from karmixlang.syntax.parser import MAX_SOURCE_BYTES, read_source

    data, problem = read_source(path)
    if problem is not None or len(data) > MAX_SOURCE_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def run(path: str, overrides: dict[str, str] | None = None, strict: bool = False,
        lock: bool = True, **options):
    """Compile and run a recipe; `options` are those of runtime.executor.RunOptions
    (threads, device, compute_dtype, memory_limit, resume, force, nonfinite, executor,
    address). The options that shape the plan (and `strict`, `lock`) are compiled in."""
    from karmixlang.machine import default_threads
    from karmixlang.runtime.executor import RunOptions

    opts = RunOptions(**options)
    compiled = compile(path, overrides, threads=opts.threads or default_threads(),
                       compute_dtype=opts.compute_dtype or "fp32", strict=strict,
                       memory_limit=opts.memory_limit, executor=opts.executor, lock=lock)
    return execute(compiled, progress=None, **options)


def execute(compiled: Compiled, progress=None, **options):
    """Run what was compiled, exactly as planned (loads torch); `options` as for `run`."""
    from karmixlang.runtime.executor import RunOptions, execute as run_compiled

    return run_compiled(compiled, RunOptions(**options), progress)


class VersionError(Exception):
    """A version of a recipe that does not compile: its diagnostics, and the texts they point
    into (which may not be the files on disk)."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str]):
        super().__init__(diagnostics)
        self.diagnostics, self.sources = diagnostics, sources


def compile_version(name: str, path: str, given: str | None,
                    overrides: dict[str, str] | None = None) -> Compiled | None:
    """One side of `kmx diff`, compiled header-only: the recipe file `name`, `REV:path` read
    through git, or (the git driver) the file `given` read as if it were at `path`; None when
    that side has no file (git's /dev/null: the recipe is new, or deleted). A lock beside
    the recipe is ignored: nothing runs."""
    from karmixlang.io.gitshow import is_revision, read_revision
    from karmixlang.syntax.parser import read_source

    if given == os.devnull:
        return None
    source = None
    try:
        if given is not None:
            source, problem = read_source(given)
            if problem is not None:
                raise KmxError([problem])
            path = os.path.abspath(path)
        elif is_revision(name):
            path, source = read_revision(name)
        return compile(path, overrides, source=source, lock=False)
    except KmxError as exc:
        known = {path: source.decode("utf-8", "replace")} if source is not None else {}
        raise VersionError(exc.diagnostics, sources_for(exc.diagnostics, known)) from None


@dataclass
class LockResult:
    path: str
    status: str  # "written", "updated" or "up to date"
    inputs: int


def write_lock(path: str, overrides: dict[str, str] | None = None,
               update: bool = False) -> LockResult:
    """Write `path`.lock: every input the recipe reads, hashed in full (through the cache).
    A lock that exists and differs is rewritten only with `update`; otherwise K0513 says
    what differs and nothing is written."""
    from karmixlang.io.files import atomic_write
    from karmixlang.io.hashes import file_hashes
    from karmixlang.plan.lock import build_lock, differences, lock_path, read_lock, render

    compiled = compile(path, overrides, lock=False)
    files = sorted({f for h in compiled.schedule.headers.values() for f in h.files})
    entries = build_lock(compiled, path, file_hashes(files))
    target = lock_path(path)
    old = read_lock(target) if not update else None
    text = render(entries)
    existed = os.path.exists(target)
    if existed:
        try:
            with open(target, encoding="utf-8") as f:
                if f.read() == text:
                    return LockResult(target, "up to date", len(entries))
        except (OSError, UnicodeDecodeError):
            pass
    if old is not None and not update:
        lines = differences(old, entries) or ["its layout or kmx version differs"]
        raise KmxError([error("K0513", f"`{target}` differs from the inputs now: "
                              + "; ".join(lines),
                              help="if the change is deliberate, run `kmx lock --update "
                                   f"{path}`; nothing was written")])
    try:
        atomic_write(target, text.encode())
    except OSError as e:
        raise KmxError([error("K0402", f"cannot write `{target}`: {e.strerror or e}")])
    return LockResult(target, "updated" if existed else "written", len(entries))


def verify(path: str, overrides: dict[str, str] | None = None, hashes_only: bool = False,
           threads: int = 0):
    """Check that a kmx output is exactly what its embedded recipe makes (loads torch unless
    `hashes_only`); see runtime/verify.py. Raises KmxError (K0514-K0516)."""
    from karmixlang.runtime.verify import verify as verify_output

    return verify_output(path, overrides, hashes_only, threads)


def check_ray_address(address: str | None) -> None:
    """K0407 for a `--address` that cannot name a Ray cluster, before anything is read."""
    from karmixlang.runtime.ray.executor import check_address

    check_address(address)


def format(text: str, file: str = "<recipe>") -> str:
    """The canonical layout of recipe text. Raises KmxError on a syntax error."""
    from karmixlang.syntax.fmt import format_source

    out, diags = format_source(text, file)
    if out is None:
        raise KmxError(diags)
    return out


@dataclass
class Formatted:
    path: str
    text: str  # as read
    formatted: str | None  # None: the text does not parse (diagnostics)
    diagnostics: list[Diagnostic]

    @property
    def changed(self) -> bool:
        return self.formatted is not None and self.formatted != self.text


def format_file(path: str) -> Formatted:
    """A recipe file formatted (not written). Raises KmxError when it cannot be read as a
    recipe, and syntax.fmt.FormatterError when the formatter refuses its own output."""
    from karmixlang.syntax.fmt import format_source
    from karmixlang.syntax.parser import parse_file

    text = _recipe_text(path)
    if text is None:  # parse_file says why: not a regular file, too large, not UTF-8
        raise KmxError(parse_file(path)[2])
    formatted, diags = format_source(text, path)
    return Formatted(path, text, formatted, diags)


def write_formatted(result: Formatted) -> None:
    """Replace the file with its formatted text, keeping its mode: through a new temporary
    file in the same folder, so nothing planted at a known name is followed."""
    from karmixlang.io.files import atomic_write

    atomic_write(result.path, result.formatted.encode(),
                 stat.S_IMODE(os.stat(result.path).st_mode))
