"""Outputs are safe to write: an output never is, or shares a file with, an input (whatever the
flags); --resume continues only the run it belongs to; one writer per output; an input that
changes during a run fails it before anything is published."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.cli import main
from karmixlang.diagnostics import KmxError
from karmixlang.io import writer as writer_mod
from karmixlang.io.writer import CheckpointWriter, layout_output
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe, tiny_models
from test_reliability import failing_after, on_write

FLAGS = [[], ["--force"], ["--resume"], ["--force", "--resume"]]


def digests(folder) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def kmx(capsys, *args) -> tuple[int, str]:
    rc = main(["run", *args, "-q", "--threads", "1"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    return rc, err


def refusal(path, **options):
    """The first diagnostic of a run of `path` that must fail."""
    with pytest.raises(KmxError) as exc:
        execute(compile_recipe(path), RunOptions(threads=1, **options))
    return exc.value.diagnostics[0]


@pytest.fixture
def shin(workdir):
    """`shin/`: a 2-shard HF checkpoint (index + shards) made by kmx from the tiny models."""
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "shin/model.safetensors" = lerp(o, a, 0.5) with shard="300B"
    """, "make.kmx")
    execute(compile_recipe(path), RunOptions(threads=1))
    assert len(os.listdir(workdir / "shin")) == 3
    return workdir / "shin"


# ---------------------------------------------------------------- 1. inputs are sacred

@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("spelling", ["shin/model.safetensors.index.json", "shin"])
def test_a_sharded_save_never_writes_over_an_input_shard(workdir, shin, capsys, flags, spelling):
    before = digests(shin)
    path = recipe(workdir, f"""
        base o = "base.safetensors"
        model x = "{spelling}"
        save "shin/model.safetensors" = lerp(o, x, 0.5) with shard="300B"
        save "other.safetensors" = lerp(o, x, 0.25)
    """)
    rc, err = kmx(capsys, path, *flags)
    assert rc == 1 and "K0305" in err and "model-00001-of-00002.safetensors" in err
    assert digests(shin) == before
    assert not (workdir / "other.safetensors").exists()


def one_save(workdir, target: str, extra: str = "") -> str:
    return recipe(workdir, f"""
        {extra}
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "{target}" = lerp(o, a, t=0.5)
    """)


@pytest.mark.parametrize("how", ["path", "symlink", "hard link", "symlinked folder", "partial",
                                 "journal", "lock", "stamp", "recipe"])
def test_no_file_a_save_writes_is_an_input_or_the_recipe(workdir, capsys, how):
    tiny_models(workdir)
    target = {"path": "a.safetensors", "symlink": "link.safetensors",
              "hard link": "hard.safetensors", "symlinked folder": "via/a.safetensors",
              "recipe": "r.kmx"}.get(how, "out.safetensors")
    if how == "symlink":
        os.symlink(workdir / "a.safetensors", workdir / "link.safetensors")
    elif how == "hard link":
        os.link(workdir / "a.safetensors", workdir / "hard.safetensors")
    elif how == "symlinked folder":
        os.symlink(workdir, workdir / "via")
    elif how in ("partial", "journal", "lock", "stamp"):
        suffix = {"partial": "partial", "journal": "journal", "lock": "lock",
                  "stamp": "inputs"}[how]
        os.symlink(workdir / "a.safetensors", workdir / f".out.safetensors.kmx-{suffix}")
    path = one_save(workdir, target)
    before = digests(workdir)
    for flags in FLAGS:
        rc, err = kmx(capsys, path, *flags)
        assert rc == 1 and "K0305" in err, (flags, err)
    assert digests(workdir) == before


def test_a_save_may_not_overwrite_an_imported_recipe(workdir, capsys):
    tiny_models(workdir)
    recipe(workdir, "param t = 0.5\n", "lib.kmx")
    path = one_save(workdir, "lib.kmx", extra='import "lib.kmx" as lib')
    rc, err = kmx(capsys, path, "--force")
    assert rc == 1 and "K0305" in err and "recipe" in err
    assert (workdir / "lib.kmx").read_text() == "param t = 0.5\n"


def _special(kind: str, path) -> None:
    if kind == "char device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except (PermissionError, OSError) as e:
            pytest.skip(f"cannot make a device node here: {e}")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)


@pytest.mark.parametrize("kind", ["char device", "fifo", "directory"])
@pytest.mark.parametrize("name", ["out.safetensors", ".out.safetensors.kmx-partial"])
def test_an_output_path_that_is_not_a_regular_file_is_refused_not_replaced(workdir, capsys,
                                                                           kind, name):
    tiny_models(workdir)
    _special(kind, workdir / name)
    mode = os.lstat(workdir / name).st_mode
    path = one_save(workdir, "out.safetensors")
    for flags in FLAGS:
        rc, err = kmx(capsys, path, *flags)
        assert rc == 1 and "K0311" in err, (flags, err)
        assert os.lstat(workdir / name).st_mode == mode
    if name != "out.safetensors":
        assert not (workdir / "out.safetensors").exists()


def test_two_saves_through_a_symlinked_folder_are_one_path(workdir, capsys):
    tiny_models(workdir)
    (workdir / "out").mkdir()
    os.symlink(workdir / "out", workdir / "via")
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "out/m.safetensors" = lerp(o, a, t=0.5)
        save "via/m.safetensors" = lerp(o, a, t=0.25)
    """)
    assert main(["check", path]) == 1
    assert "K0212" in capsys.readouterr().err
    rc, err = kmx(capsys, path)
    assert rc == 1 and "K0212" in err and not (workdir / "out/m.safetensors").exists()


def test_a_save_whose_shard_is_another_save_is_refused(workdir, capsys):
    tiny_models(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "m.safetensors" = lerp(o, a, t=0.5) with shard="300B"
        save "m-00001-of-00002.safetensors" = lerp(o, a, t=0.25)
    """)
    rc, err = kmx(capsys, path)
    assert rc == 1 and "K0212" in err and not (workdir / "m.safetensors.index.json").exists()


# ---------------------------------------------------------------- 2. resume never mixes

def two_saves(workdir) -> str:
    tiny_models(workdir)
    return recipe(workdir, """
        param t = 0.5
        base o = "base.safetensors"
        model a = "a.safetensors"
        save "A.safetensors" = lerp(o, a, t=t)
        save "B.safetensors" = lerp(o, a, t=0.25)
    """)


def test_resume_never_replaces_a_finished_output_made_by_another_recipe(workdir, capsys):
    path = two_saves(workdir)
    assert kmx(capsys, path)[0] == 0
    a, b = (digests(workdir)[f] for f in ("A.safetensors", "B.safetensors"))
    ino = os.stat(workdir / "A.safetensors").st_ino
    os.remove(workdir / "B.safetensors")
    rc, err = kmx(capsys, path, "--resume", "--set", "t=0.3")
    assert rc == 1 and "K0306" in err and "A.safetensors" in err and "--force" in err
    assert digests(workdir)["A.safetensors"] == a and not (workdir / "B.safetensors").exists()
    # The same recipe: A is kept as it is (not rewritten) and B is made again.
    assert kmx(capsys, path, "--resume")[0] == 0
    assert os.stat(workdir / "A.safetensors").st_ino == ino
    assert digests(workdir)["B.safetensors"] == b


def interrupted(workdir, monkeypatch, path: str, stamped: bool = False, **options) -> None:
    """Run `path` until a write fails (disk full) after a few keys. With `stamped`, the failure
    waits until the input hashes are recorded in the resume stamp."""
    flaky = failing_after(3, errno.ENOSPC)

    def write(fd, data, offset):
        if stamped:
            stamps = [f for f in os.listdir(workdir) if f.endswith(".kmx-inputs")]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(
                    '"sha256:' in (workdir / f).read_text() for f in stamps):
                time.sleep(0.01)
        return flaky(fd, data, offset)

    monkeypatch.setattr(writer_mod, "_pwrite_all", write)
    with pytest.raises(KmxError) as exc:
        execute(compile_recipe(path), RunOptions(threads=1, **options))
    assert exc.value.diagnostics[0].code == "K0402"
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / ".cache"))


def merge_of_shin(workdir) -> str:
    return recipe(workdir, """
        base o = "base.safetensors"
        model x = "shin"
        save "out.safetensors" = lerp(o, x, 0.5)
    """)


def rewrite_shard(shin, same_size_and_mtime: bool) -> str:
    """Rewrite shard 2 of `shin` in place with other data (header, keys and size kept)."""
    import numpy as np

    shard = shin / "model-00002-of-00002.safetensors"
    st = os.stat(shard)
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    for name, e in json.loads(raw[8:8 + n]).items():
        if name != "__metadata__":
            b, end = (8 + n + o for o in e["data_offsets"])
            raw[b:end] = (np.frombuffer(raw[b:end], dtypes[e["dtype"]]) + 1).tobytes()
    with open(shard, "r+b") as f:
        f.write(raw)
    if same_size_and_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    return shard.name


@pytest.mark.parametrize("same_size_and_mtime", [False, True])
def test_resume_refuses_when_one_shard_of_an_input_changed(workdir, shin, monkeypatch,
                                                           same_size_and_mtime):
    path = merge_of_shin(workdir)
    interrupted(workdir, monkeypatch, path, stamped=True)
    name = rewrite_shard(shin, same_size_and_mtime)
    d = refusal(path, resume=True)
    assert d.code == "K0404" and name in d.message and "--force" in d.help
    assert not (workdir / "out.safetensors").exists()
    execute(compile_recipe(path), RunOptions(threads=1, force=True))  # the help works
    assert (workdir / "out.safetensors").exists()


@pytest.mark.parametrize("change", ["set", "recipe"])
def test_resume_refuses_another_recipe_or_set_values(workdir, monkeypatch, change):
    path = two_saves(workdir)
    interrupted(workdir, monkeypatch, path)
    if change == "set":
        with pytest.raises(KmxError) as exc:
            execute(compile_recipe(path, {"t": "0.3"}), RunOptions(threads=1, resume=True))
        d = exc.value.diagnostics[0]
        assert d.code == "K0404" and "--set" in d.message and "t=0.3" in d.message
    else:
        with open(path, "a") as f:
            f.write("# an edit\n")
        d = refusal(path, resume=True)
        assert d.code == "K0404" and "r.kmx" in d.message and "recipe" in d.message
    assert not (workdir / "A.safetensors").exists()


def test_resume_continues_the_same_run_under_another_spelling_of_the_recipe(workdir,
                                                                           monkeypatch):
    path = two_saves(workdir)
    interrupted(workdir, monkeypatch, path, stamped=True)
    assert (workdir / ".A.safetensors.kmx-journal").exists()
    monkeypatch.chdir(workdir)
    compiled = compile_recipe("./r.kmx")
    # Recipe files are resolved when compiling: running from another folder changes nothing.
    (workdir / "elsewhere").mkdir()
    monkeypatch.chdir(workdir / "elsewhere")
    execute(compiled, RunOptions(threads=1, resume=True))
    assert (workdir / "A.safetensors").exists() and (workdir / "B.safetensors").exists()


def test_an_input_changed_during_the_run_fails_it_and_nothing_is_published(workdir, shin,
                                                                           monkeypatch):
    path = merge_of_shin(workdir)
    monkeypatch.setattr(writer_mod, "_pwrite_all", on_write(3, lambda: rewrite_shard(
        shin, same_size_and_mtime=False)))
    d = refusal(path)
    assert d.code == "K0410" and "model-00002-of-00002.safetensors" in d.message
    assert [f for f in os.listdir(workdir) if f.startswith(("out", ".out"))] == []


# ---------------------------------------------------------------- 3. one writer per output

def test_a_second_run_on_the_same_output_refuses_at_once_naming_the_first(workdir, capsys):
    tiny_models(workdir)
    path = one_save(workdir, "out/m.safetensors")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from karmixlang.io.files import OutputLock; "
         f"lock = OutputLock({str(workdir / 'out/m.safetensors')!r}); print('ready', "
         "flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for flags in FLAGS:
            rc, err = kmx(capsys, path, *flags)
            assert rc == 1 and "K0409" in err and f"pid {holder.pid}" in err, err
        assert not (workdir / "out/m.safetensors").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert kmx(capsys, path)[0] == 0
    assert not (workdir / "out/.m.safetensors.kmx-lock").exists()


def small_layout(tmp_path):
    return layout_output(str(tmp_path / "o.safetensors"), [("a", "F32", (4,)), ("b", "F32", (2,))],
                       {}, None)


def test_a_writer_refuses_an_output_another_writer_holds(tmp_path):
    layout = small_layout(tmp_path)
    with CheckpointWriter(layout):
        with pytest.raises(KmxError) as exc:
            CheckpointWriter(layout)
        assert exc.value.diagnostics[0].code == "K0409"
        assert f"pid {os.getpid()}" in exc.value.diagnostics[0].message
    # A lock file left by a killed run holds no lock: the next writer takes it.
    (tmp_path / ".o.safetensors.kmx-lock").write_text("pid 1 started long ago\n")
    w = CheckpointWriter(layout)
    w.abort(keep_partial=False)
    assert os.listdir(tmp_path) == []


def test_only_the_runs_own_partial_file_is_published(tmp_path):
    layout = small_layout(tmp_path)
    w = CheckpointWriter(layout)
    w.write("a", b"\0" * 16)
    w.write("b", b"\0" * 8)
    partial = tmp_path / ".o.safetensors.kmx-partial"
    os.replace(partial, tmp_path / "stolen")  # another process takes it, and puts its own
    partial.write_bytes(b"someone else's")
    with pytest.raises(KmxError) as exc:
        w.commit()
    assert exc.value.diagnostics[0].code == "K0409" and "partial" in exc.value.diagnostics[0].message
    w.abort(keep_partial=True)
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------- 4. smaller ones

def test_fmt_does_not_follow_a_symlink_at_a_temporary_name(workdir):
    path = recipe(workdir, 'base o="a.safetensors"\nsave "x.safetensors"=o\n')
    os.chmod(path, 0o640)
    victim = workdir / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{path}.kmx-fmt.tmp")
    assert main(["fmt", path]) == 0
    assert victim.read_text() == "precious\n"
    assert open(path).read().startswith("base o = ")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(workdir)) == sorted(["r.kmx", "victim", "r.kmx.kmx-fmt.tmp"])


def test_following_the_help_of_k0401_and_k0404_works(workdir, capsys, monkeypatch):
    import numpy as np

    bad = np.ones((6, 5), np.float32)
    bad[1, 1] = np.inf
    tiny_models(workdir, extra={"a": {"model.w": bad}})
    path = one_save(workdir, "out.safetensors")
    rc, err = kmx(capsys, path)
    assert rc == 1 and "K0401" in err and "--resume --nonfinite=fallback" in err
    assert kmx(capsys, path, "--resume", "--nonfinite=fallback")[0] == 0

    os.remove(workdir / "out.safetensors")
    interrupted(workdir, monkeypatch, path, nonfinite="fallback")
    os.utime(workdir / "base.safetensors", ns=(1, 1))
    rc, err = kmx(capsys, path, "--resume", "--nonfinite=fallback")
    assert rc == 1 and "K0404" in err and "--force" in err
    assert kmx(capsys, path, "--force", "--nonfinite=fallback")[0] == 0


def test_a_resume_stamp_that_cannot_be_written_is_k0402(workdir, monkeypatch):
    """The stamp with the input hashes is written by the hashing thread (or when the outputs
    open, if hashing was quicker): its folder gone is a write error, not a hashing one."""
    from karmixlang.runtime import outputs as outputs_mod

    real = outputs_mod.atomic_write

    def fail_once_hashed(path, data, mode=None):
        if b'"sha256:' in data:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real(path, data, mode)

    monkeypatch.setattr(outputs_mod, "atomic_write", fail_once_hashed)
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / ".cache"))
    tiny_models(workdir)
    d = refusal(one_save(workdir, "out.safetensors"))
    assert d.code == "K0402" and ".out.safetensors.kmx-inputs" in d.message
    assert not (workdir / "out.safetensors").exists()


@pytest.mark.parametrize("flags", FLAGS)
def test_a_declared_checkpoint_no_save_reads_is_still_an_input(workdir, shin, capsys, flags):
    before = digests(workdir)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        model unused = "b.safetensors"
        base shards = "shin"
        save "b.safetensors" = lerp(o, a, 0.5)
    """)
    rc, err = kmx(capsys, path, *flags)
    assert rc == 1 and "K0305" in err and "b.safetensors" in err
    path = recipe(workdir, """
        base o = "base.safetensors"
        model a = "a.safetensors"
        base shards = "shin"
        save "shin/model.safetensors" = lerp(o, a, 0.5) with shard="300B"
    """, "r2.kmx")
    rc, err = kmx(capsys, path, *flags)
    assert rc == 1 and "K0305" in err
    after = digests(workdir)
    assert {k: v for k, v in after.items() if k in before} == before


def test_an_input_rewritten_with_its_old_mtime_is_hashed_again(workdir, capsys):
    # The hash cache must not hand the stamp and the metadata a hash of data that is gone:
    # a rewrite with the same size and the old mtime put back still changes the change time.
    from safetensors import safe_open

    from karmixlang.io.hashes import compute_hashes

    tiny_models(workdir)
    path = one_save(workdir, "out.safetensors")
    assert kmx(capsys, path)[0] == 0
    target = workdir / "a.safetensors"
    st = os.stat(target)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # the last byte of the data region, same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert kmx(capsys, path, "--force")[0] == 0
    with safe_open(str(workdir / "out.safetensors"), "np") as f:
        inputs = json.loads(f.metadata()["kmx_inputs"])
    recorded = {os.path.basename(i["path"]): i["hash"] for i in inputs}
    assert recorded["a.safetensors"] == compute_hashes(str(target)).data_hash
