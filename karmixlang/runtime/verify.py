"""`kmx verify FILE`: prove that a kmx output is exactly what its embedded recipe makes.

From the output's metadata: the recipe text (`kmx_recipe`), its --set values (`kmx_set`), each
input's path and data hash (`kmx_inputs`) and the plan of the save (`kmx_graph`). The recipe is
compiled as if it were the file it was run from: its folder is found from the inputs' paths
(absolute in `kmx_inputs`, relative to the recipe in `kmx_graph`) and its name from the save's
origin. Files it imports (other than `std/...`) are not embedded: they must be present there.
Inputs are paired with the recorded ones in graph order, so `--set` may point the recipe at
inputs that moved. Then every save is recomputed into a temporary folder beside FILE (FILE is
never opened for writing) and the save that wrote FILE is compared with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.hashes import combine_hashes, file_hashes
from karmixlang.io.header import INDEX_SUFFIX, CheckpointHeader, pread_exact, read_checkpoint
from karmixlang.io.provenance import MARK
from karmixlang.plan.compile import Compiled, compile

SHOWN = 5  # differing keys named in a diagnostic
_FIELDS = ("kmx_recipe", "kmx_set", "kmx_inputs", "kmx_graph")
# What records where the inputs were: allowed to differ when --set points them elsewhere.
REMAPPED = ("kmx_set", "kmx_inputs", "kmx_graph", "kmx_fingerprints")


@dataclass
class Verified:
    path: str
    inputs: int
    keys: int  # 0 with hashes_only


def verify(path: str, overrides: dict[str, str] | None = None, hashes_only: bool = False,
           threads: int = 0) -> Verified:
    """Raises KmxError: K0516 not a kmx output, K0514 an input differs from its record,
    K0515 the recomputed output differs."""
    meta = read_checkpoint(path).metadata
    missing = [f for f in _FIELDS if f not in meta]
    if missing:
        raise KmxError([error("K0516", f"`{path}` is not a kmx output: its metadata has no "
                              f"{', '.join(missing)}", help="kmx verify checks files written "
                              "by `kmx run` (with the recipe embedded)")])
    try:
        recorded = json.loads(meta["kmx_inputs"])
        graph = json.loads(meta["kmx_graph"])
        sets = {**json.loads(meta["kmx_set"]), **(overrides or {})}
        recipe = _recipe_path(path, graph, recorded)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise KmxError([error("K0516", f"`{path}` has unreadable kmx metadata ({e})")])
    compiled = compile(recipe, sets, source=meta["kmx_recipe"].encode(), lock=False,
                       compute_dtype=graph["compute_dtype"])
    _check_inputs(compiled, graph, recorded)
    if hashes_only:
        return Verified(path, len(recorded), 0)
    save = _which_save(compiled, graph, path)
    ignore = REMAPPED if overrides else ()
    # The recomputed output must carry the recorded date, whatever SOURCE_DATE_EPOCH says now.
    options = {"threads": threads, "date": meta.get("modelspec.date", ""),
               "provenance": meta.get(MARK) != "omitted"}
    return Verified(path, len(recorded),
                    _recompute_and_compare(compiled, save, path, options, ignore))


def _recipe_path(path: str, graph: dict, recorded: list[dict]) -> str:
    """Where the recipe was: its folder from an input inside it, its name from the origin of
    the save's expression (a save is always in the root recipe)."""
    node = next(n for n in graph["nodes"] if n["id"] == graph["save"]["node"])
    name = node["origins"][0].rsplit(":", 2)[0]
    folder = os.path.dirname(os.path.abspath(path))
    for given in graph["inputs"]:
        rel = given["path"]
        if os.path.isabs(rel) or rel.startswith("std/"):
            continue
        for r in recorded:
            if r["path"].endswith(os.sep + rel):
                folder = r["path"][:-len(rel) - 1]
                break
    return os.path.join(folder, name)


def _check_inputs(compiled: Compiled, graph: dict, recorded: list[dict]) -> None:
    order = compiled.graph.topo()
    phase_one = iter(compiled.schedule.phase_one)  # listed last, in this order
    now = [order[i["node"] - 1] if i["node"] is not None else next(phase_one)
           for i in compiled.plan.data["inputs"]]
    if len(now) != len(graph["inputs"]):
        raise KmxError([error("K0514", f"the recipe now reads {len(now)} inputs, the output "
                              f"records {len(graph['inputs'])}",
                              help="the --set values change what the recipe reads")])
    files = sorted({f for n in now for f in compiled.schedule.headers[n].files})
    hashes = file_hashes(files)
    for node, given in zip(now, graph["inputs"]):
        rec = _recorded(given["path"], recorded)
        actual = combine_hashes([hashes[f].data_hash
                                 for f in compiled.schedule.headers[node].files])
        if rec is None or rec["hash"] != actual:
            p = node.attr("path")
            raise KmxError([error("K0514", f"the input `{p}` differs from what the output "
                                  f"records: data hash {actual}, recorded "
                                  f"{rec['hash'] if rec else 'none'}", help=(
                                      "find the file the output was made from (the hash is "
                                      "of the tensor bytes after the header); --set points "
                                      "the recipe at inputs that moved"))])


def _recorded(rel: str, recorded: list[dict]) -> dict | None:
    for r in recorded:
        if r["path"] == rel or r["path"].endswith(os.sep + rel):
            return r
    return None


def _which_save(compiled: Compiled, graph: dict, path: str) -> int:
    for i, s in enumerate(compiled.plan.data["saves"]):
        if s["path"] == graph["save"]["path"]:
            return i
    raise KmxError([error("K0515", f"the recipe embedded in `{path}` has no save "
                          f"`{graph['save']['path']}`")])


def _recompute_and_compare(compiled: Compiled, save: int, path: str, options: dict,
                           ignore: tuple[str, ...]) -> int:
    """Every save written into a temporary folder beside `path`; returns the keys compared."""
    from karmixlang.runtime.executor import RunOptions, execute  # torch: not for --hashes-only

    tmp = tempfile.mkdtemp(prefix=".kmx-verify-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        compiled.graph.saves = [replace(s, path=os.path.join(tmp, str(i),
                                                              os.path.basename(s.path)))
                                for i, s in enumerate(compiled.graph.saves)]
        for s in compiled.graph.saves:
            os.mkdir(os.path.dirname(s.path))
        execute(compiled, RunOptions(**options))
        made = compiled.graph.saves[save].path
        if path.endswith(INDEX_SUFFIX) and not made.endswith(INDEX_SUFFIX):
            made = made.removesuffix(".safetensors") + INDEX_SUFFIX
        return compare(path, made, ignore)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(path: str, made: str, ignore: tuple[str, ...] = ()) -> int:
    """K0515 unless the checkpoint at `path` has exactly the bytes of `made` (a file or an
    index and its shards) or, with metadata fields to `ignore`, the same tensors and other
    metadata; returns the number of keys."""
    a, b = read_checkpoint(path), read_checkpoint(made)
    if _same_files(a, b, path, made):
        return len(a.tensors)
    differ = sorted(set(a.tensors) ^ set(b.tensors))
    differ += [k for k in sorted(set(a.tensors) & set(b.tensors))
               if _tensor(a, k) != _tensor(b, k)]
    if differ:
        shown = ", ".join(f"`{k}`" for k in differ[:SHOWN])
        more = f" and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
        raise KmxError([error("K0515", f"`{path}` differs from what its recipe makes: "
                              f"{len(differ)} keys differ: {shown}{more}",
                              help="the file was changed after it was written, or made by "
                                   "another recipe, kmx version or input")])
    fields = sorted(k for k in set(a.metadata) | set(b.metadata)
                    if a.metadata.get(k) != b.metadata.get(k) and k not in ignore)
    if ignore and not fields:
        return len(a.tensors)
    what = f"metadata {', '.join(fields)}" if fields else "header layout"
    raise KmxError([error("K0515", f"`{path}` differs from what its recipe makes: every "
                          f"tensor is identical but its {what} differs")])


def _tensor(h: CheckpointHeader, key: str) -> tuple:
    t = h.tensors[key]
    fd = os.open(t.file, os.O_RDONLY)
    try:
        return t.dtype, t.shape, pread_exact(fd, t.nbytes, t.begin, t.file, None)
    finally:
        os.close(fd)


def _same_files(a: CheckpointHeader, b: CheckpointHeader, path: str, made: str) -> bool:
    pairs = list(zip(a.files, b.files)) + ([(path, made)] if path.endswith(INDEX_SUFFIX) else [])
    if len(a.files) != len(b.files):
        return False
    for x, y in pairs:
        with open(x, "rb") as f, open(y, "rb") as g:
            while True:
                cx, cy = f.read(1 << 20), g.read(1 << 20)
                if cx != cy:
                    return False
                if not cx:
                    break
    return True
