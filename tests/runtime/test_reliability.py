"""Faults during a run and hostile input: no traceback, no partial file under a final name,
inputs unchanged, and --resume completes to the same bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil

import pytest

from karmixlang.api import compile as compile_recipe
from karmixlang.cli import main
from karmixlang.diagnostics import KmxError
from karmixlang.io import writer as writer_mod
from karmixlang.runtime.executor import RunOptions, execute

from conftest import recipe, tiny_models


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def merge_recipe(workdir) -> str:
    tiny_models(workdir)
    return recipe(workdir, """
        base o = "base.safetensors"
        cluster pool = ["a.safetensors", "b.safetensors", "c.safetensors"]
        save "out/m.safetensors" = o + geometric_median(pool - o)
    """)


def failing_after(n: int, err: int):
    real = writer_mod._pwrite_all
    calls = {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    return flaky


def on_write(n: int, action):
    """A stand-in for the writer's pwrite that runs `action()` before its n-th write."""
    real = writer_mod._pwrite_all
    calls = {"n": 0}

    def write(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(fd, data, offset)

    return write


def test_disk_full_mid_run_leaves_no_final_file_and_resume_completes(workdir, monkeypatch):
    path = merge_recipe(workdir)
    execute(compile_recipe(path), RunOptions(threads=1))
    clean = digest(workdir / "out/m.safetensors")
    os.remove(workdir / "out/m.safetensors")
    inputs = {f: digest(workdir / f) for f in ("base.safetensors", "a.safetensors")}

    monkeypatch.setattr(writer_mod, "_pwrite_all", failing_after(4, errno.ENOSPC))
    with pytest.raises(KmxError) as exc:
        execute(compile_recipe(path), RunOptions(threads=2))
    d = exc.value.diagnostics[0]
    assert d.code == "K0402" and "m.safetensors" in d.message
    assert not (workdir / "out/m.safetensors").exists()
    monkeypatch.undo()
    execute(compile_recipe(path), RunOptions(threads=1, resume=True))
    assert digest(workdir / "out/m.safetensors") == clean
    assert {f: digest(workdir / f) for f in inputs} == inputs


def test_output_folder_removed_mid_run_is_a_coded_error(workdir, monkeypatch, capsys):
    path = merge_recipe(workdir)
    monkeypatch.setattr(writer_mod, "_pwrite_all", on_write(3, lambda: shutil.rmtree(
        workdir / "out")))
    assert main(["run", path, "-q", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "K0402" in captured.err and "Traceback" not in captured.err + captured.out
    assert not (workdir / "out/m.safetensors").exists()


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("PWNED",))


def test_a_malicious_pickle_is_refused_and_never_run(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    tiny_models(workdir)
    with open(workdir / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model evil = "evil.ckpt"
        save "out.safetensors" = lerp(o, evil, t=0.5)
    """)
    assert main(["plan", path]) == 1
    err = capsys.readouterr().err
    assert "K0308" in err and "evil.ckpt" in err and "Traceback" not in err
    assert not (workdir / "PWNED").exists()


@pytest.mark.parametrize("content,code", [
    (b"", "K0302"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "K0302"),
    (b"\xff" * 8 + b"{}", "K0302"),
])
def test_broken_inputs_give_coded_errors_through_the_cli(workdir, capsys, content, code):
    tiny_models(workdir)
    (workdir / "bad.safetensors").write_bytes(content)
    path = recipe(workdir, """
        base o = "base.safetensors"
        model bad = "bad.safetensors"
        save "out.safetensors" = lerp(o, bad, t=0.5)
    """)
    assert main(["run", path, "-q"]) == 1
    err = capsys.readouterr().err
    assert code in err and "bad.safetensors" in err and "Traceback" not in err
    assert ":2:" in err  # points at the recipe line naming the file


def test_directory_and_fifo_where_a_file_is_expected(workdir, capsys):
    tiny_models(workdir)
    (workdir / "dir.safetensors").mkdir()
    os.mkfifo(workdir / "fifo.safetensors")
    for name in ("dir", "fifo"):
        path = recipe(workdir, f"""
            base o = "base.safetensors"
            model x = "{name}.safetensors"
            save "out.safetensors" = lerp(o, x, t=0.5)
        """)
        assert main(["plan", path]) == 1
        err = capsys.readouterr().err
        assert "K030" in err and f"{name}.safetensors" in err and "Traceback" not in err


def test_hostile_recipes_are_diagnostics_not_crashes(workdir, capsys):
    big = workdir / "big.kmx"
    big.write_text("# " + "x" * (10 * 1024 * 1024) + "\n")
    deep = workdir / "deep.kmx"
    deep.write_text('model a = "a.safetensors"\nlet x = ' + "(" * 10000 + "a" + ")" * 10000 + "\n")
    code = workdir / "code.kmx"
    code.write_text('let x = __import__("os").system("touch PWNED")\n')
    for f, want in ((big, "K0004"), (deep, "K0004"), (code, "K0")):
        assert main(["check", str(f)]) == 1
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err
    assert not (workdir / "PWNED").exists()


def interrupted_by_disk_full(workdir, monkeypatch) -> str:
    """A recipe whose run stopped after a few keys, leaving its partial output behind."""
    path = merge_recipe(workdir)
    monkeypatch.setattr(writer_mod, "_pwrite_all", failing_after(3, errno.ENOSPC))
    with pytest.raises(KmxError):
        execute(compile_recipe(path), RunOptions(threads=1))
    monkeypatch.undo()
    return path


def test_resume_refuses_when_an_input_changed(workdir, monkeypatch):
    path = interrupted_by_disk_full(workdir, monkeypatch)
    os.utime(workdir / "a.safetensors", ns=(1, 1))  # rewritten in place, same size and header
    with pytest.raises(KmxError) as exc:
        execute(compile_recipe(path), RunOptions(threads=1, resume=True))
    assert exc.value.diagnostics[0].code == "K0404"
    assert not (workdir / "out/m.safetensors").exists()


def test_a_plain_rerun_does_not_discard_an_interrupted_run(workdir, monkeypatch):
    path = interrupted_by_disk_full(workdir, monkeypatch)
    with pytest.raises(KmxError) as exc:
        execute(compile_recipe(path), RunOptions(threads=1))
    assert exc.value.diagnostics[0].code == "K0306" and "--resume" in exc.value.diagnostics[0].help
    execute(compile_recipe(path), RunOptions(threads=1, force=True))
    assert (workdir / "out/m.safetensors").exists()
