"""The outputs of one run: their layouts (header computed from the plan before any tensor is
written), their metadata, the overwrite and resume rules, and publishing them.

Rules: an existing output is replaced only with --force; --resume continues an interrupted run
only if its stamp (`.NAME.kmx-inputs`: the recipe files, the --set values, and the size, mtime
and data hash of every input file) matches this run, and keeps a finished output only if it is
exactly what this run would write. Before publishing, every input file must still be what was
planned (K0410), so a file rewritten during the run is never mixed into a published output.

Metadata holds the recipe, the lowered graph, each input's path, size and content hash, the kmx
version and the --set values — nothing that differs between two runs of the same recipe on the
same inputs. Input hashes are computed on a background thread during the merge (io/hashes.py:
both SHA-256s of each file in one read, cached); the header is planned with fixed-length placeholders and the real
hashes are written into it just before the files are published, so no offset moves.
"""

from __future__ import annotations

import errno
import json
import os
import threading

from karmixlang import __version__
from karmixlang.diagnostics import KmxError, error, located
from karmixlang.io import modelspec, provenance
from karmixlang.io.guard import changed, check_outputs, plan_save, save_tensors
from karmixlang.io.hashes import HASH_PLACEHOLDER, FileHashes, HashCache, combine_hashes
from karmixlang.io.header import TOO_MANY_FILES_HELP, read_checkpoint
from karmixlang.io.files import (JOURNAL_SUFFIX, STAMP_SUFFIX, OutputLock, atomic_write,
                                 hidden_path)
from karmixlang.io.hffolder import (discard, foreign_files, is_folder_path, publish,
                                    published_path, staging_path, tensor_path,
                                    write_side_files)
from karmixlang.io.writer import RESTART_HELP, CheckpointWriter, OutputLayout
from karmixlang.ir.graph import reachable
from karmixlang.plan.fingerprint import (FP_HEX, NO_FINGERPRINT, content_identity,
                                         key_fingerprints)
from karmixlang.plan.lock import UPDATE_HELP, full_hash

STAMP_VERSION = 2
FINGERPRINTS = "kmx_fingerprints"  # the metadata field (docs/plan-format.md)
FINGERPRINTS_VERSION = 1


def recorded_fingerprints(header) -> dict[str, str]:
    """key -> fingerprint, as a kmx output records them; {} when it records none."""
    try:
        doc = json.loads(header.metadata.get(FINGERPRINTS, ""))
        digits, keys = doc["fingerprints"], sorted(header.tensors)
        if doc.get("version") != FINGERPRINTS_VERSION or doc.get("hex") != FP_HEX or \
                len(digits) != FP_HEX * len(keys):
            return {}
    except (ValueError, KeyError, TypeError):
        return {}
    return {k: digits[i * FP_HEX:(i + 1) * FP_HEX] for i, k in enumerate(keys)}


class _Kept:
    """A finished output that --resume keeps as it is: every key counts as written, and
    nothing is written or published."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.done_keys = set(layout.slots)

    def write(self, key, data, start=None) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def commit(self, headers=None) -> None:
        pass

    def abort(self, keep_partial: bool) -> None:
        pass


class OutputSet:
    def __init__(self, compiled, opts):
        self.c = compiled
        self.opts = opts
        headers = compiled.schedule.headers
        self.inputs = _inputs(compiled)
        self.seen = compiled.inputs
        self.hashes: dict[str, FileHashes] = {}  # by input file
        self._hashed = False  # every hash is in self.hashes
        self._hash_error: BaseException | None = None
        self._hasher = threading.Thread(target=self._hash_inputs, daemon=True, name="kmx-hash")
        self._resuming = opts.resume and not opts.force and any(
            os.path.exists(hidden_path(tensor_path(s.path), JOURNAL_SUFFIX))
            for s in compiled.graph.saves)
        self._stamp_lock = threading.Lock()  # the stamps below, written by two threads
        self._stamps: list[tuple[str, int]] = []  # (stamp, save) being written; hashes later
        self._expected: dict[str, tuple[str, str]] = {}  # file -> (hash, output) to resume
        self._locks: list[OutputLock] = []
        self._fingerprints: list[dict[str, str]] | None = None  # once the inputs are hashed
        self.replaced: set[str] = set()  # keys copied from a fallback (--nonfinite=fallback)
        self.data_sha256: dict[str, str] = {}  # published file -> its data hash, once committed
        # published file -> its whole SHA-256 and identity when hashed (CheckpointWriter.commit)
        self.file_sha256: dict[str, tuple[str, os.stat_result]] = {}
        self._keys: dict[int, list[str]] = {}
        self.date = _modelspec_date(opts.date)
        self.layouts = [plan_save(s, compiled.schedule, i, self._metadata(i, None))
                        for i, s in enumerate(compiled.graph.saves)]
        # Checked when compiling too; again here, as the files may have changed since.
        check_outputs(compiled.graph.saves, self.layouts, headers, compiled.recipes,
                      compiled.unused_inputs)

    # -- layout and metadata
    def _metadata(self, index: int, hashes: dict[str, FileHashes] | None) -> dict[str, str]:
        """`hashes` None: placeholders of the same length, for planning the layout. A swept
        output records its own point (its single run's Compiled): the same bytes."""
        src, j = self.c.source(index)
        save = src.graph.saves[j]
        plan = src.plan.data
        graph = {"schema_version": plan["schema_version"], "compute_dtype": plan["compute_dtype"],
                 "inputs": plan["inputs"], "nodes": plan["nodes"],
                 "save": plan["saves"][j]}
        inputs = [{"path": p, "size": sum(self.seen[f].st_size for f in files),
                   "hash": combine_hashes([hashes[f].data_hash for f in files]) if hashes is not None
                   else HASH_PLACEHOLDER} for p, files in _inputs(src)]
        sets = dict(sorted(src.program.overrides.items()))
        if not self.opts.provenance:  # io/provenance.py: paths go, the rest stays
            folder = _recipe_folder(src)
            graph = provenance.strip_paths(graph)
            inputs = [{**i, "path": provenance.shared_path(i["path"], folder)} for i in inputs]
            sets = provenance.strip_sets(sets)
        meta = {**self._modelspec(index), **dict(save.metadata)}  # what the recipe says wins
        meta.update({
            "kmx_version": __version__,
            "kmx_recipe": src.program.sources.get(src.program.root.path, ""),
            "kmx_graph": json.dumps(graph, sort_keys=True, separators=(",", ":")),
            "kmx_inputs": json.dumps(inputs, separators=(",", ":")),
            "kmx_set": json.dumps(sets),
        })
        meta[FINGERPRINTS] = self._fingerprint_field(index, hashes is not None)
        if save.delta:
            meta["kmx_delta"] = "true"
        extraction = src.schedule.extractions.get(j)
        if extraction is not None:
            meta.update(extraction.metadata())
        meta[modelspec.HASH_FIELD] = modelspec.HASH_PLACEHOLDER  # filled in from the data
        if not self.opts.provenance:
            meta[provenance.MARK] = "omitted"
            _refuse_leaks(meta, src, save)
        return meta

    def _modelspec(self, index: int) -> dict[str, str]:
        """The output's modelspec.* fields (io/modelspec.py): its architecture from its keys
        (a LoRA's from the keys it was extracted from; none for a delta), its title from its
        file name, the inputs it is made from."""
        src, j = self.c.source(index)
        save = src.graph.saves[j]
        extraction = src.schedule.extractions.get(j)
        if extraction is not None:
            arch = modelspec.lora_architecture(extraction.arch)
        elif save.delta:
            arch = None
        else:
            arch = modelspec.architecture({k: shape for k, _, shape in
                                           save_tensors(self.c.schedule, index)})
        return modelspec.fields(arch, _stem(save.path), _sources(src, save), self.date)

    def _fingerprint_field(self, index: int, hashed: bool) -> str:
        """Each key's fingerprint, in sorted key order, FP_HEX hex digits each; zeros for
        planning the layout (the same length), and for a key whose bytes are not what its
        recipe computes (copied from a fallback for non-finite values): never reused."""
        keys = self.save_keys(index)
        fps = self.fingerprints()[index] if hashed else {}
        digits = "".join(NO_FINGERPRINT if k in self.replaced else fps.get(k, NO_FINGERPRINT)
                         for k in keys)
        return json.dumps({"version": FINGERPRINTS_VERSION, "hex": FP_HEX, "keys": "sorted",
                           "fingerprints": digits}, separators=(",", ":"))

    def _adopt_replaced(self, layout: OutputLayout) -> set[str]:
        """The keys a finished output holds from a fallback (a zero fingerprint; written with
        --nonfinite=fallback): a kept output keeps them, so its header records them."""
        try:
            header = read_checkpoint(layout.index_path or layout.final_path)
        except KmxError:
            return set()
        adopted = {k for k, fp in recorded_fingerprints(header).items()
                   if fp == NO_FINGERPRINT} - self.replaced
        self.replaced |= adopted
        return adopted

    def save_keys(self, index: int) -> list[str]:
        """The keys output `index` holds, sorted."""
        if index not in self._keys:
            self._keys[index] = sorted(o.written_as(j.key) for j in self.c.schedule.jobs
                                       for o in j.outputs if o.save == index)
        return self._keys[index]

    def fingerprints(self) -> list[dict[str, str]]:
        """Per save, key -> the fingerprint of what computes it (plan/fingerprint.py), with
        inputs identified by content hash: waits for the inputs to be hashed."""
        if self._fingerprints is None:
            self._join_hasher()
            self._fingerprints = key_fingerprints(self.c.schedule.executable,
                                                  content_identity(self.hashes))
        return self._fingerprints

    def _hash_inputs(self) -> None:
        try:
            cache = HashCache()
            for f in sorted(self.seen):
                self.hashes[f] = cache.get(f, fresh=self._resuming)
            cache.save()
            with self._stamp_lock:
                self._hashed = True
                for path, index in self._stamps:
                    self._write_stamp(path, index)
        except BaseException as exc:  # reported by the thread that publishes
            self._hash_error = exc

    def _join_hasher(self) -> None:
        if self._hasher.ident is None:
            self._hasher.start()
        self._hasher.join()
        if self._hash_error is not None:
            err = self._hash_error
            raise err if isinstance(err, KmxError) else KmxError([error(
                "K0302", f"cannot hash the inputs: {err}")])

    def _final_headers(self, index: int, data_hashes: list[str]) -> list[bytes]:
        """Each file's header as published: the inputs' hashes, and each file's own data
        hash (`data_hashes`, hex, in file order) as its modelspec.hash_sha256."""
        self._join_hasher()
        layout = plan_save(self.c.graph.saves[index], self.c.schedule, index,
                           self._metadata(index, self.hashes))
        return [modelspec.with_hash(f.header, h) for f, h in zip(layout.files, data_hashes)]

    def at(self, index: int):
        """Errors about output `index` point at its save."""
        return located(self.c.graph.saves[index].span, "this save")

    # -- the overwrite and resume rules
    def final_paths(self) -> list[str]:
        return [s.path for s in self.c.graph.saves]

    def _existing(self, layout: OutputLayout) -> list[str]:
        paths = [f.path for f in layout.files] + ([layout.index_path] if layout.index_path else [])
        return [p for p in paths if os.path.lexists(p)]

    def _matches(self, index: int) -> bool:
        """The output exists and is exactly what this run would write (headers, sizes, index)."""
        layout = self.layouts[index]
        if len(self._existing(layout)) != len(layout.files) + bool(layout.index_path):
            return False
        adopted = self._adopt_replaced(layout)
        if self._same_files(layout, index):
            return True
        self.replaced -= adopted
        return False

    def _same_files(self, layout: OutputLayout, index: int) -> bool:
        """The output's files have the headers and sizes this run would write, taking the data
        hash each records as its data's (the data itself is not read again)."""
        try:
            found = []
            for f in layout.files:
                with open(f.path, "rb") as fh:
                    found.append(fh.read(len(f.header)))
                    if os.fstat(fh.fileno()).st_size != f.size:
                        return False
            recorded = [modelspec.recorded_hash(h) for h in found]
            if None in recorded or found != self._final_headers(index, recorded):
                return False
            if layout.index_path:
                with open(layout.index_path, "rb") as fh:
                    return fh.read(len(layout.index) + 1) == layout.index
        except OSError:
            return False
        return True

    def complete(self) -> bool:
        """With --resume: every output already exists with exactly the planned header."""
        return self.opts.resume and all(not is_folder_path(s.path) and self._matches(i)
                                        for i, s in enumerate(self.c.graph.saves))

    def open(self) -> list:
        """Lock every output, decide what to do with each (write it fresh, resume it, or keep
        it), then open the writers. Nothing is written before every output is decided."""
        writers: list = []
        try:
            for i, layout in enumerate(self.layouts):
                with self.at(i):
                    # beside the save's path: a folder save's own folder is renamed into place
                    self._locks.append(OutputLock(self.c.graph.saves[i].path))
            modes = []
            for i in range(len(self.layouts)):
                with self.at(i):
                    modes.append(self._mode(i))
            if self._hasher.ident is None:
                self._hasher.start()
            for i, (lock, mode) in enumerate(zip(self._locks, modes)):
                with self.at(i):
                    writers.append(self._writer(i, lock, mode))
        except BaseException:
            self.keep_partial(writers)
            raise
        return writers

    def _writer(self, index: int, lock: OutputLock, mode: str):
        layout = self.layouts[index]
        if mode == "keep":
            return _Kept(layout)
        if mode == "fresh":
            with self._stamp_lock:
                self._stamps.append((hidden_path(layout.final_path, STAMP_SUFFIX), index))
                self._write_stamp(*self._stamps[-1])
        return CheckpointWriter(layout, resume=mode == "resume", lock=lock, hashes=True)

    def _mode(self, index: int) -> str:
        path = self.c.graph.saves[index].path
        if not is_folder_path(path):
            return self._file_mode(index)
        if os.path.lexists(path):
            if not self.opts.force:
                raise KmxError([error("K0306", f"the folder `{path}` already exists",
                                      help="pass --force to replace it whole, or save to "
                                           "another name")])
            foreign = foreign_files(path)
            if foreign:
                raise KmxError([error(
                    "K0343", f"`{path}` holds files a folder save does not write, e.g. "
                    f"`{foreign[0]}`: --force replaces a model folder whole, so kmx leaves "
                    "this one alone", help="save to a new folder, or move those files away")])
        journal = hidden_path(self.layouts[index].final_path, JOURNAL_SUFFIX)
        if os.path.exists(journal) and not self.opts.force:
            return self._file_mode(index)  # resume the tensors, or K0306
        staging = staging_path(path)
        try:
            discard(staging)  # a fresh start publishes nothing of an earlier run
            os.mkdir(staging)
        except OSError as e:
            raise KmxError([error("K0402", f"cannot write `{staging}`: {e.strerror or e}",
                                  help="check that the output's folder is writable")]) from e
        return "fresh"

    def _file_mode(self, index: int) -> str:
        layout = self.layouts[index]
        if self.opts.force:
            return "fresh"
        if os.path.exists(hidden_path(layout.final_path, JOURNAL_SUFFIX)):
            if not self.opts.resume:
                # Hours of finished keys must not be thrown away by a plain rerun.
                raise KmxError([error(
                    "K0306", f"an interrupted run of `{layout.final_path}` left its finished "
                    "keys behind", help="pass --resume to continue it, or --force to start "
                    "over")])
            self._check_stamp(index)
            return "resume"
        existing = self._existing(layout)
        if not existing:
            return "fresh"
        if self.opts.resume and self._matches(index):
            return "keep"
        raise KmxError([error("K0306", f"`{existing[0]}` already exists", help=(
            "--resume keeps a finished output only if this recipe, its --set values and its "
            "inputs would write exactly the same file, and this one differs: pass --force to "
            "replace it, or save to another name") if self.opts.resume else
            "pass --force to replace it, or save to another name")])

    # -- the resume stamp
    def _stamp_data(self, index: int) -> dict:
        """What output `index` is being written from (a swept output: its point's --set)."""
        return {
            "kmx_stamp": STAMP_VERSION,
            "recipe": dict(self.c.recipes),
            "set": dict(sorted(self.c.source(index)[0].program.overrides.items())),
            "inputs": {f: {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "hash": self.hashes[f].data_hash if self._hashed else None}
                       for f, st in sorted(self.seen.items())},
        }

    def _write_stamp(self, path: str, index: int) -> None:
        try:
            atomic_write(path, json.dumps(self._stamp_data(index), indent=1).encode())
        except OSError as e:  # the output's folder, removed or full: not a hashing failure
            too_many = e.errno in (errno.EMFILE, errno.ENFILE)
            raise KmxError([error("K0402", f"cannot write `{path}`: {e.strerror or e}",
                                  help=TOO_MANY_FILES_HELP if too_many else
                                  "check that the output's folder exists and is "
                                  "writable")]) from e

    def _check_stamp(self, index: int) -> None:
        """Resume only the run this one is: same recipe files, --set values and input files
        (by size and mtime now, by data hash before publishing)."""
        layout = self.layouts[index]
        def refuse(why: str):
            raise KmxError([error("K0404", f"cannot resume `{layout.final_path}`: {why}",
                                  help=RESTART_HELP)])

        path = hidden_path(layout.final_path, STAMP_SUFFIX)
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            refuse(f"the record of its inputs `{path}` is missing or unreadable")
        if not isinstance(old, dict) or old.get("kmx_stamp") != STAMP_VERSION:
            refuse(f"the record of its inputs `{path}` was written by another kmx version")
        now = self._stamp_data(index)
        for p in sorted(set(old.get("recipe", {})) | set(now["recipe"])):
            if old.get("recipe", {}).get(p) != now["recipe"].get(p):
                refuse(f"the recipe file `{p}` changed since the interrupted run")
        if old.get("set") != now["set"]:
            refuse(f"the --set values differ: {_sets(old.get('set'))} then, "
                   f"{_sets(now['set'])} now")
        was = old.get("inputs") if isinstance(old.get("inputs"), dict) else {}
        for f in sorted(set(was) | set(now["inputs"])):
            if f not in was or f not in now["inputs"]:
                refuse(f"the input file `{f}` " + ("is new" if f not in was else
                                                   "is no longer read"))
            a, b = was[f], now["inputs"][f]
            if not isinstance(a, dict) or (a.get("size"), a.get("mtime_ns")) != (
                    b["size"], b["mtime_ns"]):
                refuse(f"the input file `{f}` changed since the interrupted run (its size or "
                       "modification time differs)")
            if a.get("hash"):
                self._expected[f] = (a["hash"], layout.final_path)

    # -- running
    def done_keys(self, writers: list) -> set[str]:
        """Keys every output that holds them has already journaled (an earlier run's work)."""
        done = set()
        for job in self.c.schedule.jobs:
            if all(o.written_as(job.key) in writers[o.save].done_keys for o in job.outputs):
                done.add(job.key)
        return done

    def commit(self, writers: list) -> None:
        """Publish every output: its header filled in (the inputs' hashes, its own data's),
        once every input is checked to be what was planned."""
        data = [w.data_hashes() if isinstance(w, CheckpointWriter) else None for w in writers]
        headers = [h if h is None else self._final_headers(i, h) for i, h in enumerate(data)]
        # Publishing moves no data byte: the published files' data hashes, known now.
        self.data_sha256 = {published_path(f.path, s.path): h
                            for s, w, hs in zip(self.c.graph.saves, writers, data) if hs
                            for f, h in zip(w.layout.files, hs)}
        try:
            self._check_inputs()
        except KmxError:
            self._finish(writers, keep_partial=False)
            raise
        for i, (w, h) in enumerate(zip(writers, headers)):
            with self.at(i):
                w.commit(h)
        self.file_sha256 = {published_path(f.path, s.path): h
                            for s, w in zip(self.c.graph.saves, writers)
                            if isinstance(w, CheckpointWriter)
                            for f, h in zip(w.layout.files, w.file_sha256) if h}
        self._publish_folders()
        self._finish(writers, keep_partial=False)

    def _publish_folders(self) -> None:
        """Each folder save's side files written beside its committed tensors, and the
        folder renamed into place whole (io/hffolder.py)."""
        for i, folder in sorted(self.c.schedule.folders.items()):
            path = self.c.graph.saves[i].path  # where this run writes it (kmx verify moves it)
            staging = staging_path(path)
            try:
                os.unlink(hidden_path(self.layouts[i].final_path, STAMP_SUFFIX))
            except FileNotFoundError:
                pass
            try:
                write_side_files(staging, folder)
                publish(staging, path)
            except OSError as e:
                raise KmxError([error(
                    "K0520", f"cannot publish the folder `{path}`: {e.strerror or e}"
                    + (f" (at `{e.filename}`)" if e.filename else ""),
                    self.c.graph.saves[i].span, label="this save",
                    help=f"its tensors are complete in `{staging}`; fix the cause and run "
                         "again")]) from e

    def written_files(self) -> list[str]:
        """Every tensor file the outputs hold, where it is once published."""
        return [published_path(f.path, s.path) for s, layout in
                zip(self.c.graph.saves, self.layouts) for f in layout.files]

    def _check_inputs(self) -> None:
        """Every input file is still what was planned, and on resume holds the data the
        interrupted run read: otherwise the output would mix two versions of it."""
        for f, st in self.seen.items():
            why = changed(st, f)
            if why:
                raise KmxError([error(
                    "K0410", f"the input `{f}` changed during the run: {why}",
                    help="nothing was published and the partial output was discarded; run "
                         "again once no program is writing the input")])
        self._check_lock()
        for f, (expected, output) in self._expected.items():
            if f not in self.hashes or self.hashes[f].data_hash != expected:
                raise KmxError([error(
                    "K0404", f"cannot resume `{output}`: the data of the input file `{f}` "
                    "differs from what the interrupted run read (its size and modification "
                    "time did not change); nothing was published", help=RESTART_HELP)])

    def _check_lock(self) -> None:
        """Every input locked beside the recipe has the locked SHA-256, computed by the
        hasher during this run (no extra read)."""
        for path, files in self.inputs:
            entry = self.c.locked.get(path)
            if entry is not None and (actual := full_hash(files, self.hashes)) != entry.sha256:
                raise KmxError([error(
                    "K0511", f"the input `{entry.path}` differs from `{self.c.lock_file}`: "
                    f"SHA-256 {actual}, the lock says {entry.sha256}",
                    help="nothing was published; " + UPDATE_HELP)])

    def keep_partial(self, writers: list) -> None:
        self._finish(writers, keep_partial=True)

    def _finish(self, writers: list, keep_partial: bool) -> None:
        """Close the writers (after commit(), or keeping or discarding their partial files),
        drop the stamps no resume needs, and release the locks."""
        for w in writers:
            w.abort(keep_partial=keep_partial)
        with self._stamp_lock:
            self._stamps = []  # the hasher writes no stamp after this
        if not keep_partial:
            for layout in self.layouts:
                try:
                    os.unlink(hidden_path(layout.final_path, STAMP_SUFFIX))
                except OSError:
                    pass
        for lock in self._locks:
            lock.release()


def _inputs(compiled) -> list[tuple[str, tuple[str, ...]]]:
    """Each input: its path and its files, sorted by path (the metadata's order)."""
    return sorted((n.attr("path"), h.files) for n, h in compiled.schedule.headers.items())


def _recipe_folder(compiled) -> str:
    return os.path.dirname(os.path.abspath(compiled.program.root.path))


def _refuse_leaks(meta: dict[str, str], compiled, save) -> None:
    """K0334 when --no-provenance metadata still holds the recipe's, an input's or the
    output's folder: the recipe text names it literally."""
    folders = [_recipe_folder(compiled), os.path.dirname(os.path.abspath(save.path))]
    for path, files in _inputs(compiled):
        folders += [os.path.dirname(f) for f in (path, os.path.realpath(path), *files)]
    found = provenance.leak(meta, folders)
    if found:
        field, folder = found
        raise KmxError([error(
            "K0334", f"--no-provenance: the metadata of `{save.written}` would still hold the "
            f"local path `{folder}` (in `{field}`)", save.span,
            help="the recipe text is kept in the output: name the inputs through a param "
                 "(`param models = \"models\"`, `\"${models}/a.safetensors\"`) and pass "
                 "`--set models=/your/folder`, or run without --no-provenance")])


def _sources(compiled, save) -> list[str]:
    """The inputs `save` reads, as modelspec's merged_from names them, in recipe order."""
    roots = [save.expr] + ([save.fallback] if save.fallback is not None else [])
    names, seen = [], set()
    for n in reachable(roots):
        header = compiled.schedule.headers.get(n)
        if header is not None and n.attr("path") not in seen:
            seen.add(n.attr("path"))
            names.append(modelspec.source_title(header.metadata, _stem(n.attr("path"))))
    return names


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def _modelspec_date(given: str | None) -> str | None:
    """modelspec.date: `given` ("" for none), else SOURCE_DATE_EPOCH's date (the
    reproducible-builds convention), else none: the run's own time would make two runs of
    one recipe differ."""
    if given is not None:
        return given or None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return None
    try:
        return modelspec.date_from_epoch(epoch.strip())
    except ValueError:
        raise KmxError([error("K0333", f"SOURCE_DATE_EPOCH is `{epoch}`, not a number of "
                              "seconds since 1970-01-01 UTC", help="set it to a whole number "
                              "(e.g. `date +%s`), or unset it: outputs then carry no "
                              "modelspec.date")]) from None


def _sets(values) -> str:
    return ", ".join(f"{k}={v}" for k, v in (values or {}).items()) or "none"
