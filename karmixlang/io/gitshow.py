"""Recipes read from git for `kmx diff REV:path`: the bytes of a file at a revision, and the
working-tree path they stand for (its imports and paths resolve from that path's folder, as
if the old version were checked out there)."""

from __future__ import annotations

import os
import subprocess

from karmixlang.diagnostics import KmxError, error

GIT_HELP = ("write REV:path with a revision git knows (HEAD, HEAD~1, a branch, a commit) and "
            "the path from the repository's top folder, or ./path from the current folder")


def is_revision(arg: str) -> bool:
    """`REV:path` rather than a file: it names no existing file and has a colon after a
    non-empty revision."""
    rev, colon, _ = arg.partition(":")
    return bool(colon and rev) and not os.path.exists(arg)


def read_revision(spec: str, cwd: str | None = None) -> tuple[str, bytes]:
    """`REV:path` -> (the working-tree path it stands for, its bytes at REV). Raises K0501."""
    cwd = os.path.abspath(cwd or os.getcwd())
    rev, _, rel = spec.partition(":")
    top = _git(["rev-parse", "--show-toplevel"], cwd, spec).decode().strip()
    # git reads `REV:./p` and `REV:../p` from the current folder, `REV:p` from the top.
    base = cwd if rel.startswith(("./", "../")) else top
    return os.path.normpath(os.path.join(base, rel)), _git(["show", spec], cwd, spec)


def _git(args: list[str], cwd: str, spec: str) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=60,
                              check=False)
    except FileNotFoundError:
        raise KmxError([error("K0501", f"cannot read `{spec}`: git is not installed",
                              help="install git, or compare two files")]) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KmxError([error("K0501", f"cannot read `{spec}`: git failed ({exc})")]) from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise KmxError([error("K0501", f"cannot read `{spec}` through git: "
                              f"{why[-1] if why else f'exit status {done.returncode}'}",
                              help=GIT_HELP)])
    return done.stdout
