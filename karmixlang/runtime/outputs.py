"""The outputs of one run: their layouts (header computed from the plan before any tensor is
written), their metadata, the overwrite and resume rules, and publishing them.

Metadata holds the recipe, the lowered graph, each input's path, size and content hash, the kmx
version and the --set values — nothing that differs between two runs of the same recipe on the
same inputs. Input hashes are computed on a background thread during the merge (and cached by
path, size and mtime); the header is planned with fixed-length placeholders and the real
hashes are written into it just before the files are published, so no offset moves.
"""

from __future__ import annotations

import errno
import json
import os
import threading

from karmixlang import __version__
from karmixlang.diagnostics import KmxError, error, located
from karmixlang.units import parse_size
from karmixlang.io.header import (HASH_PLACEHOLDER, HASH_PREFIX, TOO_MANY_FILES_HELP,
                                  hash_data_region)
from karmixlang.io.writer import (JOURNAL_SUFFIX, CheckpointWriter, OutputLayout, hidden_path,
                                  plan_output)

STAMP_SUFFIX = ".kmx-inputs"


class _HashCache:
    """Input hashes by (real path, size, mtime): rehashing a 7 GB input on every run is waste."""

    def __init__(self):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        self.path = os.path.join(base, "karmixlang", "hashes.json")
        try:
            with open(self.path) as f:
                self.data = json.load(f)
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def key(path: str) -> str:
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, path: str) -> str:
        k = self.key(path)
        cached = self.data.get(k)
        # An entry from another kmx version may use another algorithm: never trust its length.
        if not (isinstance(cached, str) and cached.startswith(HASH_PREFIX)
                and len(cached) == len(HASH_PLACEHOLDER)):
            self.data[k] = hash_data_region(path)
        return self.data[k]

    def save(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time next run


def _input_files(compiled) -> list[tuple[str, int]]:
    out = []
    for n, h in sorted(compiled.schedule.headers.items(), key=lambda kv: kv[0].attr("path")):
        size = sum(os.stat(f).st_size for f in h.files)
        out.append((n.attr("path"), size))
    return out


class OutputSet:
    def __init__(self, compiled, opts):
        self.c = compiled
        self.opts = opts
        self.inputs = _input_files(compiled)
        self.hashes: dict[str, str] = {}
        self._hash_error: BaseException | None = None
        self._hasher = threading.Thread(target=self._hash_inputs, daemon=True, name="kmx-hash")
        self.layouts = [self._layout(i, {p: HASH_PLACEHOLDER for p, _ in self.inputs})
                        for i in range(len(compiled.graph.saves))]

    # -- layout and metadata
    def _layout(self, index: int, hashes: dict[str, str]) -> OutputLayout:
        save = self.c.graph.saves[index]
        tensors = [(job.key, o.dtype, o.shape) for job in self.c.schedule.jobs
                   for o in job.outputs if o.save == index]
        shard = parse_size(save.shard) if save.shard else None
        return plan_output(save.path, tensors, self._metadata(index, hashes), shard)

    def _metadata(self, index: int, hashes: dict[str, str]) -> dict[str, str]:
        save = self.c.graph.saves[index]
        plan = self.c.plan.data
        graph = {"schema_version": plan["schema_version"], "compute_dtype": plan["compute_dtype"],
                 "inputs": plan["inputs"], "nodes": plan["nodes"],
                 "save": plan["saves"][index]}
        meta = dict(save.metadata)
        meta.update({
            "kmx_version": __version__,
            "kmx_recipe": self.c.program.sources.get(self.c.program.root.path, ""),
            "kmx_graph": json.dumps(graph, sort_keys=True, separators=(",", ":")),
            "kmx_inputs": json.dumps([{"path": p, "size": s, "hash": hashes[p]}
                                      for p, s in self.inputs], separators=(",", ":")),
            "kmx_set": json.dumps(dict(sorted(self.c.program.overrides.items()))),
        })
        if save.delta:
            meta["kmx_delta"] = "true"
        return meta

    def _hash_inputs(self) -> None:
        try:
            cache = _HashCache()
            for path, _ in self.inputs:
                self.hashes[path] = cache.get(path)
            cache.save()
        except BaseException as exc:  # reported by the thread that publishes
            self._hash_error = exc

    def _final_headers(self, index: int) -> list[bytes]:
        if self._hasher.ident is None:
            self._hasher.start()
        self._hasher.join()
        if self._hash_error is not None:
            err = self._hash_error
            raise err if isinstance(err, KmxError) else KmxError([error(
                "K0302", f"cannot hash the inputs: {err}")])
        return [f.header for f in self._layout(index, self.hashes).files]

    def at(self, index: int):
        """Errors about output `index` point at its save."""
        return located(self.c.graph.saves[index].span, "this save")

    # -- the overwrite and resume rules
    def final_paths(self) -> list[str]:
        return [s.path for s in self.c.graph.saves]

    def _existing(self, layout: OutputLayout) -> list[str]:
        paths = [f.path for f in layout.files] + ([layout.index_path] if layout.index_path else [])
        return [p for p in paths if os.path.lexists(p)]

    def complete(self) -> bool:
        """With --resume: every output already exists with exactly the planned header."""
        if not self.opts.resume:
            return False
        for i, layout in enumerate(self.layouts):
            if len(self._existing(layout)) != len(layout.files) + bool(layout.index_path):
                return False
        for i, layout in enumerate(self.layouts):
            for f, header in zip(layout.files, self._final_headers(i)):
                try:
                    with open(f.path, "rb") as fh:
                        if os.fstat(fh.fileno()).st_size != f.size or \
                                fh.read(len(header)) != header:
                            return False
                except OSError:
                    return False
        return True

    def open(self) -> list[CheckpointWriter]:
        for i, layout in enumerate(self.layouts):
            with self.at(i):
                self._may_write(layout)
        self._hasher.start()
        writers: list[CheckpointWriter] = []
        try:
            for i, layout in enumerate(self.layouts):
                with self.at(i):
                    writers.append(CheckpointWriter(layout, resume=self.opts.resume))
                    self._stamp(layout, resumed=bool(writers[-1].done_keys))
        except BaseException:
            self.keep_partial(writers)
            raise
        return writers

    def _may_write(self, layout: OutputLayout) -> None:
        """The overwrite rules: refuse to replace a file or an interrupted run's keys."""
        existing = self._existing(layout)
        if existing and not (self.opts.force or self.opts.resume):
            raise KmxError([error("K0306", f"`{existing[0]}` already exists",
                                  help="pass --force to replace it, or --resume to finish "
                                       "an interrupted run")])
        journal = hidden_path(layout.final_path, JOURNAL_SUFFIX)
        if os.path.exists(journal) and not (self.opts.force or self.opts.resume):
            # Hours of finished keys must not be thrown away by a plain rerun.
            raise KmxError([error(
                "K0306", f"an interrupted run of `{layout.final_path}` left its finished "
                "keys behind", help="pass --resume to continue it, or --force to start "
                "over")])

    def _stamp(self, layout: OutputLayout, resumed: bool) -> None:
        """Record the inputs' size and mtime beside a fresh partial output; on resume, refuse
        if they changed (a rewritten input would otherwise mix old and new keys)."""
        path = hidden_path(layout.final_path, STAMP_SUFFIX)
        stamp = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p, _ in self.inputs]
        if resumed:
            try:
                with open(path) as f:
                    same = json.load(f) == stamp
            except (OSError, ValueError):
                same = False
            if not same:
                raise KmxError([error(
                    "K0404", f"cannot resume `{layout.final_path}`: the inputs changed since "
                    "the interrupted run", help="run again without --resume to start over")])
            return
        try:
            with open(path, "w") as f:
                json.dump(stamp, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            too_many = exc.errno in (errno.EMFILE, errno.ENFILE)
            raise KmxError([error("K0402", f"cannot write `{path}`: {exc.strerror or exc}",
                                  help=TOO_MANY_FILES_HELP if too_many else None)]) from None

    def done_keys(self, writers: list[CheckpointWriter]) -> set[str]:
        """Keys every output that holds them has already journaled (an earlier run's work)."""
        done = set()
        for job in self.c.schedule.jobs:
            if all(job.key in writers[o.save].done_keys for o in job.outputs):
                done.add(job.key)
        return done

    def commit(self, writers: list[CheckpointWriter]) -> None:
        for i, w in enumerate(writers):
            with self.at(i):
                w.commit(self._final_headers(i))
            try:
                os.unlink(hidden_path(self.layouts[i].final_path, STAMP_SUFFIX))
            except OSError:
                pass

    def keep_partial(self, writers: list[CheckpointWriter]) -> None:
        for w in writers:
            w.abort(keep_partial=True)
