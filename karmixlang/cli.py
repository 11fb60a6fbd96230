"""The `kmx` command line: arguments in, the API called, what it returns handed to console.py
(which prints every line), an exit code out.

Exit codes: 0 success (warnings allowed), 1 errors in the recipe or its inputs (an interrupted
run, K0403, included), 2 usage errors, 3 an internal error (a bug: one line, no traceback),
123 the formatter refused its own output (as black), 130 interrupted outside a run (from
the first moment: see __main__.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from karmixlang import __version__, console
from karmixlang.diagnostics import KmxError

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


def parse_sets(values: list[str] | None) -> dict[str, str]:
    sets = {}
    for v in values or []:
        name, eq, value = v.partition("=")
        if not eq or not name:
            raise UsageError(f"--set expects NAME=VALUE, got {v!r}")
        sets[name.strip()] = value
    return sets


def parse_sweeps(values: list[str] | None) -> list[tuple[str, list[str]]]:
    """--sweep NAME=V1,V2,... (repeatable: a grid), in the order given."""
    sweeps = []
    for v in values or []:
        name, eq, text = v.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--sweep expects NAME=VALUE,VALUE,..., got {v!r}")
        sweeps.append((name.strip(), text.split(",")))
    return sweeps


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
    from karmixlang.api import check

    status = EXIT_OK
    all_diags = []
    for path in args.files:
        checked = check(path, parse_sets(args.set))
        if args.format == "json":
            all_diags.extend(checked.diagnostics)
        else:
            console.diagnostics(checked.diagnostics, checked.sources)
        if any(d.is_error for d in checked.diagnostics):
            status = EXIT_ERRORS
        elif args.format != "json":
            console.checked(path, len(checked.diagnostics))
    if args.format == "json":
        console.diagnostics(all_diags, {}, "json")
    return status


def _memory_limit(args) -> int | None:
    from karmixlang.units import parse_size

    try:
        return parse_size(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        raise UsageError(f"--memory-limit: {exc}")


def _compile(args):
    from karmixlang.api import compile as compile_recipe, compile_sweep
    from karmixlang.machine import default_threads

    options = dict(threads=args.threads or default_threads(), compute_dtype=args.compute_dtype,
                   strict=args.strict, memory_limit=_memory_limit(args),
                   executor=args.executor, lock=not args.no_lock)
    if args.sweep:
        return compile_sweep(args.file, parse_sets(args.set), parse_sweeps(args.sweep),
                             **options)
    return compile_recipe(args.file, parse_sets(args.set), **options)


def cmd_plan(args) -> int:
    compiled = _compile(args)
    print_warnings(compiled)
    if compiled.lock_file and not (args.json or args.dot):
        console.status(f"lock: every input matches `{compiled.lock_file}` (sizes; hashes "
                       "are compared while the run reads them)")
    console.plan(compiled.plan, "json" if args.json else "dot" if args.dot else "text")
    return EXIT_OK


def cmd_graph(args) -> int:
    args.json, args.dot = False, True
    return cmd_plan(args)


def print_warnings(compiled) -> None:
    if compiled.warnings:
        console.diagnostics(compiled.warnings, compiled.program.sources)


def cmd_run(args) -> int:
    from karmixlang.api import check_ray_address, execute
    from karmixlang.runtime.startup import load_torch_in_background, prefetch

    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise UsageError(f"--device must be cpu or cuda (or cuda:N), not {args.device!r}")
    if args.executor == "ray":  # before anything is read or started
        check_ray_address(args.address)
    load_torch_in_background()  # while the recipe compiles (runtime/startup.py)
    compiled = _compile(args)
    print_warnings(compiled)
    if args.executor == "local":  # Ray's workers read elsewhere
        prefetch(compiled.schedule.jobs)
    if not args.quiet:
        console.run_starting(compiled.plan)
    result = execute(compiled, None if args.quiet else console.progress(),
                     threads=args.threads or 0, device=args.device, resume=args.resume,
                     force=args.force, nonfinite=args.nonfinite, executor=args.executor,
                     address=args.address, reuse=not args.no_reuse,
                     provenance=not args.no_provenance)
    console.run_finished(result, inputs=not args.quiet)
    return EXIT_OK


EXIT_DIFF_ERROR = 2  # kmx diff: 0 no output changes, 1 some change, 2 error (git diff's codes)


def cmd_diff(args) -> int:
    from karmixlang.api import VersionError, compile_version
    from karmixlang.plan.diff import diff

    want = 7 if args.git_driver else 2
    if len(args.files) != want:
        raise UsageError(f"kmx diff {'--git-driver ' if args.git_driver else ''}expects "
                         f"{want} arguments, got {len(args.files)}")
    if args.git_driver:  # path old-file old-hex old-mode new-file new-hex new-mode
        path = args.files[0]
        sides = [(f"a/{path}", path, args.files[1]), (f"b/{path}", path, args.files[4])]
    else:
        sides = [(f, f, None) for f in args.files]
    try:
        compiled = [compile_version(name, path, given, parse_sets(args.set))
                    for name, path, given in sides]
    except VersionError as exc:  # a diff driver that fails stops `git diff`: let it go on
        console.diagnostics(exc.diagnostics, exc.sources)
        return EXIT_OK if args.git_driver else EXIT_DIFF_ERROR
    result = diff(compiled[0], compiled[1], sides[0][0], sides[1][0])
    if args.git_driver:
        console.heading(f"kmx diff {sides[0][0]} {sides[1][0]}")
    console.recipe_diff(result, args.json)
    return EXIT_OK if args.git_driver or not result.changed else EXIT_ERRORS


def cmd_lock(args) -> int:
    from karmixlang.api import write_lock

    result = write_lock(args.file, parse_sets(args.set), update=args.update)
    console.status(f"{result.path}: {result.status} ({result.inputs} inputs)")
    return EXIT_OK


def cmd_verify(args) -> int:
    from karmixlang.api import verify

    result = verify(args.file, parse_sets(args.set), args.hashes_only, args.threads or 0)
    what = (f"its {result.inputs} inputs have the recorded hashes" if args.hashes_only else
            f"{result.keys:,} keys and the header are what its recipe makes from "
            f"{result.inputs} inputs with the recorded hashes")
    console.status(f"{args.file}: verified: {what}")
    return EXIT_OK


def cmd_fmt(args) -> int:
    from karmixlang.api import format_file, write_formatted
    from karmixlang.syntax.fmt import FormatterError

    status = EXIT_OK
    for path in args.files:
        try:
            result = format_file(path)
        except KmxError as exc:  # not a regular file, too large, not UTF-8
            raise UsageError(f"cannot read {path}: {exc.diagnostics[0].message}")
        except FormatterError as exc:
            console.formatter_refused(path, exc)
            return 123
        if result.formatted is None:
            console.diagnostics(result.diagnostics, {path: result.text})
            status = EXIT_ERRORS
            continue
        if not result.changed:
            continue
        if args.diff:
            console.format_diff(path, result.text, result.formatted)
        if args.check or args.diff:
            console.status(f"would reformat {path}")
            status = max(status, EXIT_ERRORS)
        else:
            try:
                write_formatted(result)
            except OSError as exc:
                raise UsageError(f"cannot write {path}: {exc}")
            console.status(f"reformatted {path}")
    return status


def cmd_explain(args) -> int:
    from karmixlang.diagnostics import CODES
    from karmixlang.resources import data_dir

    code = args.code.upper()
    if code not in CODES:
        raise UsageError(f"unknown code {args.code!r}; codes are {min(CODES)}..{max(CODES)} "
                         "(see docs/errors/)")
    console.page(data_dir("errors").joinpath(f"{code}.md").read_text(encoding="utf-8"))
    return EXIT_OK


def cmd_methods(args) -> int:
    from karmixlang.builtins import BUILTINS

    console.methods(BUILTINS.values())
    return EXIT_OK


def cmd_inspect(args) -> int:
    from karmixlang.io.header import read_checkpoint

    from karmixlang.io.hashes import file_hashes

    h = read_checkpoint(args.file)
    console.checkpoint(h, args.json, None if args.no_hash else file_hashes(list(h.files)))
    return EXIT_OK


def cmd_convert(args) -> int:
    from karmixlang.io.dtypes import USER_DTYPE_NAMES, parse_user_dtype

    dtype = parse_user_dtype(args.dtype) if args.dtype else None
    if args.dtype and dtype is None:
        raise UsageError(f"--dtype: {args.dtype!r} is not a dtype kmx writes; use one of "
                         f"{', '.join(USER_DTYPE_NAMES)}")
    from karmixlang.runtime.convert import convert  # torch: only now

    console.converted(convert(args.input, args.output, dtype=dtype, force=args.force))
    return EXIT_OK


def cmd_demo(args) -> int:
    from karmixlang.demo import run_demo

    return run_demo(args.dir, threads=args.threads)


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
    console.status(f"wrote {args.path}; edit the paths, then `kmx plan {args.path}`")
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
            sp.add_argument("--sweep", action="append", metavar="NAME=V1,V2,...",
                            help="one output per value (repeatable: a grid), reading every "
                                 "input once (docs/recipes-in-git.md#sweeps)")
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
            sp.add_argument("--no-lock", action="store_true",
                            help="ignore the lock file beside the recipe (RECIPE.lock)")

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

    s = sub.add_parser("lock", help="pin every input of a recipe (size, SHA-256) in RECIPE.lock")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--update", action="store_true",
                   help="rewrite a lock that differs (after a deliberate change)")
    recipe_opts(s, compute=False)
    s.set_defaults(fn=cmd_lock)

    s = sub.add_parser("verify", help="check that a kmx output is exactly what its recipe makes")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--hashes-only", action="store_true",
                   help="only check that the inputs have the hashes the output records")
    s.add_argument("--threads", type=threads_arg, default=0, metavar="N")
    recipe_opts(s, compute=False)
    s.set_defaults(fn=cmd_verify)

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
    s.add_argument("--no-reuse", action="store_true",
                   help="compute every key, even those the output being replaced already "
                        "holds (by default keys whose fingerprint is unchanged are copied)")
    s.add_argument("--no-provenance", action="store_true",
                   help="keep local paths (inputs, recipe, output, absolute --set values) out "
                        "of the outputs' metadata, for files to share; hashes, sizes and the "
                        "recipe text stay")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("diff", help="what a recipe edit changes in the merge: saves, keys, "
                       "nodes (reads headers only; exit 0 no output changes, 1 some, 2 error)")
    s.add_argument("files", nargs="+", metavar="OLD NEW",
                   help="two recipes, each a file or REV:path read through git")
    s.add_argument("--json", action="store_true", help="the changes as JSON (docs/cli.md)")
    s.add_argument("--git-driver", action="store_true",
                   help="take git's 7 diff-driver arguments (docs/recipes-in-git.md)")
    recipe_opts(s, compute=False)
    s.set_defaults(fn=cmd_diff)

    s = sub.add_parser("explain", help="explain a diagnostic code, e.g. kmx explain K0201")
    s.add_argument("code")
    s.set_defaults(fn=cmd_explain)

    s = sub.add_parser("methods", help="list the builtin functions")
    s.set_defaults(fn=cmd_methods)

    s = sub.add_parser("inspect", help="list the tensors of a safetensors checkpoint")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-hash", action="store_true",
                   help="skip the hashes (read the header only)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="rewrite a PyTorch .ckpt/.pt/.pth/.bin as safetensors "
                       "(runs none of the pickle's code)")
    s.add_argument("input", metavar="IN")
    s.add_argument("output", metavar="OUT")
    s.add_argument("--dtype", metavar="DTYPE", help="cast float tensors (fp16, bf16, fp32, ...)")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_convert)

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
    console.interrupted()
    return 130


def _command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KmxError as exc:
        from karmixlang.api import sources_for

        console.diagnostics(exc.diagnostics, sources_for(exc.diagnostics))
        return EXIT_ERRORS
    except UsageError as exc:
        console.usage_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug: say so in one line; KMX_DEBUG=1 shows the traceback
        if os.environ.get("KMX_DEBUG"):
            raise
        console.internal_error(exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
