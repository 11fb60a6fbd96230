"""`kmx run` restarts itself once with glibc's small-block cache off and huge pages asked for
(karmixlang/__main__.py): only as `kmx run`, only on glibc, never twice, keeping the user's own
tunables."""

import sys

import pytest

import karmixlang.__main__ as entry

OURS = "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"

glibc = pytest.mark.skipif(not entry._glibc(), reason="glibc only")


@glibc
def test_the_cache_is_turned_off_and_other_tunables_kept():
    assert entry.allocator_env({"HOME": "/h"}) == {"HOME": "/h", "GLIBC_TUNABLES": OURS}
    env = entry.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{OURS}"


@glibc
def test_no_second_restart_and_the_users_setting_wins():
    once = entry.allocator_env({})
    assert entry.allocator_env(once) is None
    env = entry.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1"
    assert entry.allocator_env(env) is None


def _restarts(monkeypatch, argv, orig_argv, env=None):
    calls = []
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(entry.os, "environ", dict(env or {}))
    monkeypatch.setattr(entry.os, "execve", lambda *a: calls.append(a))
    entry._restart_for_run()
    return calls


@glibc
def test_kmx_run_restarts_with_its_own_command_line(monkeypatch):
    orig = ["/venv/bin/python", "/venv/bin/kmx", "run", "r.kmx", "--threads", "2"]
    calls = _restarts(monkeypatch, ["/venv/bin/kmx", "run", "r.kmx", "--threads", "2"], orig)
    assert len(calls) == 1
    exe, argv, env = calls[0]
    assert exe == sys.executable and argv == orig and env["GLIBC_TUNABLES"] == OURS
    calls = _restarts(monkeypatch, ["-m", "run", "r.kmx"],
                      ["python3", "-X", "utf8", "-m", "karmixlang", "run", "r.kmx"])
    assert calls and calls[0][1] == ["python3", "-X", "utf8", "-m", "karmixlang", "run", "r.kmx"]


def test_other_commands_and_callers_of_main_do_not_restart(monkeypatch):
    assert not _restarts(monkeypatch, ["kmx", "plan", "r.kmx"], ["python", "kmx", "plan", "r.kmx"])
    # a program that calls main() itself with an argv of its own (a test runner)
    assert not _restarts(monkeypatch, ["kmx", "run", "r.kmx"], ["python", "-m", "pytest", "-q"])
    assert not _restarts(monkeypatch, ["kmx", "run", "r.kmx"], ["python", "kmx", "run", "r.kmx"],
                         {"GLIBC_TUNABLES": OURS})
