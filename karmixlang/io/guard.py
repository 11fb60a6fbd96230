"""What a run may write, decided before it writes anything.

Every file a save writes (each shard, the index, the hidden partial, journal, stamp and lock
files) must not be an input or a recipe file — by path, symlink, folder or hard link — must be
a regular file or a new name, and must not be written by another save of the recipe. Checked
when a recipe is compiled (so under every flag) and again when a run opens its outputs.
Also: the identity of every input file as planned, for the end-of-run check (K0410).
"""

from __future__ import annotations

import os

from karmixlang.diagnostics import Diagnostic, KmxError, Label, error
from karmixlang.io.header import read_checkpoint
from karmixlang.io.files import hidden_path, not_regular
from karmixlang.io.hffolder import (DEFAULT_SHARD, OLD_SUFFIX, FolderSave, is_folder_path,
                                    staging_path, tensor_path)
from karmixlang.io.writer import OutputLayout, layout_output, written_paths
from karmixlang.units import parse_size


def save_tensors(schedule, index: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, dtype, shape) of every tensor save `index` writes."""
    return [(o.written_as(job.key), o.dtype, o.shape) for job in schedule.jobs
            for o in job.outputs if o.save == index]


def plan_save(save, schedule, index: int, metadata: dict[str, str]) -> OutputLayout:
    """The files of a save: at its path, or for a save into a folder (io/hffolder.py) as
    `model.safetensors` (5GB shards by default) in its hidden staging folder, with the
    `format` metadata transformers' loaders expect."""
    shard = save.shard
    if is_folder_path(save.path):
        shard = shard or DEFAULT_SHARD
        metadata = {"format": "pt", **metadata}
    return layout_output(tensor_path(save.path), save_tensors(schedule, index), metadata,
                         parse_size(shard) if shard else None)


class _Protected:
    """Inputs and recipe files, by real path and by (device, inode): (what it is, its path)."""

    def __init__(self, headers, recipe_files, unused_inputs=()):
        self.by_real: dict[str, tuple[str, str]] = {}
        self.by_inode: dict[tuple[int, int], tuple[str, str]] = {}
        for node, h in headers.items():
            for f in (node.attr("path"), h.path, *h.files):
                self._add(f, ("the input", f))
        for path in unused_inputs:  # declared checkpoints no save reads are still inputs
            for f in _checkpoint_files(path):
                self._add(f, ("the input", f))
        for f in recipe_files:
            self._add(f, ("the recipe file", f))

    def _add(self, path: str, what: tuple[str, str]) -> None:
        self.by_real.setdefault(os.path.realpath(path), what)
        try:
            st = os.stat(path)
        except OSError:
            return
        self.by_inode.setdefault((st.st_dev, st.st_ino), what)

    def hit(self, path: str) -> tuple[str, str] | None:
        what = self.by_real.get(os.path.realpath(path))
        if what is None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            what = self.by_inode.get((st.st_dev, st.st_ino))
        return what


def _checkpoint_files(path: str) -> tuple[str, ...]:
    """A declared checkpoint's files (its shards, a folder's members) when its header reads,
    else its path alone: an unused input need not exist."""
    try:
        h = read_checkpoint(path)
    except KmxError:
        return (path,)
    return (path, h.path, *h.files)


def check_outputs(saves, layouts: list[OutputLayout], headers, recipe_files,
                  unused_inputs=(), folders: dict[int, FolderSave] | None = None) -> None:
    """Raise KmxError (K0305, K0311, K0212, K0342) unless every file the saves write is safe
    to write. `unused_inputs`: paths of checkpoints the recipe declares but no save reads;
    `folders`: the side files of saves into folders, whose copied files are inputs too."""
    protected = _Protected(headers, recipe_files, unused_inputs)
    for folder in (folders or {}).values():
        for f in folder.files:
            if f.copy_from:
                protected._add(f.copy_from, ("the input", f.copy_from))
    writers: dict[str, object] = {}  # directory entry (real folder + name) -> the save
    diags = []
    for save, layout in zip(saves, layouts):
        if is_folder_path(save.path):
            d = _check_folder(save, protected, writers)
            if d is not None:
                diags.append(d)
                continue
        for path in written_paths(layout):
            d = _check_path(save, path, protected, writers)
            if d is not None:
                diags.append(d)
                break  # one diagnostic per save is enough to act on
    if diags:
        raise KmxError(diags)


def _check_path(save, path: str, protected: _Protected, writers: dict) -> Diagnostic | None:
    hit = protected.hit(path)
    if hit is not None:
        what, other = hit
        via = "" if path in (save.path, other) else f" (it writes `{path}`)"
        return error("K0305", f"`{save.written}` would overwrite {what} `{other}`{via}", save.span,
                     label="this save", help="save to a new name: no file a save writes (its "
                     "shards, its index, the hidden `.NAME.kmx-*` files beside it) may be an "
                     "input or a recipe")
    special = not_regular(path, save.span)
    if special is not None:
        return special
    # The folder resolved, the name not: a symlink at the name is replaced, never followed.
    entry = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
    return _claim(writers, entry, save)


def _claim(writers: dict, target: str, save) -> Diagnostic | None:
    """Record that `save` writes `target`; K0212 when another save already does."""
    first = writers.setdefault(target, save)
    if first is not save:
        return error("K0212", f"`{save.written}` and `{first.written}` both write "
                     f"`{target}`", save.span, label="this save",
                     notes=(Label(first.span, "also written here"),) if first.span else ())
    return None


def _check_folder(save, protected: _Protected, writers: dict) -> Diagnostic | None:
    """A folder save replaces its folder whole: the folder and its hidden siblings must not be
    or hold an input or recipe file, and must be a folder or a new name."""
    folder = os.path.realpath(save.path)
    for path in (save.path, staging_path(save.path), hidden_path(save.path, OLD_SUFFIX)):
        real = os.path.realpath(path)
        inside = [(w, p) for r, (w, p) in protected.by_real.items()
                  if r == real or r.startswith(real.rstrip(os.sep) + os.sep)]
        if inside:
            what, other = min(inside, key=lambda t: t[1])
            return error("K0305", f"`{save.written}` would replace a folder holding {what} "
                         f"`{other}`", save.span, label="this save",
                         help="save to a new folder: a folder save writes the whole folder")
    if os.path.lexists(save.path) and not os.path.isdir(save.path):
        return error("K0342", f"`{save.written}` is a folder save, but `{save.path}` is not a "
                     "folder", save.span, label="this save",
                     help="a path that does not end in `.safetensors` writes a model folder: "
                          "save to another name, or end the path in `.safetensors` to write "
                          "one file")
    return _claim(writers, folder, save)


def input_files(headers) -> dict[str, os.stat_result]:
    """The identity of every file an input reads, as planned: K0410 compares it at the end."""
    out = {}
    for h in headers.values():
        for f in h.files:
            try:
                out[f] = os.stat(f)
            except OSError as e:
                raise KmxError([error("K0410", f"the input `{f}` changed after it was read: "
                                      f"{e.strerror or e}")]) from e
    return out


def changed(before: os.stat_result, path: str) -> str | None:
    """How `path` differs from `before` (size, modification time, or another file), or None."""
    try:
        now = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
        return "it was replaced by another file"
    if now.st_size != before.st_size:
        return f"its size went from {before.st_size:,} to {now.st_size:,} bytes"
    if now.st_mtime_ns != before.st_mtime_ns:
        return "its modification time changed"
    return None
