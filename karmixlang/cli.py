"""The `kmx` command line. The only module that prints.

Exit codes: 0 success (warnings allowed), 1 errors in the recipe or its inputs (an interrupted
run, K0403, included), 2 usage errors, 3 an internal error (a bug: one line, no traceback),
123 the formatter refused its own output (as black), 130 interrupted outside a run (from
the first moment: see __main__.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import sys

from rich.console import Console
from rich.text import Text

from karmixlang import __version__
from karmixlang.diagnostics import Diagnostic, KmxError, render_json, render_text

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ printing helpers

def print_diagnostics(diags: list[Diagnostic], sources: dict[str, str], fmt: str = "text") -> None:
    if fmt == "json":
        out.print(render_json(diags), markup=False)
        return
    for d in diags:
        text = render_text(d, sources)
        head, _, rest = text.partition("\n")
        style = "bold red" if d.is_error else "bold yellow"
        line = Text(head, style=style)
        err.print(line)
        if rest:
            err.print(Text(rest))
    n_err = sum(d.is_error for d in diags)
    n_warn = len(diags) - n_err
    if n_err:
        err.print(Text(f"{n_err} error{'s' if n_err != 1 else ''}"
                       + (f", {n_warn} warning{'s' if n_warn != 1 else ''}" if n_warn else ""),
                       style="bold red"))


def _sources_for(diags: list[Diagnostic], known: dict[str, str]) -> dict[str, str]:
    sources = dict(known)
    for d in diags:
        for span in [d.span] + [n.span for n in d.notes]:
            if span is not None and span.file not in sources:
                text = _read_text(span.file)
                if text is not None:
                    sources[span.file] = text
    return sources


def _read_text(path: str) -> str | None:
    """A recipe's text for showing, or None: not a regular file, too large, not UTF-8."""
    from karmixlang.syntax.parser import MAX_SOURCE_BYTES, read_source

    data, problem = read_source(path)
    if problem is not None or len(data) > MAX_SOURCE_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_sets(values: list[str] | None) -> dict[str, str]:
    sets = {}
    for v in values or []:
        name, eq, value = v.partition("=")
        if not eq or not name:
            raise UsageError(f"--set expects NAME=VALUE, got {v!r}")
        sets[name.strip()] = value
    return sets


class UsageError(Exception):
    pass


def threads_arg(text: str) -> int:
    """--threads: 0 (one per core, at most 8) or a count of keys in flight."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (one per core) or a positive count, "
                                         f"not {text!r}")
    return n


# ------------------------------------------------------------------ commands

def cmd_check(args) -> int:
    from karmixlang.check.checker import check_program

    status = EXIT_OK
    all_diags = []
    for path in args.files:
        program, diags = check_program(path, parse_sets(args.set))
        sources = _sources_for(diags, program.sources if program else {})
        if args.format == "json":
            all_diags.extend(diags)
        else:
            print_diagnostics(diags, sources)
        if any(d.is_error for d in diags):
            status = EXIT_ERRORS
        elif args.format != "json":
            err.print(Text(f"{path}: ok" + (f" ({len(diags)} warning(s))" if diags else ""),
                           style="green"))
    if args.format == "json":
        print_diagnostics(all_diags, {}, "json")
    return status


def _memory_limit(args) -> int | None:
    from karmixlang.units import parse_size

    try:
        return parse_size(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        raise UsageError(f"--memory-limit: {exc}")


def _compile(args):
    from karmixlang.api import compile as compile_recipe
    from karmixlang.machine import default_threads

    return compile_recipe(args.file, parse_sets(args.set), threads=args.threads or
                          default_threads(), compute_dtype=args.compute_dtype,
                          strict=args.strict, memory_limit=_memory_limit(args),
                          executor=args.executor)


def cmd_plan(args) -> int:
    from karmixlang.plan.report import render_dot, render_text as plan_text

    compiled = _compile(args)
    print_warnings(compiled)
    if args.json:
        out.print(compiled.plan.to_json(), markup=False)
    elif args.dot:
        out.print(render_dot(compiled.plan), markup=False, end="")
    else:
        out.print(plan_text(compiled.plan), markup=False)
    return EXIT_OK


def cmd_graph(args) -> int:
    args.json, args.dot = False, True
    return cmd_plan(args)


def print_warnings(compiled) -> None:
    if compiled.warnings:
        print_diagnostics(compiled.warnings, compiled.program.sources)


def cmd_run(args) -> int:
    from karmixlang.plan.report import summary_line
    from karmixlang.runtime.executor import RunOptions, execute

    limit = _memory_limit(args)
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise UsageError(f"--device must be cpu or cuda (or cuda:N), not {args.device!r}")
    if args.executor == "ray":  # before anything is read or started
        from karmixlang.runtime.ray.executor import check_address

        check_address(args.address)
    compiled = _compile(args)
    print_warnings(compiled)
    if not args.quiet:
        err.print(Text(summary_line(compiled.plan).replace("nothing executed.", "running.")))
    opts = RunOptions(threads=args.threads or 0, device=args.device,
                      compute_dtype=args.compute_dtype, memory_limit=limit, resume=args.resume,
                      force=args.force, strict=args.strict, nonfinite=args.nonfinite,
                      executor=args.executor, address=args.address)
    from karmixlang.console import make_progress

    result = execute(compiled, opts, None if args.quiet else make_progress(err))
    if result.nothing_to_do:
        err.print(Text("Nothing to do: every output is complete and matches the plan.",
                       style="green"))
        return EXIT_OK
    from karmixlang.units import human_bytes

    for path in result.outputs:
        out.print(Text(f"wrote {path}"))
    if result.fallbacks:
        shown = "; ".join(result.fallbacks[:5])
        more = f"; and {len(result.fallbacks) - 5} more" if len(result.fallbacks) > 5 else ""
        err.print(Text(f"{len(result.fallbacks)} key(s) with non-finite values were copied from "
                       f"the fallback (--nonfinite=fallback): {shown}{more}", style="yellow"))
    resumed = f" ({result.skipped} finished earlier)" if result.skipped else ""
    err.print(Text(f"Done: {result.keys:,} keys{resumed} in {result.seconds:.1f} s · read "
                   f"{human_bytes(result.bytes_read)} · wrote {human_bytes(result.bytes_written)}"
                   f" · peak memory {human_bytes(result.peak_rss_delta)} (resident growth)",
                   style="green"))
    return EXIT_OK


def cmd_fmt(args) -> int:
    import difflib

    from karmixlang.syntax.fmt import FormatterError, format_source
    from karmixlang.syntax.parser import parse_file

    status = EXIT_OK
    for path in args.files:
        text = _read_text(path)
        if text is None:  # parse_file says why: not a regular file, too large, not UTF-8
            raise UsageError(f"cannot read {path}: {parse_file(path)[2][0].message}")
        try:
            formatted, diags = format_source(text, path)
        except FormatterError as exc:
            err.print(Text(f"error: cannot format {path}: {exc} (internal error; please report)",
                           style="bold red"))
            return 123
        if formatted is None:
            print_diagnostics(diags, {path: text})
            status = EXIT_ERRORS
            continue
        if formatted == text:
            continue
        if args.diff:
            out.print("".join(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                   path, path)), markup=False, end="")
        if args.check or args.diff:
            err.print(Text(f"would reformat {path}"))
            status = max(status, EXIT_ERRORS)
        else:
            from karmixlang.io.writer import atomic_write

            try:  # a new temporary file: nothing planted at a known name is followed
                atomic_write(path, formatted.encode(), stat.S_IMODE(os.stat(path).st_mode))
            except OSError as exc:
                raise UsageError(f"cannot write {path}: {exc}")
            err.print(Text(f"reformatted {path}"))
    return status


def cmd_explain(args) -> int:
    from karmixlang.diagnostics import CODES
    from karmixlang.resources import data_dir

    code = args.code.upper()
    if code not in CODES:
        raise UsageError(f"unknown code {args.code!r}; codes are {min(CODES)}..{max(CODES)} "
                         "(see docs/errors/)")
    page = data_dir("errors").joinpath(f"{code}.md")
    out.print(page.read_text(encoding="utf-8"), markup=False)
    return EXIT_OK


def cmd_methods(args) -> int:
    from karmixlang.builtins import BUILTINS

    group = None
    for b in BUILTINS.values():
        if b.group != group:
            group = b.group
            out.print(Text(f"\n{group}", style="bold"))
        out.print(Text(f"  {b.signature():<58} {b.summary}"))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from karmixlang.io.header import read_checkpoint
    from karmixlang.units import human_bytes

    h = read_checkpoint(args.file)
    if args.json:
        out.print(json.dumps({"path": h.path, "metadata": h.metadata, "tensors": {
            k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in h.tensors.items()}},
            indent=2), markup=False)
        return EXIT_OK
    for k, t in h.tensors.items():
        out.print(Text(f"{k}  {t.dtype} {list(t.shape)}"))
    meta_keys = ", ".join(sorted(h.metadata)) or "none"
    out.print(Text(f"\n{len(h.tensors)} tensors · {human_bytes(h.total_bytes)} · "
                   f"{len(h.files)} file(s) · metadata: {meta_keys}"))
    return EXIT_OK


def cmd_demo(args) -> int:
    from karmixlang.demo import run_demo

    return run_demo(args.dir, out, err, threads=args.threads)


def cmd_new(args) -> int:
    from karmixlang.diagnostics import error
    from karmixlang.resources import template_text

    if os.path.exists(args.path) and not args.force:
        raise UsageError(f"{args.path} exists; pass --force to replace it")
    # Missing folders are created (as mkdir -p); the file appears whole or not at all.
    tmp = os.path.join(os.path.dirname(args.path), f".{os.path.basename(args.path)}.kmx-new")
    try:
        os.makedirs(os.path.dirname(args.path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(template_text(args.template))
        os.replace(tmp, args.path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KmxError([error("K0402", f"cannot write `{args.path}`: {exc.strerror or exc}",
                              help="choose a writable folder, or a name that is not a "
                                   "folder")]) from None
    err.print(Text(f"wrote {args.path}; edit the paths, then `kmx plan {args.path}`"))
    return EXIT_OK


# ------------------------------------------------------------------ argument parsing

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmx", description="karmixlang: merge checkpoints from "
                                "declarative .kmx recipes.")
    p.add_argument("--version", action="version", version=f"kmx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def recipe_opts(sp, compute=True):
        sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override a param (repeatable); NAME may be lib.param")
        if compute:
            sp.add_argument("--compute-dtype", choices=("fp32", "fp64"), default="fp32")
            sp.add_argument("--strict", action="store_true",
                            help="treat every key that would be copied from a fallback as an error")
            sp.add_argument("--threads", type=threads_arg, default=0, metavar="N",
                            help="keys in flight (default: one per core, at most 8)")
            sp.add_argument("--memory-limit", metavar="SIZE",
                            help='e.g. "8GB" (default: half of the available memory); keys '
                                 "that do not fit run out of core")
            sp.add_argument("--executor", choices=("local", "ray"), default="local",
                            help="run keys on this machine's threads (default) or on a Ray "
                                 "cluster (pip install 'karmixlang[ray]')")
            sp.add_argument("--address", metavar="ADDR",
                            help="the Ray cluster to join (default: start a local one)")

    s = sub.add_parser("check", help="report every problem in recipes (reads no checkpoint)")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--format", choices=("text", "json"), default="text")
    recipe_opts(s, compute=False)
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("fmt", help="format recipes in the canonical layout")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--check", action="store_true", help="exit 1 if a file would change")
    s.add_argument("--diff", action="store_true", help="print the changes instead of writing")
    s.set_defaults(fn=cmd_fmt)

    s = sub.add_parser("plan", help="show what a run would do (reads headers only)")
    s.add_argument("file", metavar="FILE")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the plan as JSON (docs/plan-format.md)")
    fmt.add_argument("--dot", action="store_true", help="the graph in Graphviz DOT")
    recipe_opts(s)
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("graph", help="the optimized graph in Graphviz DOT (plan --dot)")
    s.add_argument("file", metavar="FILE")
    recipe_opts(s)
    s.set_defaults(fn=cmd_graph)

    s = sub.add_parser("run", help="run a recipe and write its checkpoints")
    s.add_argument("file", metavar="FILE")
    recipe_opts(s)
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")
    s.add_argument("--force", action="store_true", help="replace existing outputs")
    s.add_argument("--nonfinite", choices=("error", "fallback"), default="error",
                   help="NaN/Inf in an input key or a result, or a result past its output "
                        "dtype: stop (default) or copy the key from the fallback")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("explain", help="explain a diagnostic code, e.g. kmx explain K0201")
    s.add_argument("code")
    s.set_defaults(fn=cmd_explain)

    s = sub.add_parser("methods", help="list the builtin functions")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("inspect", help="list the tensors of a safetensors checkpoint")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("demo", help="build synthetic SDXL-layout checkpoints and merge them")
    s.add_argument("dir", nargs="?", default=None,
                   help="where to write the demo (default: a new temporary folder)")
    s.add_argument("--threads", type=threads_arg, default=0, metavar="N")
    s.set_defaults(fn=cmd_demo)

    for name in ("new", "init"):
        s = sub.add_parser(name, help="write a starter recipe")
        s.add_argument("path", nargs="?", default="merge.kmx")
        s.add_argument("--template", choices=("two-bases", "ties", "mbw"), default="two-bases")
        s.add_argument("--force", action="store_true")
        s.set_defaults(fn=cmd_new)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. Ctrl-C at any point is exit 130 and one line (a run
    that has started writing stops with K0403 instead, keeping its finished keys)."""
    try:
        return _command(argv)
    except KeyboardInterrupt:  # in argument parsing, or while reporting another error
        return interrupted()


def interrupted() -> int:
    err.print(Text("interrupted", style="bold red"))
    return 130


def _command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KmxError as exc:
        print_diagnostics(exc.diagnostics, _sources_for(exc.diagnostics, {}))
        return EXIT_ERRORS
    except UsageError as exc:
        err.print(Text(f"kmx: error: {exc}", style="bold red"))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug: say so in one line; KMX_DEBUG=1 shows the traceback
        if os.environ.get("KMX_DEBUG"):
            raise
        err.print(Text(f"kmx: internal error: {type(exc).__name__}: {exc}\nThis is a bug in kmx; "
                       "please report it with the recipe (KMX_DEBUG=1 shows the traceback).",
                       style="bold red"))
        return 3


if __name__ == "__main__":
    sys.exit(main())
