"""Lock files: `merge.kmx.lock` pins every input a recipe reads to its size and full-file
SHA-256, so that a run refuses an input that changed since the lock was written.

The file is JSON (sorted keys, two-space indent, one trailing newline: the same inputs give
the same bytes, and git diffs it line by line):

    {"inputs": [{"path": "models/a.safetensors", "resolved": "/abs/models/a.safetensors",
                 "sha256": "<hex>", "size": 6938040682}, ...],
     "kmx_lock": 1, "kmx_version": "0.1.0"}

`path` is the input as the recipe names it, relative to the recipe's folder (absolute when
outside it): inputs are matched by it, so a project moved as a whole keeps its lock.
`sha256` is what `sha256sum` prints; for a sharded input, the SHA-256 of its shards' digests
in file order. A compiled recipe is checked against its lock here with what is free (inputs
missing or unlisted, sizes, hashes already in the cache); the runtime compares the hashes it
computes while the merge runs before publishing anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from karmixlang import __version__
from karmixlang.diagnostics import Diagnostic, KmxError, error
from karmixlang.io.hashes import FileHashes, HashCache, combine_hashes

LOCK_SUFFIX = ".lock"
LOCK_VERSION = 1
UPDATE_HELP = "if the change is deliberate, run `kmx lock --update RECIPE` and commit the lock"


@dataclass(frozen=True)
class LockedInput:
    path: str  # as the recipe names it, relative to its folder
    resolved: str  # absolute
    size: int
    sha256: str  # hex


def lock_path(recipe: str) -> str:
    return recipe + LOCK_SUFFIX


def full_hash(files, hashes: dict[str, FileHashes]) -> str:
    """An input's full-file SHA-256 from its files' (a sharded one combines its shards')."""
    return combine_hashes([hashes[f].sha256 for f in files]).removeprefix("sha256:")


def _written(path: str, recipe: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(recipe)))
    return path if rel.startswith("..") else rel


def inputs_of(compiled, recipe: str) -> list[tuple[str, str, tuple[str, ...], int]]:
    """(path as written, resolved path, files, size) of every input the run reads."""
    out = []
    for node, header in compiled.schedule.headers.items():
        p = node.attr("path")
        out.append((_written(p, recipe), p, header.files,
                    sum(compiled.inputs[f].st_size for f in header.files)))
    return sorted(out)


def build_lock(compiled, recipe: str, hashes: dict[str, FileHashes]) -> list[LockedInput]:
    return [LockedInput(w, p, size, full_hash(files, hashes))
            for w, p, files, size in inputs_of(compiled, recipe)]


def render(entries: list[LockedInput]) -> str:
    data = {"kmx_lock": LOCK_VERSION, "kmx_version": __version__,
            "inputs": [asdict(e) for e in sorted(entries, key=lambda e: e.path)]}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_lock(path: str) -> dict[str, LockedInput] | None:
    """The entries of a lock file by path as written; None when there is none. K0512 for a
    file that is not a lock kmx can read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise KmxError([error("K0512", f"cannot read the lock file `{path}`: {e}",
                              help="restore it from git, or rewrite it: kmx lock --update")])
    try:
        if data["kmx_lock"] != LOCK_VERSION:
            raise ValueError(f"version {data['kmx_lock']!r}")
        entries = [LockedInput(str(e["path"]), str(e["resolved"]), int(e["size"]),
                               str(e["sha256"])) for e in data["inputs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise KmxError([error("K0512", f"`{path}` is not a kmx lock file this version reads "
                              f"({e})", help="rewrite it: kmx lock --update")])
    return {e.path: e for e in entries}


def differences(old: dict[str, LockedInput], new: list[LockedInput]) -> list[str]:
    """What changed between a lock and the inputs now, one line each."""
    now = {e.path: e for e in new}
    lines = []
    for p in sorted(set(old) | set(now)):
        a, b = old.get(p), now.get(p)
        if a is None:
            lines.append(f"`{p}` is read by the recipe but not in the lock")
        elif b is None:
            lines.append(f"`{p}` is in the lock but the recipe no longer reads it")
        elif a.size != b.size:
            lines.append(f"`{p}`: {b.size} bytes, the lock says {a.size}")
        elif a.sha256 != b.sha256:
            lines.append(f"`{p}`: SHA-256 {b.sha256}, the lock says {a.sha256}")
    return lines


def check_lock(compiled, recipe: str, lock: dict[str, LockedInput]) -> dict[str, LockedInput]:
    """Refuse, before any tensor is read, what the lock contradicts with what is free: an
    input it does not list (or one it lists that is not read), a size, a hash already in the
    cache. Returns the entries by resolved input path, for the run to compare the hashes it
    computes against."""
    cache = HashCache()
    diags: list[Diagnostic] = []
    by_resolved = {}
    origins = {n.attr("path"): compiled.graph.origins.get(n, [None])[0]
               for n in compiled.schedule.headers}
    name = lock_path(recipe)
    seen = set()
    for written, p, files, size in inputs_of(compiled, recipe):
        seen.add(written)
        entry = lock.get(written)
        span = origins.get(p)
        if entry is None:
            diags.append(error("K0510", f"the input `{written}` is not in `{name}`", span,
                               help="kmx lock --update RECIPE adds it"))
            continue
        by_resolved[p] = entry
        cached = [cache.peek(f) for f in files]
        if size != entry.size:
            diags.append(error("K0511", f"the input `{written}` differs from `{name}`: "
                               f"{size} bytes, the lock says {entry.size}", span,
                               help=UPDATE_HELP))
        elif all(cached) and (h := full_hash(files, dict(zip(files, cached)))) != entry.sha256:
            diags.append(error("K0511", f"the input `{written}` differs from `{name}`: "
                               f"SHA-256 {h}, the lock says {entry.sha256}", span,
                               help=UPDATE_HELP))
    for written in sorted(set(lock) - seen):
        diags.append(error("K0510", f"`{name}` lists `{written}`, which the recipe does not "
                           "read", help="kmx lock --update RECIPE removes it"))
    if diags:
        raise KmxError(diags)
    return by_resolved
