"""Everything kmx prints, in one place (as dbt's task/printer.py): the two consoles — results
on stdout, diagnostics, progress and status on stderr — and one function per kind of line.
The rest of kmx returns data; the command line (cli.py) and the demo pass it here.

User text is printed with markup off (`markup=False` or `rich.text.Text`): recipe text is full
of `[...]`, which rich would take for markup. Colour follows rich's terminal detection and
`NO_COLOR`.
"""

from __future__ import annotations

import difflib
import json
import os
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text

from karmixlang.diagnostics import Diagnostic, render_json, render_text
from karmixlang.units import human_bytes

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ diagnostics and status

def diagnostics(diags: list[Diagnostic], sources: dict[str, str], fmt: str = "text") -> None:
    if fmt == "json":
        out.print(render_json(diags), markup=False)
        return
    for d in diags:
        head, _, rest = render_text(d, sources).partition("\n")
        err.print(Text(head, style="bold red" if d.is_error else "bold yellow"))
        if rest:
            err.print(Text(rest))
    n_err = sum(d.is_error for d in diags)
    n_warn = len(diags) - n_err
    if n_err:
        err.print(Text(f"{n_err} error{'s' if n_err != 1 else ''}"
                       + (f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else ""),
                       style="bold red"))


def checked(path: str, warnings: int) -> None:
    err.print(Text(f"{path}: ok" + (f" ({warnings} warning(s))" if warnings else ""),
                   style="green"))


def usage_error(message: str) -> None:
    err.print(Text(f"kmx: error: {message}", style="bold red"))


def internal_error(exc: Exception) -> None:
    err.print(Text(f"kmx: internal error: {type(exc).__name__}: {exc}\nThis is a bug in kmx; "
                   "please report it with the recipe (KMX_DEBUG=1 shows the traceback).",
                   style="bold red"))


def interrupted() -> None:
    err.print(Text("interrupted", style="bold red"))


def status(message: str) -> None:
    """A line about what was done (wrote a template, reformatted a file)."""
    err.print(Text(message))


# ------------------------------------------------------------------ plans and runs

def plan(p, form: str = "text") -> None:
    """A plan.report.Plan as text, JSON or DOT (imported here only: `kmx check` and `--help`
    stay quick)."""
    from karmixlang.plan.report import render_dot, render_text as plan_text

    if form == "json":
        out.print(p.to_json(), markup=False)
    elif form == "dot":
        out.print(render_dot(p), markup=False, end="")
    else:
        out.print(plan_text(p), markup=False)


def run_starting(p) -> None:
    from karmixlang.plan.report import summary_line

    err.print(Text(summary_line(p, running=True)))


def run_finished(result, inputs: bool = True) -> None:
    """What a run did (runtime.executor.RunResult); `inputs`: the inputs' hashes too."""
    if result.nothing_to_do:
        err.print(Text("Nothing to do: every output is complete and matches the plan.",
                       style="green"))
        return
    for path in result.outputs:
        out.print(Text(f"wrote {path}"))
    for path, h in result.hashes.items():
        err.print(Text(f"  {_shown_path(path)}: {hash_line(h)}"))
    for path, h in result.input_hashes.items() if inputs else ():
        err.print(Text(f"  input {_shown_path(path)}: {hash_line(h)}"))
    if result.fallbacks:
        shown = "; ".join(result.fallbacks[:5])
        more = f"; and {len(result.fallbacks) - 5} more" if len(result.fallbacks) > 5 else ""
        err.print(Text(f"{len(result.fallbacks)} key(s) with non-finite values were copied from "
                       f"the fallback (--nonfinite=fallback): {shown}{more}", style="yellow"))
    resumed = f" ({result.skipped} finished earlier)" if result.skipped else ""
    if result.reused:
        resumed += f" ({result.reused:,} reused unchanged from the output replaced)"
    err.print(Text(f"Done: {result.keys:,} keys{resumed} in {result.seconds:.1f} s · read "
                   f"{human_bytes(result.bytes_read)} · wrote {human_bytes(result.bytes_written)}"
                   f" · peak memory {human_bytes(result.peak_rss_delta)} (resident growth)",
                   style="green"))


# ------------------------------------------------------------------ kmx diff

def recipe_diff(d, as_json: bool = False) -> None:
    """`kmx diff`: a plan.diff.RecipeDiff, as text or as JSON (docs/cli.md)."""
    if as_json:
        out.print(json.dumps(d.to_dict(), indent=2, ensure_ascii=False), markup=False)
        return
    for s in d.saves:
        _save_diff(s)
    if d.inputs_added or d.inputs_removed:
        shown = [f"+ {p}" for p in d.inputs_added] + [f"- {p}" for p in d.inputs_removed]
        out.print(Text("inputs: " + "; ".join(shown)))
    if not d.changed:
        out.print(Text("no output changes", style="green"))


def _save_diff(s) -> None:
    if s.status == "unchanged":
        out.print(Text(f"{s.written}: no change", style="dim"))
        return
    if s.status in ("added", "removed"):
        what = "new save" if s.status == "added" else "no longer saved"
        out.print(Text(f"{s.written}: {what} ({s.keys:,} keys)", style="bold"))
        return
    out.print(Text(f"{s.written}: {s.changed_keys:,} of {s.keys:,} keys change", style="bold"))
    for g in s.groups:
        texts = [c.text() for c in g.changes]
        more = f"; and {len(texts) - 4} more" if len(texts) > 4 else ""
        lines = sorted({c.line for c in g.changes if c.line})
        at = f"  ({', '.join(lines)})" if lines else ""
        out.print(Text(f"  {_keys(len(g.keys))} in {g.where}: {'; '.join(texts[:4])}{more}{at}"))
    for label, keys in (("added", s.added_keys), ("removed", s.removed_keys)):
        if keys:
            shown = ", ".join(keys[:3]) + (f", and {len(keys) - 3} more" if len(keys) > 3 else "")
            out.print(Text(f"  {_keys(len(keys))} {label}: {shown}"))


def _keys(n: int) -> str:
    return f"{n:,} key{'s' if n != 1 else ''}"


# ------------------------------------------------------------------ the other commands

def format_diff(path: str, text: str, formatted: str) -> None:
    out.print("".join(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                           path, path)), markup=False, end="")


def formatter_refused(path: str, exc: Exception) -> None:
    err.print(Text(f"error: cannot format {path}: {exc} (internal error; please report)",
                   style="bold red"))


def page(text: str) -> None:
    out.print(text, markup=False)


def methods(builtins) -> None:
    group = None
    for b in builtins:
        if b.group != group:
            group = b.group
            out.print(Text(f"\n{group}", style="bold"))
        out.print(Text(f"  {b.signature():<58} {b.summary}"))


def _shown_path(path: str) -> str:
    """Relative to the current folder when inside it, else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def hash_line(h) -> str:
    """An io.hashes.FileHashes as A1111 and Civitai show it."""
    return f"SHA-256 {h.sha256} · AutoV2 {h.autov2} · AutoV3 {h.autov3}"


def checkpoint(h, as_json: bool, hashes: dict | None = None) -> None:
    """`kmx inspect`: an io.header.CheckpointHeader, and its files' io.hashes.FileHashes."""
    if as_json:
        data = {"path": h.path, "metadata": h.metadata, "tensors": {
            k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in h.tensors.items()}}
        if hashes is not None:
            data["hashes"] = {f: {"sha256": x.sha256, "autov2": x.autov2, "autov3": x.autov3,
                                  "data_sha256": x.data_sha256} for f, x in hashes.items()}
        out.print(json.dumps(data, indent=2), markup=False)
        return
    for k, t in h.tensors.items():
        out.print(Text(f"{k}  {t.dtype} {list(t.shape)}"))
    meta_keys = ", ".join(sorted(h.metadata)) or "none"
    out.print(Text(f"\n{len(h.tensors)} tensors · {human_bytes(h.total_bytes)} · "
                   f"{len(h.files)} file(s) · metadata: {meta_keys}"))
    for f, x in (hashes or {}).items():
        out.print(Text(f"{os.path.basename(f)}: {hash_line(x)}"))


def converted(result) -> None:
    """`kmx convert`: a runtime.convert.Converted."""
    out.print(Text(f"wrote {result.path}"))
    inside = f" (the state dict under `{'.'.join(result.unwrapped)}`)" if result.unwrapped else ""
    err.print(Text(f"{result.tensors:,} tensors{inside} · {human_bytes(result.nbytes)}",
                   style="green"))
    if result.skipped:
        shown = ", ".join(map(str, result.skipped[:10]))
        more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        err.print(Text(f"skipped {len(result.skipped)} value(s) that are not tensors: "
                       f"{shown}{more}"))


def heading(text: str, to_err: bool = False) -> None:
    (err if to_err else out).print(Text(text, style="bold"))


def line(text: str, style: str = "") -> None:
    out.print(Text(text, style=style))


# ------------------------------------------------------------------ progress of a run

def progress():
    """The progress display of a run: a bar on a terminal, a few plain lines otherwise (logs
    and CI stay readable)."""
    return BarProgress(err) if err.is_terminal else LineProgress(err)


class BarProgress:
    """Bytes drive the bar, the rate and the ETA (they track the work better than key counts:
    keys range from a few bytes to hundreds of MB); the key count is shown beside them."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("merging"), BarColumn(),
                                 TextColumn("{task.fields[keys]:,}/{task.fields[total_keys]:,} keys"),
                                 DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.task = None
        self.keys = 0

    def start(self, keys: int, done: int, total_bytes: int, done_bytes: int) -> None:
        self.keys = done
        self.progress.start()
        self.task = self.progress.add_task("merge", total=max(1, total_bytes),
                                           completed=done_bytes, keys=done, total_keys=keys)

    def advance(self, keys: int, nbytes: int) -> None:
        self.keys += keys
        self.progress.update(self.task, advance=nbytes, keys=self.keys)

    def finish(self) -> None:
        self.progress.stop()


class LineProgress:
    """One line at each tenth of the keys."""

    def __init__(self, console: Console):
        self.console = console
        self.total = self.done = self.next_report = 0
        self.t0 = 0.0

    def start(self, keys: int, done: int, total_bytes: int, done_bytes: int) -> None:
        self.total, self.done, self.t0 = keys, done, time.monotonic()
        self.next_report = done + max(1, keys // 10)
        if done:
            self.console.print(Text(f"resuming: {done:,} of {keys:,} keys already written"))

    def advance(self, keys: int, nbytes: int) -> None:
        self.done += keys
        if self.done >= self.next_report or self.done == self.total:
            self.next_report = self.done + max(1, self.total // 10)
            rate = self.done / max(1e-9, time.monotonic() - self.t0)
            self.console.print(Text(f"{self.done:,}/{self.total:,} keys ({rate:,.0f} keys/s)"))

    def finish(self) -> None:
        pass
