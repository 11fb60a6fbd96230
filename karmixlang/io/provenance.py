"""`--no-provenance`: an output's metadata without the local paths it would record, for a
file meant to be shared (docs/cli.md, "--no-provenance").

Paths go, everything else stays: an input path inside the recipe's folder is kept relative to
it, any other absolute path (an input elsewhere, a recipe line's file, the save's path) is cut
to its file name, and a `--set` value that is an absolute path is replaced by OMITTED. The
hashes, sizes, the recipe text and the other `--set` values are kept, so `kmx verify` and
re-merging still work (given `--set` for the omitted values).
"""

from __future__ import annotations

import os
import re

OMITTED = "<omitted by --no-provenance>"
MARK = "kmx_provenance"  # the metadata field that says paths were left out
_ORIGIN = re.compile(r"(.+):(\d+):(\d+)")


def shared_path(path: str, base: str) -> str:
    """`path` relative to the folder `base` when inside it, else its file name."""
    rel = os.path.relpath(path, base)
    return os.path.basename(path) if rel.startswith("..") or os.path.isabs(rel) else rel


def strip_paths(value):
    """A JSON value (kmx_graph) with every absolute path cut to its file name, also as the
    file of a recipe position (`/a/r.kmx:3:1` -> `r.kmx:3:1`)."""
    if isinstance(value, dict):
        return {k: strip_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_paths(v) for v in value]
    if isinstance(value, str):
        origin = _ORIGIN.fullmatch(value)
        if origin and os.path.isabs(origin[1]):
            return f"{os.path.basename(origin[1])}:{origin[2]}:{origin[3]}"
        if os.path.isabs(value):
            return os.path.basename(value)
    return value


def strip_sets(sets: dict[str, str]) -> dict[str, str]:
    """--set values, each absolute path replaced by OMITTED."""
    return {k: OMITTED if os.path.isabs(v) else v for k, v in sets.items()}


def leak(metadata: dict[str, str], folders: list[str]) -> tuple[str, str] | None:
    """The first (field, folder) where a metadata value still holds one of the absolute
    `folders` (the recipe text names it literally), or None."""
    folders = sorted({f for f in folders if len(f) > 1}, key=lambda f: (-len(f), f))
    for key in sorted(metadata):
        for folder in folders:
            if folder in metadata[key]:
                return key, folder
    return None
